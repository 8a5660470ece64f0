"""Shared checks of the evaluation end-to-end tests: run the CLI, read cases.csv, parse table.md
and recompute every cell from the per-case rows."""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from spasem.cli.main import cli

ORGAN_COLUMNS = {"liver": "Liver", "left_kidney": "LK", "right_kidney": "RK", "spleen": "Spleen"}


def invoke(*args: str) -> str:
    result = CliRunner().invoke(cli, ["evaluate", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def read_cases(out: Path) -> list[dict[str, str]]:
    with (out / "cases.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def parse_tables(text: str) -> dict[tuple[str, str, int], dict[str, list[str]]]:
    """(metric title, direction, shots) -> row label -> cells (Liver, LK, RK, Spleen, Mean)."""
    tables: dict = {}
    metric = block = None
    for line in text.splitlines():
        if line.startswith("## "):
            metric = line[3:].strip()
        elif line.startswith("### "):
            m = re.fullmatch(r"### (\S+), (\d+)-shot", line)
            assert m, line
            block = (metric, m.group(1), int(m.group(2)))
            tables[block] = {}
        elif line.startswith("| ") and block and not line.startswith("| Method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            tables[block][cells[0]] = cells[1:]
    return tables


def expected_cell(rows: list[dict[str, str]], column: str, scale: float) -> tuple[str, float | None]:
    by_query = defaultdict(list)
    for row in rows:
        if row[column] != "":
            by_query[row["query"]].append(float(row[column]))
    means = [np.mean(v) for v in by_query.values()]
    if not means:
        return "-", None
    std = np.std(means, ddof=1) if len(means) > 1 else 0.0
    return f"{np.mean(means) * scale:.1f} ± {std * scale:.1f}", float(np.mean(means))



def check_protocol_outputs(out: Path, method: str, fusions: list[str], queries: int = 3) -> None:
    """The outputs of a CT->MRI run (3 MR queries, every organ, k in {1, 2}, 2 draws) agree with
    the protocol and with each other: rows, draws, shared supports, registrations once per pair,
    every table cell recomputed from cases.csv, summary.json, plots, cache."""
    rows = read_cases(out)
    # one row per query, organ, shots, draw and fusion
    keys = {(r["query"], r["organ"], r["shots"], r["draw"], r["fusion"]) for r in rows}
    assert len(rows) == len(keys) == queries * 4 * 2 * 2 * len(fusions)
    assert {r["direction"] for r in rows} == {"CT->MRI"}
    assert all(r["error"] == "" and r["dice"] != "" and float(r["seconds"]) > 0 for r in rows)
    by_draw = {}
    for r in rows:
        supports = r["supports"].split(";")
        assert len(supports) == int(r["shots"])
        assert all(s.endswith("_ct") and s[:4] != r["query"][:4] for s in supports)  # other subjects' CTs
        by_draw.setdefault((r["query"], r["organ"], r["draw"]), {})[int(r["shots"])] = supports
    for draws in by_draw.values():
        assert draws[2][:1] == draws[1]
    # every case holds every organ, so the organs of a draw share supports and run as one task:
    # each (support, query) pair is registered at most once per task, not once per organ (pairs
    # met before are found in the disk cache as warped masks and not registered at all)
    for r in rows:
        assert by_draw[(r["query"], r["organ"], r["draw"])] == by_draw[(r["query"], "liver", r["draw"])]
    per_task = defaultdict(int)
    for path in (out / "results").rglob("*.json"):
        record = json.loads(path.read_text())
        per_task[(record["query"], record["shots"], record["draw"])] += record["registrations"]["computed"]
    assert all(n <= shots for (_, shots, _), n in per_task.items())
    assert sum(per_task.values()) >= queries * 2  # 2 eligible CT supports per query, each registered at least once
    tables = parse_tables((out / "table.md").read_text())
    assert set(tables) == {(m, "CT->MRI", k) for m in ("Dice 3D (%)", "Dice 2D (%)", "HD95 (mm)") for k in (1, 2)}
    for (metric, direction, shots), table in tables.items():
        column, scale = {"Dice 3D (%)": ("dice", 100.0), "Dice 2D (%)": ("dice_2d", 100.0), "HD95 (mm)": ("hd95", 1.0)}[metric]
        assert list(table) == [f"{method} / {f}" for f in fusions]
        for label, cells in table.items():
            fusion = label.split(" / ")[1]
            organ_means = []
            for n, organ in enumerate(ORGAN_COLUMNS):
                mine = [r for r in rows if r["fusion"] == fusion and r["organ"] == organ and int(r["shots"]) == shots]
                text, mean = expected_cell(mine, column, scale)
                assert cells[n] == text, (metric, shots, label, organ)
                organ_means.append(mean)
            assert cells[4] == f"{np.mean(organ_means) * scale:.1f}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["units"] == queries * 4 * 2 * 2 and summary["counts"]["failed_rows"] == 0
    group = next(g for g in summary["groups"] if g["organ"] == "liver" and g["shots"] == 1 and g["fusion"] == fusions[0])
    mine = [r for r in rows if r["fusion"] == fusions[0] and r["organ"] == "liver" and r["shots"] == "1"]
    assert group["dice"]["mean"] == pytest.approx(expected_cell(mine, "dice", 1.0)[1])
    assert group["dice"]["n"] == queries
    for name in ["dice_vs_shots.png", *(f"boxplot_{method}_{f}.png" for f in fusions)]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the stage cache holds registrations, prototypes and query features for reruns and other shots
    assert {p.name for p in (out / "cache").iterdir()} >= {"warp", "prototypes", "query_features"}
