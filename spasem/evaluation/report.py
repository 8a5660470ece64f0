"""From unit records to the outputs: ``cases.csv``, ``summary.json``, ``table.md`` and plots.

Aggregation rule (tables, summary, plots): for each (direction, shots, method, fusion, organ),
every query's draws are averaged first (failed draws left out), then the mean and the sample
standard deviation (ddof = 1; 0 for a single query) are taken across queries. The table's
``Mean`` column is the mean of its organ columns. Dice is shown in percent, HD95 in mm.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from spasem.data.labelmaps import ORGAN_COLUMNS, ORGANS
from spasem.evaluation.files import atomic_open

METRICS: dict[str, str] = {"dice": "Dice 3D (%)", "dice_2d": "Dice 2D (%)", "hd95": "HD95 (mm)"}
#: the paper's order of directions; others follow alphabetically
DIRECTION_ORDER = ("CT->MRI", "MRI->CT", "MRI->MRI", "CT->CT")
#: preferred order of the per-stage timing columns of cases.csv
STAGE_ORDER = ("load", "resample", "register", "warp", "spatial_prior", "encode", "semantic_prior", "fuse", "decode", "paste")
BASE_COLUMNS = ("direction", "method", "fusion", "query", "query_modality", "subject", "organ", "shots", "draw",
                "supports", "dice", "dice_2d", "hd95", "seconds")


def _direction_key(direction: str) -> tuple[int, str]:
    return (DIRECTION_ORDER.index(direction) if direction in DIRECTION_ORDER else len(DIRECTION_ORDER), direction)


def case_rows(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (unit, fusion), sorted; metric values None where failed/undefined."""
    rows = []
    for record in records:
        for fusion, entry in record["fusions"].items():
            error = entry.get("error") or None
            row = {
                "direction": record["direction"], "method": record["method"], "fusion": fusion,
                "query": record["query"], "query_modality": record.get("query_modality"), "subject": record.get("subject"),
                "organ": record["organ"], "shots": int(record["shots"]), "draw": int(record["draw"]),
                "supports": ";".join(record["supports"]),
                "dice": None if error else entry.get("dice"), "dice_2d": None if error else entry.get("dice_2d"),
                "hd95": None if error else entry.get("hd95"), "seconds": None if error else entry.get("seconds"),
                "error": error,
            }
            for stage, seconds in (entry.get("timings") or {}).items():
                row[f"t_{stage}"] = seconds
            rows.append(row)
    organ_rank = {o: n for n, o in enumerate(ORGANS)}
    rows.sort(key=lambda r: (_direction_key(r["direction"]), r["shots"], r["method"], r["fusion"], r["query"],
                             organ_rank.get(r["organ"], 99), r["organ"], r["draw"]))
    return rows


def _format_csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if not math.isfinite(value) else repr(value)
    return str(value)


def cases_csv(rows: Sequence[dict[str, Any]]) -> str:
    """``cases.csv`` text: the base columns, ``t_<stage>`` seconds per stage, then ``error``."""
    stages = sorted({k[2:] for r in rows for k in r if k.startswith("t_")},
                    key=lambda s: (STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER), s))
    columns = [*BASE_COLUMNS, *(f"t_{s}" for s in stages), "error"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_format_csv_value(row.get(c)) for c in columns])
    return out.getvalue()


def _stats(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0, "n": int(arr.size)}


def per_query_means(rows: Sequence[dict[str, Any]], metric: str) -> dict[str, float]:
    """query -> mean of ``metric`` over its draws that have a value."""
    by_query: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        if row.get(metric) is not None:
            by_query[row["query"]].append(float(row[metric]))
    return {q: float(np.mean(v)) for q, v in by_query.items() if v}


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Statistics per (direction, shots, method, fusion, organ)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["direction"], row["shots"], row["method"], row["fusion"], row["organ"])].append(row)
    out = []
    for (direction, shots, method, fusion, organ), members in groups.items():
        entry: dict[str, Any] = {"direction": direction, "shots": shots, "method": method, "fusion": fusion, "organ": organ,
                                 "cases": len(members), "failed": sum(1 for r in members if r["error"])}
        for metric in METRICS:
            entry[metric] = _stats(list(per_query_means(members, metric).values()))
        entry["hd95"]["undefined"] = sum(1 for r in members if not r["error"] and r.get("hd95") is None)
        entry["seconds"] = _stats([float(r["seconds"]) for r in members if r.get("seconds") is not None])
        out.append(entry)
    organ_rank = {o: n for n, o in enumerate(ORGANS)}
    out.sort(key=lambda e: (_direction_key(e["direction"]), e["shots"], e["method"], e["fusion"], organ_rank.get(e["organ"], 99)))
    return out


