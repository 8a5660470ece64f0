"""Progress reporting on stderr (silent with ``--quiet``)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")


class Progress:
    """Reports long steps on a stream (stderr by default).

    ``stage(title)`` prints the title when a step starts and its duration when it ends;
    ``iterate(items, title)`` shows a progress bar (tqdm) over a loop. With ``enabled=False``
    nothing is printed.
    """

    def __init__(self, enabled: bool = True, stream: TextIO | None = None):
        self.enabled = enabled
        self.stream = stream
        self._depth = 0

    @property
    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def message(self, text: str) -> None:
        """One line of information."""
        if self.enabled:
            print(("  " * self._depth) + text, file=self._out, flush=True)

    @contextmanager
    def stage(self, title: str) -> Iterator[None]:
        """Announce a step, then report how long it took (or that it failed)."""
        if not self.enabled:
            yield
            return
        indent = "  " * self._depth
        print(f"{indent}> {title} ...", file=self._out, flush=True)
        t0 = time.perf_counter()
        self._depth += 1
        try:
            yield
        except BaseException:
            self._depth -= 1
            print(f"{indent}x {title} failed after {time.perf_counter() - t0:.1f} s", file=self._out, flush=True)
            raise
        self._depth -= 1
        print(f"{indent}  {title}: done in {time.perf_counter() - t0:.1f} s", file=self._out, flush=True)

    def iterate(self, items: Iterable[T], title: str, total: int | None = None) -> Iterator[T]:
        """Iterate with a progress bar."""
        if not self.enabled:
            yield from items
            return
        from tqdm.auto import tqdm

        yield from tqdm(items, desc=("  " * self._depth) + title, total=total, file=self._out, leave=False,
                        dynamic_ncols=True, mininterval=0.5)
