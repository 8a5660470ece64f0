"""``spasem evaluate`` end to end through the CLI on a small synthetic cohort (tests/cohort.py:
3 CT + 3 MR subjects, k in {1, 2}, 2 draws): tables checked against cases.csv, resume, failures,
Dask, preset grids. The same protocol on ``spasem phantoms``: test_evaluate_phantoms.py."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from tests.cohort import write_cohort
from tests.evaluation_helpers import check_protocol_outputs, expected_cell, invoke, parse_tables, read_cases
from spasem.core.io import load
from spasem.core.metrics import dice

CHEAP = ["--set", "window.size=32", "--set", "window.spacing_mm=3", "-q"]
#: the protocol's mechanics are checked with the cheapest backends (the default, weight-free
#: 'classical' preset on phantoms: test_evaluate_phantoms.py)
BASIC = ["--preset", "basic"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return write_cohort(tmp_path_factory.mktemp("cohort"), subjects=3)


@pytest.fixture(scope="module")
def protocol_run(cohort, tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("eval") / "out"
    args = ["--supports", str(cohort), "--support-modality", "CT", "--queries", str(cohort), "--query-modality", "MR",
            "--out", str(out), "--shots", "1,2", "--draws", "2", "--fusion", "entropy_gate,mean", "--workers", "2", *BASIC, *CHEAP]
    invoke(*args)
    return out, args


@pytest.mark.slow
def test_protocol_tables_match_the_cases(protocol_run):
    check_protocol_outputs(protocol_run[0], "basic", ["entropy_gate", "mean"])


@pytest.mark.slow
def test_rerun_skips_finished_cases_and_recomputes_missing_ones(protocol_run):
    out, args = protocol_run
    table = (out / "table.md").read_text()
    cases = (out / "cases.csv").read_text()
    results = sorted((out / "results").rglob("*.json"))
    assert len(results) == 48
    stamps = {p: p.stat().st_mtime_ns for p in results}
    output = invoke(*[a for a in args if a != "-q"])
    assert "48 already finished, 0 run now" in output
    assert all(p.stat().st_mtime_ns == stamps[p] for p in results)
    assert (out / "table.md").read_text() == table
    assert (out / "cases.csv").read_text() == cases
    # losing three results (an interrupted run): only those run again, with the same numbers
    for path in results[:3]:
        path.unlink()
    output = invoke(*[a for a in args if a != "-q"], "--workers", "1")
    assert "45 already finished, 3 run now" in output
    assert (out / "table.md").read_text() == table
    metrics = lambda text: [r[:13] for r in csv.reader(text.splitlines())]  # noqa: E731  (no timings)
    assert metrics((out / "cases.csv").read_text()) == metrics(cases)


def test_failed_cases_are_recorded_and_do_not_stop_the_others(tmp_path):
    # s001_ct lies 5 m away: with the identity registration its mask misses every query. With 2
    # shots, the queries s000_mr and s002_mr always get it (their pools are {s001_ct, s00x_ct}),
    # s001_mr never (its own subject is excluded).
    manifest = write_cohort(tmp_path / "cohort", subjects=3, shift_mm={"s001_ct": (5000.0, 0.0, 0.0)})
    out = tmp_path / "out"
    args = ["--supports", str(manifest), "--support-modality", "CT", "--queries", str(manifest), "--query-modality", "MR",
            "--out", str(out), "--organs", "liver", "--shots", "2", "--draws", "2", "--fusion", "spatial_only,mean",
            "--workers", "1", "--set", "registration.name=identity", *CHEAP]
    invoke(*args)
    rows = read_cases(out)
    assert len(rows) == 3 * 2 * 2
    for r in rows:
        if r["query"] != "s001_mr":
            assert "PipelineError" in r["error"] and "outside the query's field of view" in r["error"]
            assert r["dice"] == r["dice_2d"] == r["hd95"] == r["seconds"] == ""
        else:
            assert r["error"] == "" and float(r["dice"]) > 0.2
    table = (out / "table.md").read_text()
    assert "Failed cases, left out: default / spatial_only 4 of 6; default / mean 4 of 6" in table
    assert json.loads((out / "summary.json").read_text())["counts"]["failed_rows"] == 8
    tables = parse_tables(table)
    assert tables[("Dice 3D (%)", "CT->MRI", 2)]["default / mean"][0] == expected_cell(
        [r for r in rows if r["fusion"] == "mean"], "dice", 100.0)[0]
    # a rerun keeps the recorded failures; --retry-failed runs them again
    assert "6 already finished, 0 run now" in invoke(*[a for a in args if a != "-q"])
    assert "2 already finished, 4 run now" in invoke(*[a for a in args if a != "-q"], "--retry-failed")


@pytest.fixture
def dask_cluster():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  memory_limit="2GiB", silence_logs=40) as cluster:
        yield cluster


@pytest.mark.slow
def test_dask_cluster_gives_the_same_results_as_this_process(cohort, tmp_path, dask_cluster):
    # no modality filter: the CT+MR support set gives all four directions
    common = ["--supports", str(cohort), "--organs", "liver", "--draws", "1", "--fusion", "mean", *BASIC, *CHEAP]
    invoke(*common, "--out", str(tmp_path / "dask"), "--scheduler", dask_cluster.scheduler_address)
    invoke(*common, "--out", str(tmp_path / "local"), "--workers", "1", "--save-predictions")
    on_dask, local = read_cases(tmp_path / "dask"), read_cases(tmp_path / "local")
    assert len(on_dask) == len(local) == 6 * 2
    assert [(r["direction"], r["query"], r["supports"], r["dice"], r["hd95"]) for r in on_dask] == [
        (r["direction"], r["query"], r["supports"], r["dice"], r["hd95"]) for r in local]
    for r in on_dask:  # never the query itself nor its subject; supports of the direction's modality
        assert r["supports"][:4] != r["query"][:4]
        assert r["supports"].endswith("_ct") == r["direction"].startswith("CT->")
        assert r["query"].endswith("_ct") == r["direction"].endswith("->CT")
    tables = parse_tables((tmp_path / "dask" / "table.md").read_text())
    assert [d for (m, d, k) in tables if m == "Dice 3D (%)"] == ["CT->MRI", "MRI->CT", "MRI->MRI", "CT->CT"]
    hosts = {json.loads(p.read_text())["host"].split(":")[1] for p in (tmp_path / "dask" / "results").rglob("*.json")}
    assert str(os.getpid()) not in hosts
    # saved predictions give back the Dice of the table
    manifest = json.loads(Path(cohort).read_text())
    labels = {c["id"]: Path(cohort).parent / c["label"] for c in manifest["cases"]}
    for r in local:
        stem = f"{r['organ']}_{r['direction'].replace('->', '_to_')}_k1_d0.nii.gz"
        path = tmp_path / "local" / "predictions" / "basic" / "mean" / r["query"] / stem
        truth = load(labels[r["query"]], is_label=True)
        label_id = manifest["label_names"][r["organ"]]
        assert dice(load(path, is_label=True).array, truth.array == label_id) == pytest.approx(float(r["dice"]))


def test_presets_in_one_run_share_the_cached_work(cohort, tmp_path):
    out = tmp_path / "out"
    invoke("--supports", str(cohort), "--support-modality", "MR", "--query-modality", "MR", "--organs", "RK",
           "--draws", "1", "--preset", "default,classical", "--fusion", "mean,spatial_only", "--workers", "1",
           "--out", str(out), *CHEAP)
    rows = read_cases(out)
    assert len(rows) == 3 * 2 * 2
    assert {(r["method"], r["fusion"]) for r in rows} == {(m, f) for m in ("default", "classical") for f in ("mean", "spatial_only")}
    # 'classical' is the default configuration: its registrations and features come from the cache
    # the 'default' units filled, and it gives the same numbers
    for r in rows:
        assert (r["t_register"] != "") == (r["method"] == "default")
    by = {(r["method"], r["fusion"], r["query"]): r["dice"] for r in rows}
    assert all(by[("classical", f, q)] == by[("default", f, q)] for (_, f, q) in by)
    table = parse_tables((out / "table.md").read_text())[("Dice 3D (%)", "MRI->MRI", 1)]
    assert list(table) == ["default / mean", "default / spatial_only", "classical / mean", "classical / spatial_only"]