def _cell(stats: dict[str, Any] | None, metric: str) -> str:
    if not stats or stats.get("mean") is None:
        return "-"
    scale = 100.0 if metric.startswith("dice") else 1.0
    return f"{stats['mean'] * scale:.1f} ± {stats['std'] * scale:.1f}"


def method_label(method: str, fusion: str) -> str:
    return f"{method} / {fusion}"


def markdown_tables(groups: Sequence[dict[str, Any]], header: str = "",
                    row_order: Sequence[tuple[str, str]] | None = None) -> str:
    """``table.md``: per metric, one table per (direction, shots) in the paper's layout; rows
    (method, fusion) in ``row_order`` (default: as they come in ``groups``)."""
    lines = ["# spasem evaluation", ""]
    if header:
        lines += [header, ""]
    lines += [
        "Each cell: mean ± std across queries (each query first averaged over its draws; failed draws left out). "
        "Dice in %, HD95 in mm. Mean: the mean of the organ columns. See cases.csv for every case.",
        "",
    ]
    index = {(g["direction"], g["shots"], g["method"], g["fusion"], g["organ"]): g for g in groups}
    blocks = sorted({(g["direction"], g["shots"]) for g in groups}, key=lambda b: (_direction_key(b[0]), b[1]))
    rows_order = list(dict.fromkeys([*(row_order or []), *((g["method"], g["fusion"]) for g in groups)]))
    columns = [ORGAN_COLUMNS[o] for o in ORGANS]
    for metric, title in METRICS.items():
        lines += [f"## {title}", ""]
        for direction, shots in blocks:
            lines += [f"### {direction}, {shots}-shot", ""]
            lines.append("| Method / fusion | " + " | ".join(columns) + " | Mean |")
            lines.append("|---|" + "---|" * (len(columns) + 1))
            failed: list[str] = []
            undefined: list[str] = []
            for method, fusion in rows_order:
                cells, means = [], []
                present = False
                n_failed = n_cases = n_undefined = 0
                for organ in ORGANS:
                    g = index.get((direction, shots, method, fusion, organ))
                    present = present or g is not None
                    stats = g[metric] if g else None
                    cells.append(_cell(stats, metric))
                    if stats and stats.get("mean") is not None:
                        means.append(stats["mean"])
                    if g:
                        n_failed += g["failed"]
                        n_cases += g["cases"]
                        n_undefined += g["hd95"].get("undefined", 0)
                if not present:
                    continue
                scale = 100.0 if metric.startswith("dice") else 1.0
                mean = f"{np.mean(means) * scale:.1f}" if means else "-"
                lines.append(f"| {method_label(method, fusion)} | " + " | ".join(cells) + f" | {mean} |")
                if n_failed:
                    failed.append(f"{method_label(method, fusion)} {n_failed} of {n_cases}")
                if n_undefined and metric == "hd95":
                    undefined.append(f"{method_label(method, fusion)} {n_undefined} of {n_cases}")
            lines.append("")
            if failed:
                lines += [f"Failed cases, left out: {'; '.join(failed)} (see the error column of cases.csv).", ""]
            if undefined:
                lines += [f"HD95 undefined (empty prediction), left out: {'; '.join(undefined)}.", ""]
    return "\n".join(lines).rstrip() + "\n"


# ------------------------------------------------------------------------------------------
# plots
# ------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: Path) -> Path:
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png", bbox_inches="tight")
    return path


