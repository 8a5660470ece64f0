"""Registration alone on synthetic CT/MR phantoms: Dice of the warped support mask.

For subject pairs (k, k+1), k = 0 .. pairs-1, registers the CT of subject k to the MR of subject
k+1 and the MR of subject k to the CT of subject k+1, warps each support organ mask (linear, as
the spatial prior does before smoothing; kept where >= 0.5) into the query and prints its Dice
against the query's organ, per variant, with the seconds per pair (registration + 4 warps).

A variant is ``NAME=BACKEND`` or ``NAME=BACKEND:JSON-OPTIONS``::

    PYTHONPATH=. python benchmarks/bench_registration.py --pairs 4 \\
        --variant 'sitk=sitk' --variant 'sitk-norefine=sitk:{"refine": "none"}' \\
        --variant 'ants=ants' [--data /tmp/spasem-phantoms]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_classical import cohort_folder, ensure_cohort, load_pair  # noqa: E402

ORGANS = ("liver", "spleen", "left_kidney", "right_kidney")


def parse_variant(text: str) -> tuple[str, str, dict]:
    name, _, spec = text.partition("=")
    backend, _, options = spec.partition(":")
    if not name or not backend:
        raise SystemExit(f"--variant {text!r}: expected NAME=BACKEND[:JSON-OPTIONS]")
    return name, backend, json.loads(options) if options else {}


def run_variant(backend_name: str, options: dict, manifest, pairs: int) -> tuple[dict[str, list[float]], list[float]]:
    from spasem.core.backends import RunContext
    from spasem.core.metrics import dice
    from spasem.core.registry import get_registry

    cls = get_registry().get("registration", backend_name).cls
    cases = {c.id: c for c in manifest.cases}
    scores: dict[str, list[float]] = {}
    seconds: list[float] = []
    for k in range(pairs):
        for support_mod, query_mod in (("ct", "mr"), ("mr", "ct")):
            support, support_label, query, query_label = load_pair(manifest, cases, k, support_mod, query_mod)
            backend = cls(cls.Config(**options), RunContext())
            t = time.perf_counter()
            line = []
            for organ in ORGANS:
                label = manifest.label_names[organ]
                mask = support_label.with_array((support_label.array == label).astype(np.float32))
                transform = (backend.register(support, query, support_mask=mask) if backend.uses_support_mask
                             else backend.register(support, query))
                warped = transform.warp(mask, query_label.grid)
                d = dice(np.asarray(warped.array) >= 0.5, query_label.array == label)
                scores.setdefault(organ, []).append(d)
                line.append(f"{organ} {d:.3f}")
            seconds.append(time.perf_counter() - t)
            print(f"  {support_mod.upper()}->{query_mod.upper()} s{k} -> s{k + 1}  " + "  ".join(line)
                  + f"  ({seconds[-1]:.1f} s)", flush=True)
    return scores, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4, help="subject pairs (k, k+1) [4]")
    parser.add_argument("--data", type=Path, default=None,
                        help="phantom cohort folder (created) [/tmp/spasem-phantoms, with -seedS / -varV when not default]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variability", type=float, default=1.0,
                        help="phantom organ spread between subjects (`spasem phantoms --variability`) [1]")
    parser.add_argument("--variant", action="append", default=[], help="NAME=BACKEND[:JSON-OPTIONS] (repeatable)")
    args = parser.parse_args(argv)
    variants = [parse_variant(v) for v in (args.variant or ["sitk=sitk"])]
    manifest = ensure_cohort(cohort_folder(args), args.pairs + 1, args.seed, args.variability)
    rows = []
    for name, backend, options in variants:
        print(f"[{name}] {backend} {json.dumps(options)}", flush=True)
        scores, seconds = run_variant(backend, options, manifest, args.pairs)
        means = [float(np.mean(scores[o])) for o in ORGANS]
        rows.append(f"{name:<20}" + "".join(f"{v:>14.3f}" for v in means) + f"{np.mean(means):>8.3f}"
                    + f"{np.mean(seconds):>10.1f}{np.max(seconds):>8.1f}")
    print(f"\nwarped-mask Dice (mean over {2 * args.pairs} pairs, both directions)")
    print(f"{'variant':<20}" + "".join(f"{o:>14}" for o in ORGANS) + f"{'mean':>8}{'s/pair':>10}{'max':>8}")
    print("\n".join(rows))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
