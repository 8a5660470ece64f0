"""Executing units: in this process, in a pool of worker processes, or on a Dask cluster;
resumable through one JSON file per finished unit under ``DIR/results/``.

* a unit is *finished* when its result file exists and holds every requested fusion; finished
  units are skipped by a rerun (failed ones too, unless ``retry_failed``);
* result files are written atomically by this (the planning) process as results arrive, so an
  interrupted run keeps everything it finished;
* a unit that raises is recorded with its error (its file is written: the failure is part of the
  results); a unit whose *worker* died (out of memory, killed, lost Dask worker) is reported
  but not written, so the next run retries it.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from spasem.evaluation.files import write_json
from spasem.evaluation.protocol import Unit
from spasem.evaluation.worker import UnitTask, base_record, configure_process, run_task


def default_workers() -> int:
    """Worker processes for this machine: one per core, at most one per 3 GiB of memory."""
    cores = os.cpu_count() or 1
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
        memory_gib = 3.0 * cores
    return max(1, min(cores, int(memory_gib // 3)))


def result_path(results_dir: Path, unit: Unit) -> Path:
    return results_dir / unit.key


def load_finished(results_dir: Path, unit: Unit, retry_failed: bool) -> dict[str, Any] | None:
    """The stored record of ``unit`` if it counts as finished, else None."""
    path = result_path(results_dir, unit)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if record.get("key") != unit.key or not set(unit.method.fusion_names) <= set(record.get("fusions", {})):
        return None
    if retry_failed and (record.get("error") or any(f.get("error") for f in record["fusions"].values())):
        return None
    return record


def _worker_init(torch_threads: int) -> None:
    configure_process(torch_threads)


def lost_records(task: UnitTask, reason: str) -> list[dict[str, Any]]:
    return [lost_record(unit, reason) for unit in task.units]


def lost_record(unit: Unit, reason: str) -> dict[str, Any]:
    """A record for a unit whose worker died (not written to disk: retried by the next run)."""
    record = base_record(unit)
    record["error"] = f"not finished: {reason}; rerun the same command to retry it"
    record["fusions"] = {name: {"error": record["error"]} for name in unit.method.fusion_names}
    record["lost"] = True
    return record


def execute(
    tasks: Sequence[UnitTask],
    *,
    workers: int = 1,
    scheduler: str | None = None,
    on_record: Callable[[dict[str, Any]], None],
    progress: bool = True,
) -> None:
    """Run ``tasks``; ``on_record`` receives each unit's record as its task finishes (in this process)."""
    if not tasks:
        return
    bar = _bar(sum(len(t.units) for t in tasks), progress)
    failed = 0

    def deliver(records: list[dict[str, Any]]) -> None:
        nonlocal failed
        for record in records:
            on_record(record)
            if record.get("error") or any(f.get("error") for f in record["fusions"].values()):
                failed += 1
                bar.set_postfix(failed=failed, refresh=False)
        bar.update(len(records))

    try:
        if scheduler:
            _execute_dask(tasks, scheduler, deliver)
        elif workers <= 1:
            for task in tasks:
                deliver(run_task(task))
        else:
            _execute_pool(tasks, workers, deliver)
    finally:
        bar.close()


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="evaluating", unit="case", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, mininterval=0.5)


def _execute_pool(tasks: Sequence[UnitTask], workers: int, deliver: Callable[[list[dict[str, Any]]], None]) -> None:
    from concurrent.futures.process import BrokenProcessPool

    threads = tasks[0].torch_threads or 1
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_worker_init,
                               initargs=(threads,))
    pending = {}
    try:
        for task in tasks:
            pending[pool.submit(run_task, task)] = task
        while pending:
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in done:
                task = pending.pop(future)
                try:
                    records = future.result()
                except BrokenProcessPool:
                    records = lost_records(task, "its worker process died (out of memory or killed?)")
                except Exception as exc:  # pickling problems and the like
                    records = lost_records(task, f"{type(exc).__name__}: {exc}")
                deliver(records)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _execute_dask(tasks: Sequence[UnitTask], scheduler: str, deliver: Callable[[list[dict[str, Any]]], None]) -> None:
    from spasem.errors import ConfigError

    try:
        from distributed import Client, as_completed
    except ImportError:
        raise ConfigError(f"--scheduler '{scheduler}': needs Dask distributed; install it with "
                          "pip install 'spasem[dask]'") from None

    try:
        client = Client(scheduler, timeout="30s", set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"--scheduler '{scheduler}': cannot connect to the Dask scheduler: {exc}") from None
    try:
        futures = {}
        for task in tasks:
            future = client.submit(run_task, task, pure=False)
            futures[future] = task
        for future in as_completed(list(futures), loop=client.loop):
            task = futures[future]
            try:
                records = future.result()
            except Exception as exc:  # KilledWorker, lost connection, ...
                records = lost_records(task, f"Dask: {type(exc).__name__}: {exc}")
            deliver(records)
    finally:
        client.close()


def write_record(results_dir: Path, record: dict[str, Any]) -> None:
    """Store a finished unit's record atomically (not for lost units)."""
    if record.get("lost"):
        return
    write_json(results_dir / record["key"], _json_safe(record))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def split_finished(units: Iterable[Unit], results_dir: Path, retry_failed: bool) -> tuple[list[dict], list[Unit]]:
    """(records of finished units, units still to run)."""
    finished, todo = [], []
    for unit in units:
        record = load_finished(results_dir, unit, retry_failed)
        if record is None:
            todo.append(unit)
        else:
            finished.append(record)
    return finished, todo
