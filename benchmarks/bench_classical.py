"""Benchmark of the weight-free ``classical`` configuration on synthetic CT/MR phantoms.

For subject pairs (k, k+1), k = 0 .. pairs-1, segments each organ of the MR of subject k+1 from
the CT of subject k (CT->MR) and the CT of subject k+1 from the MR of subject k (MR->CT), with
every fusion strategy (the priors are computed once per query and organ, then fused and decoded
per strategy: ``Engine.run_fusions``). Prints Dice per direction, fusion and organ, and seconds
per query (one organ, all stages, the four fusions included).

``--ablation`` also runs the same backends with the paper's priors (support prototypes, the
paper's P_sim and entropy: every ``priors`` option off) to show what the query-adaptive options
bring.

``--cut-query KEEP`` cuts each query along its slice axis so that only the upper KEEP fraction of
the organ (and everything above it) remains: a partial field of view, as an upper-abdominal MR.

``--variability V`` uses phantoms whose organs differ V times as much between subjects
(:func:`spasem.data.phantoms.make_anatomy`): 2-3 brings registration alone down towards what it
reaches between real patients, where the other stages have to earn their place.

Usage::

    PYTHONPATH=. python benchmarks/bench_classical.py --pairs 4 [--ablation] [--cut-query 0.5] [--variability 2.5]
        [--set priors.semantic_reach_mm=10 ...]   (any configuration field, as ``spasem run --set``)
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

FUSIONS = ("spatial_only", "semantic_only", "mean", "entropy_gate")


def cohort_folder(args) -> Path:
    """``args.data``, or ``/tmp/spasem-<cohort name>`` (one folder per seed and variability)."""
    from spasem.data.phantoms import cohort_name

    return args.data if args.data is not None else Path("/tmp") / f"spasem-{cohort_name(args.seed, args.variability)}"


def ensure_cohort(data: Path, subjects: int, seed: int, variability: float = 1.0) -> "object":
    """The phantom cohort in ``data``; (re)generated unless it has these subjects and was made
    with this seed and variability (the manifest's dataset name)."""
    from spasem.data.manifest import read_manifest
    from spasem.data.phantoms import cohort_name, write_cohort

    manifest_path = data / "manifest.json"
    if manifest_path.is_file():
        manifest = read_manifest(manifest_path)
        have = {c.id for c in manifest.cases}
        if manifest.dataset == cohort_name(seed, variability) and all(
                f"s{s:03d}_{m}" in have for s in range(subjects) for m in ("ct", "mr")):
            return manifest
    t = time.perf_counter()
    write_cohort(data, subjects, ("ct", "mr"), seed, variability=variability)
    print(f"generated {subjects} subjects x 2 modalities in {time.perf_counter() - t:.0f} s -> {data}", flush=True)
    return read_manifest(manifest_path)


def load_pair(manifest, cases: dict, k: int, support_mod: str, query_mod: str):
    """``(support, support_label, query, query_label)``: the ``support_mod`` scan of subject ``k``
    and the ``query_mod`` scan of subject ``k + 1``."""
    from spasem.core.io import load

    s_case, q_case = cases[f"s{k:03d}_{support_mod}"], cases[f"s{k + 1:03d}_{query_mod}"]
    return (load(manifest.image_path(s_case), modality=s_case.modality), load(manifest.label_path(s_case), is_label=True),
            load(manifest.image_path(q_case), modality=q_case.modality), load(manifest.label_path(q_case), is_label=True))


def cut_above(query, query_label, label: int, keep: float):
    """A partial field of view: ``query`` and its labels cut along the slice axis (phantom k points
    superior) so that only the upper ``keep`` fraction of the organ ``label`` (and everything above
    it) remains."""
    from spasem.core.volume import Volume

    k = np.nonzero((np.asarray(query_label.array) == label).any(axis=(0, 1)))[0]
    cut = int(round(k.max() - keep * (k.max() - k.min())))
    grid = query.grid.subgrid((0, 0, cut), (*query.shape[:2], query.shape[2] - cut))
    return (Volume(np.ascontiguousarray(query.array[:, :, cut:]), grid, name=query.name, modality=query.modality),
            Volume(np.ascontiguousarray(query_label.array[:, :, cut:]), grid, is_label=True, name=query_label.name))


def run(config_layers: list[dict], name: str, manifest, pairs: int, organs: list[str], keep: float | None = None) -> dict:
    from spasem.core.config import build_config
    from spasem.core.metrics import dice
    from spasem.core.pipeline import Engine, Support

    cases = {c.id: c for c in manifest.cases}
    engine = Engine(build_config(*config_layers))
    scores: dict[tuple[str, str, str], list[float]] = {}
    seconds: dict[str, list[float]] = {}
    for k in range(pairs):
        for support_mod, query_mod in (("ct", "mr"), ("mr", "ct")):
            direction = f"{support_mod.upper()}->{query_mod.upper()}"
            support, support_label, query, query_label = load_pair(manifest, cases, k, support_mod, query_mod)
            for organ in organs:
                label = manifest.label_names[organ]
                engine.config = build_config(*config_layers, {"label": label})
                organ_query, organ_truth = (query, query_label) if keep is None else cut_above(query, query_label, label, keep)
                t = time.perf_counter()
                results = engine.run_fusions([Support(support, support_label)], organ_query, FUSIONS)
                seconds.setdefault(direction, []).append(time.perf_counter() - t)
                line = []
                for fusion, result in results.items():
                    d = dice(result.mask.array, organ_truth.array == label)
                    scores.setdefault((direction, fusion, organ), []).append(d)
                    line.append(f"{fusion} {d:.3f}")
                print(f"  [{name}] {direction} s{k} -> s{k + 1} {organ:<13} " + "  ".join(line)
                      + f"  ({seconds[direction][-1]:.1f} s)", flush=True)
    return {"scores": scores, "seconds": seconds}


def table(name: str, out: dict, organs: list[str]) -> str:
    lines = [f"\n{name}: Dice (mean over subject pairs)",
             f"{'direction':<9} {'fusion':<14}" + "".join(f"{o:>14}" for o in organs) + f"{'mean':>8}"]
    scores = out["scores"]
    directions = sorted({d for d, _, _ in scores})
    for direction in directions + ["both"]:
        for fusion in FUSIONS:
            row = []
            for organ in organs:
                values = [v for (d, f, o), vs in scores.items() if f == fusion and o == organ
                          and (direction == "both" or d == direction) for v in vs]
                row.append(float(np.mean(values)))
            lines.append(f"{direction:<9} {fusion:<14}" + "".join(f"{v:>14.3f}" for v in row) + f"{np.mean(row):>8.3f}")
    per_query = [s for v in out["seconds"].values() for s in v]
    lines.append(f"seconds per query (one organ, 4 fusions): mean {np.mean(per_query):.1f}, "
                 f"min {np.min(per_query):.1f}, max {np.max(per_query):.1f} (n={len(per_query)}; the first query of a "
                 "pair includes the registration)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4, help="subject pairs (k, k+1) [4]")
    parser.add_argument("--organs", default="liver,spleen,left_kidney,right_kidney")
    parser.add_argument("--data", type=Path, default=None,
                        help="phantom cohort folder (created) [/tmp/spasem-phantoms, with -seedS / -varV when not default]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variability", type=float, default=1.0,
                        help="phantom organ spread between subjects (`spasem phantoms --variability`) [1]")
    parser.add_argument("--ablation", action="store_true", help="also run the paper's priors with the same backends")
    parser.add_argument("--json", type=Path, default=None, help="write all Dice values here")
    parser.add_argument("--cut-query", type=float, default=None, metavar="KEEP",
                        help="partial fields of view: cut each query so that only the upper KEEP fraction (0-1) of the "
                        "organ remains (one registration per organ); Dice within the cut field of view")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="configuration field over the classical preset, as `spasem run --set` (repeatable)")
    args = parser.parse_args(argv)

    from spasem.cli.options import parse_set_options
    from spasem.core.config import CLASSICAL, PAPER_PRIORS

    if args.cut_query is not None and not 0 < args.cut_query <= 1:
        parser.error(f"--cut-query {args.cut_query}: expected a fraction in (0, 1]")
    organs = [o.strip() for o in args.organs.split(",") if o.strip()]
    manifest = ensure_cohort(cohort_folder(args), args.pairs + 1, args.seed, args.variability)
    overrides = parse_set_options(args.assignments)
    runs = {"classical (default)" if not overrides else f"classical + {' '.join(args.assignments)}": [CLASSICAL, overrides]}
    if args.ablation:
        runs["paper priors, same backends"] = [CLASSICAL, overrides, {"priors": PAPER_PRIORS}]
    t0 = time.perf_counter()
    if args.variability != 1.0:
        runs = {f"{name}, phantom variability {args.variability:g}": layers for name, layers in runs.items()}
    if args.cut_query is not None:
        runs = {f"{name}, queries cut to the upper {args.cut_query:g} of the organ": layers for name, layers in runs.items()}
    outputs = {name: run(layers, name, manifest, args.pairs, organs, args.cut_query) for name, layers in runs.items()}
    for name, out in outputs.items():
        print(table(name, out, organs))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; peak RSS {peak:.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps({name: {"|".join(k): v for k, v in out["scores"].items()}
                                         for name, out in outputs.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
