"""``evaluate()``: the whole protocol — read and check the datasets, plan the draws, run the
units (parallel, resumable), aggregate and write the outputs.

Output folder layout::

    DIR/cases.csv            one row per (query, organ, shots, draw, method / fusion)
    DIR/summary.json         run parameters, counts, statistics per table cell
    DIR/table.md             the paper's tables (per metric, direction and shots)
    DIR/dice_vs_shots.png    Dice vs number of supports, per direction and organ
    DIR/boxplot_<method>_<fusion>.png
    DIR/results/...json      one record per finished unit (what makes a rerun resume)
    DIR/cache/               stage cache (registrations, prototypes, query features)
    DIR/predictions/         predicted masks (with save_predictions)
    DIR/inventory.json       label ids present per label file (speeds up the checks of a rerun)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from spasem.core.progress import Progress
from spasem.data.manifest import Manifest, read_manifest
from spasem.errors import ConfigError, OutputError
from spasem.evaluation import report
from spasem.evaluation.datasets import case_refs, check_datasets
from spasem.evaluation.files import write_json, write_text
from spasem.evaluation.protocol import Method, _safe, plan_units
from spasem.evaluation.runner import default_workers, execute, split_finished, write_record
from spasem.evaluation.worker import UnitTask


def build_methods(
    presets: Sequence[str | None],
    *,
    fusions: Sequence[str] = (),
    layers: Sequence[Mapping[str, Any]] = (),
    registry=None,
) -> list[Method]:
    """One :class:`Method` per preset (None, or ``default`` unless a plugin registers a preset of
    that name: the default configuration), each with ``layers`` (config file, ``--set`` options,
    flags) on top, and the fusion strategies to compare (default: the configuration's own
    fusion). Every backend name and option is checked here."""
    from spasem.core.config import StageConfig, build_config
    from spasem.core.registry import get_registry

    registry = registry or get_registry()
    methods = []
    for preset in presets:
        if preset == "default" and preset not in registry.presets:
            preset = None
        base = registry.preset(preset).config if preset else {}
        config = build_config(base, *layers, source=f"configuration of preset '{preset}'" if preset else "configuration")
        for kind in ("registration", "encoder", "fusion", "decoder"):
            stage = getattr(config, kind)
            registry.get(kind, stage.name).cls.parse_options(stage.options)
        stages = [StageConfig(name=f) for f in fusions] if fusions else [config.fusion]
        for stage in stages:
            registry.get("fusion", stage.name).cls.parse_options(stage.options)
        methods.append(Method(preset or "default", config.model_dump(mode="json"),
                              tuple(s.model_dump(mode="json") for s in stages)))
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ConfigError(f"--preset lists a preset twice: {', '.join(names)}")
    return methods


@dataclass
class Outcome:
    """What :func:`evaluate` did: counts and the files it wrote."""

    out: Path
    units: int
    skipped_finished: int
    ran: int
    failed_rows: int
    lost: int
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out '{out}': exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--out '{out}': cannot create the folder: {exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"--out '{out}': folder is not writable")


def load_manifest(path: Path, label_map: Mapping[str, int] | None, modality: str | None) -> Manifest:
    manifest = read_manifest(path, dict(label_map) if label_map is not None else None)
    return manifest.filter(modality)


def evaluate(
    *,
    supports: Path,
    queries: Path | None,
    out: Path,
    methods: Sequence[Method],
    organs: Sequence[str],
    shots: Sequence[int] = (1,),
    draws: int = 5,
    seed: int = 0,
    support_modality: str | None = None,
    query_modality: str | None = None,
    support_label_map: Mapping[str, int] | None = None,
    query_label_map: Mapping[str, int] | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    save_predictions: bool = False,
    retry_failed: bool = False,
    use_cache: bool = True,
    progress: bool = True,
) -> Outcome:
    """Run the protocol and write the outputs under ``out`` (see the module docstring).

    :param queries: the query manifest; None: the support manifest (uni-modal, a query is never
        its own support).
    :raises DatasetError: every problem found in the datasets, before any compute.
    """
    t_start = time.perf_counter()
    messages = Progress(enabled=progress)
    if draws < 1:
        raise ConfigError(f"--draws {draws}: expected at least 1")
    if not shots or min(shots) < 1:
        raise ConfigError(f"--shots {','.join(map(str, shots))}: expected positive numbers of supports")
    shots = sorted(set(int(k) for k in shots))
    queries = queries or supports
    same_file = Path(queries).resolve() == Path(supports).resolve()
    if query_label_map is None and same_file:
        query_label_map = support_label_map
    support_manifest = load_manifest(supports, support_label_map, support_modality)
    query_manifest = load_manifest(queries, query_label_map, query_modality)
    _prepare_out(out)
    support_refs, problems = case_refs(support_manifest, organs, f"{'' if same_file else 'support '}manifest '{supports}'")
    query_refs, more = case_refs(query_manifest, organs, f"{'' if same_file else 'query '}manifest '{queries}'")
    problems += [p for p in more if p not in problems]
    n_workers = 1 if scheduler else max(1, workers if workers is not None else default_workers())
    present = check_datasets(support_refs, query_refs, organs, shots, problems=problems,
                             inventory=out / "inventory.json", workers=n_workers, progress=messages)
    plan = plan_units(methods, support_refs, query_refs, organs, shots, draws, seed, present)
    results_dir = out / "results"
    finished, todo = split_finished(plan.units, results_dir, retry_failed)
    run_info = {
        "supports": str(supports), "queries": str(queries), "support_modality": support_modality,
        "query_modality": query_modality, "organs": list(organs), "shots": shots, "draws": draws, "seed": seed,
        "methods": [{"name": m.name, "config": m.config, "fusions": list(m.fusions)} for m in methods],
        "support_cases": len(support_refs), "query_cases": len(query_refs),
    }
    write_json(out / "run.json", run_info)
    cores = os.cpu_count() or 1
    active = max(1, min(n_workers, len(plan.groups(todo))))
    messages.message(
        f"{len(plan.units)} case(s) = queries x organs x shots x draws x methods "
        f"({len(query_refs)} x {len(organs)} x {len(shots)} x {draws} x {len(methods)} x support modalities, minus "
        f"{len(plan.skipped)} query/organ pair(s) without the organ), each scored with "
        f"{', '.join(sorted({f for m in methods for f in m.fusion_names}))}; {len(finished)} already finished, "
        f"{len(todo)} to run"
        + (f" on {scheduler}" if scheduler and todo else f" with {active} worker(s)" if todo else "")
    )
    tasks = [
        UnitTask(group, cache_dir=str(out / "cache") if use_cache else None,
                 predictions_dir=str(out / "predictions") if save_predictions else None,
                 torch_threads=1 if scheduler else (max(1, cores // active) if active > 1 else None),
                 parent_pid=os.getpid())
        for group in plan.groups(todo)
    ]
    new_records: list[dict[str, Any]] = []

    def on_record(record: dict[str, Any]) -> None:
        write_record(results_dir, record)
        new_records.append(record)

    execute(tasks, workers=active, scheduler=scheduler, on_record=on_record, progress=progress)

    records = finished + new_records
    rows = report.case_rows(records)
    groups = report.aggregate(rows)
    files = [write_text(out / "cases.csv", report.cases_csv(rows))]
    lost = sum(1 for r in new_records if r.get("lost"))
    summary = {
        "run": run_info,
        "counts": {
            "units": len(plan.units), "already_finished": len(finished), "ran": len(new_records), "lost": lost,
            "rows": len(rows), "failed_rows": sum(1 for r in rows if r["error"]),
        },
        "skipped": plan.skipped,
        "groups": groups,
        "seconds": time.perf_counter() - t_start,
    }
    write_json(out / "summary.json", summary)
    files.append(out / "summary.json")
    header = (f"Supports: `{supports}`{f' ({support_modality})' if support_modality else ''}, {len(support_refs)} case(s); "
              f"queries: `{queries}`{f' ({query_modality})' if query_modality else ''}, {len(query_refs)} case(s); "
              f"{draws} draw(s) per query, seed {seed}.")
    row_order = [(m.name, f) for m in methods for f in m.fusion_names]
    files.append(write_text(out / "table.md", report.markdown_tables(groups, header, row_order)))
    if groups:
        files.append(report.plot_dice_vs_shots(groups, organs, out / "dice_vs_shots.png", row_order))
        for method in methods:
            for fusion in method.fusion_names:
                if any(r["method"] == method.name and r["fusion"] == fusion for r in rows):
                    files.append(report.plot_boxes(rows, organs, method.name, fusion,
                                                   out / f"boxplot_{_safe(method.name)}_{_safe(fusion)}.png"))
    return Outcome(out=out, units=len(plan.units), skipped_finished=len(finished), ran=len(new_records),
                   failed_rows=summary["counts"]["failed_rows"], lost=lost, files=files,
                   seconds=time.perf_counter() - t_start)