def plot_dice_vs_shots(groups: Sequence[dict[str, Any]], organs: Sequence[str], path: Path,
                       row_order: Sequence[tuple[str, str]] | None = None) -> Path:
    """Mean Dice 3D (± std across queries) against the number of supports k: one panel per
    (direction, organ), one line per method / fusion."""
    directions = sorted({g["direction"] for g in groups}, key=_direction_key)
    fig = _figure(3.2 * len(organs), 2.8 * max(1, len(directions)))
    axes = fig.subplots(max(1, len(directions)), len(organs), squeeze=False)
    lines = list(dict.fromkeys([*(row_order or []), *((g["method"], g["fusion"]) for g in groups)]))
    all_shots = sorted({g["shots"] for g in groups})
    for r, direction in enumerate(directions):
        for c, organ in enumerate(organs):
            ax = axes[r][c]
            for method, fusion in lines:
                pts = sorted((g["shots"], g["dice"]["mean"], g["dice"]["std"]) for g in groups
                             if g["direction"] == direction and g["organ"] == organ and g["method"] == method
                             and g["fusion"] == fusion and g["dice"]["mean"] is not None)
                if pts:
                    x, y, e = zip(*pts)
                    ax.errorbar(x, np.asarray(y) * 100, yerr=np.asarray(e) * 100, marker="o", capsize=3,
                                label=method_label(method, fusion))
            ax.set_xscale("log", base=2)
            ax.set_xticks(all_shots)
            ax.set_xticklabels([str(k) for k in all_shots])
            ax.set_ylim(0, 100)
            ax.set_title(f"{direction}: {ORGAN_COLUMNS.get(organ, organ)}", fontsize=10)
            ax.set_xlabel("supports (k)")
            if c == 0:
                ax.set_ylabel("Dice 3D (%)")
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), bbox_to_anchor=(0.5, -0.02 - 0.03 * (len(labels) // 4)))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return _save_png(fig, path)


def plot_boxes(rows: Sequence[dict[str, Any]], organs: Sequence[str], method: str, fusion: str, path: Path) -> Path:
    """Box plot of per-query Dice 3D (draws averaged) for one method / fusion: one panel per
    direction, boxes per organ and number of supports."""
    mine = [r for r in rows if r["method"] == method and r["fusion"] == fusion]
    directions = sorted({r["direction"] for r in mine}, key=_direction_key)
    all_shots = sorted({r["shots"] for r in mine})
    fig = _figure(max(4.0, 0.55 * len(organs) * len(all_shots) + 1.5), 3.0 * max(1, len(directions)))
    axes = fig.subplots(max(1, len(directions)), 1, squeeze=False)
    colours = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860"]
    for r, direction in enumerate(directions):
        ax = axes[r][0]
        data, positions, ticks, labels = [], [], [], []
        pos = 0.0
        for organ in organs:
            start = pos
            for n, k in enumerate(all_shots):
                subset = [x for x in mine if x["direction"] == direction and x["organ"] == organ and x["shots"] == k]
                values = [v * 100 for v in per_query_means(subset, "dice").values()]
                data.append(values)
                positions.append(pos)
                pos += 1.0
            ticks.append((start + pos - 1) / 2)
            labels.append(ORGAN_COLUMNS.get(organ, organ))
            pos += 0.8
        parts = ax.boxplot([d if d else [np.nan] for d in data], positions=positions, widths=0.7, patch_artist=True,
                           showmeans=True)
        for n, box in enumerate(parts["boxes"]):
            box.set_facecolor(colours[(n % len(all_shots)) % len(colours)])
            box.set_alpha(0.7)
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels)
        ax.set_ylim(0, 100)
        ax.set_ylabel("Dice 3D (%) per query")
        ax.set_title(f"{method_label(method, fusion)}, {direction}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if len(all_shots) > 1:
            from matplotlib.patches import Patch

            ax.legend(handles=[Patch(facecolor=colours[n % len(colours)], alpha=0.7, label=f"k={k}")
                               for n, k in enumerate(all_shots)], fontsize=8, loc="lower right")
    fig.tight_layout()
    return _save_png(fig, path)
