"""Protocol rules without running the pipeline: draws, exclusions, label maps, manifests,
aggregation and the up-front dataset report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from spasem.cli.main import cli
from spasem.core.io import save
from spasem.core.volume import Volume
from spasem.data.labelmaps import BUILTIN_LABEL_MAPS, canonical_organ, parse_organs, resolve_label_map
from spasem.data.manifest import build_manifest, read_manifest
from spasem.errors import InputError
from spasem.evaluation.datasets import DatasetError, case_refs, check_datasets
from spasem.evaluation.protocol import CaseRef, Method, draw_order, eligible_supports, excluded, plan_units, pool_shortfalls
from spasem.evaluation.report import aggregate, case_rows, markdown_tables

IDS = (("liver", 1), ("spleen", 2))


def ref(case_id: str, subject: str | None = None, modality: str = "CT", dataset: str = "d") -> CaseRef:
    return CaseRef(case_id, f"/data/{dataset}/{case_id}.nii.gz", f"/data/{dataset}/{case_id}_label.nii.gz",
                   modality, subject, dataset, IDS)


METHOD = Method("basic", {"registration": {"name": "centers"}}, ({"name": "mean", "options": {}},))


# -- draws ---------------------------------------------------------------------------------
def test_uni_modal_draws_exclude_the_query_and_its_subject():
    cases = [ref(f"c{n}", subject=f"p{n // 2}") for n in range(10)]  # two cases per subject
    present = {c.label: {1, 2} for c in cases}
    plan = plan_units([METHOD], cases, cases, ["liver", "spleen"], [1, 2, 4], draws=5, seed=3, present=present)
    assert len(plan.units) == 10 * 2 * 3 * 5
    for unit in plan.units:
        assert len(unit.supports) == unit.shots
        assert len({s.id for s in unit.supports}) == unit.shots  # without replacement
        for support in unit.supports:
            assert support.id != unit.query.id
            assert support.subject != unit.query.subject


def test_subjects_are_compared_within_one_dataset_only():
    query = ref("q", subject="7", dataset="chaos")
    assert excluded(ref("a", subject="7", dataset="chaos"), query)
    assert not excluded(ref("a", subject="7", dataset="btcv"), query)
    assert not excluded(ref("a", subject=None, dataset="chaos"), query)
    assert excluded(ref("q", subject=None, dataset="chaos"), query)  # the query itself


def test_draws_are_seeded_nested_and_independent_of_other_cases():
    pool = [ref(f"s{n}") for n in range(8)]
    query = ref("q", modality="MR", dataset="other")
    first = draw_order(pool, 0, query, 0)
    assert [c.id for c in first] == [c.id for c in draw_order(list(reversed(pool)), 0, query, 0)]
    assert sorted(c.id for c in first) == sorted(c.id for c in pool)
    others = {tuple(c.id for c in draw_order(pool, seed, query, d)) for seed in (0, 1) for d in range(4)}
    assert len(others) > 4  # different draws and seeds give different orders
    present = {c.label: {1, 2} for c in [*pool, query]}
    small = plan_units([METHOD], pool, [query], ["liver"], [1, 2, 4], draws=3, seed=0, present=present)
    more_queries = plan_units([METHOD], pool, [ref("a", dataset="other"), query], ["liver", "spleen"], [1, 2, 4, 8],
                              draws=3, seed=0, present={**present, "/data/other/a_label.nii.gz": {1, 2}})
    key = lambda u: (u.query.id, u.organ, u.shots, u.draw)  # noqa: E731
    bigger = {key(u): u for u in more_queries.units}
    for unit in small.units:
        assert [s.id for s in bigger[key(unit)].supports] == [s.id for s in unit.supports]
    by_draw = {(u.draw, u.shots): [s.id for s in u.supports] for u in small.units}
    for draw in range(3):  # the k-shot supports contain the (k/2)-shot supports
        assert by_draw[(draw, 2)][:1] == by_draw[(draw, 1)]
        assert by_draw[(draw, 4)][:2] == by_draw[(draw, 2)]
    # organs present in every support share their supports (one registration per pair)
    for unit in more_queries.units:
        if unit.organ == "spleen":
            assert bigger[(unit.query.id, "liver", unit.shots, unit.draw)].supports == unit.supports
    groups = more_queries.groups()
    assert len(groups) == 2 * 4 * 3 and all([u.organ for u in g] == ["liver", "spleen"] for g in groups)


def test_supports_without_the_organ_are_never_drawn_and_queries_without_it_are_skipped():
    supports = [ref(f"s{n}") for n in range(5)]
    queries = [ref("q1", dataset="mr", modality="MR"), ref("q2", dataset="mr", modality="MR")]
    present = {s.label: {1, 2} for s in supports}
    present[supports[0].label] = {1}  # s0 lacks the spleen
    present[queries[0].label] = {1, 2}
    present[queries[1].label] = {2}  # q2 lacks the liver
    assert "s0" not in {s.id for s in eligible_supports(supports, queries[0], "spleen", present)}
    plan = plan_units([METHOD], supports, queries, ["liver", "spleen"], [1, 4], draws=4, seed=0, present=present)
    # the spleen skips s0: the next cases of the draw's permutation take its place
    for u in plan.units:
        if u.query.id == "q1":
            order = draw_order(supports, 0, queries[0], u.draw)
            wanted = [c for c in order if u.organ == "liver" or c.id != "s0"][: u.shots]
            assert list(u.supports) == wanted
    assert plan.skipped == [{"query": "q2", "organ": "liver", "reason": "the query's label map lacks the organ"}]
    assert all("s0" not in [s.id for s in u.supports] for u in plan.units if u.organ == "spleen")
    assert {(u.query.id, u.organ) for u in plan.units} == {("q1", "liver"), ("q1", "spleen"), ("q2", "spleen")}
    assert all(u.direction == "CT->MRI" for u in plan.units)


# -- label maps and manifests --------------------------------------------------------------
def test_label_maps_and_organ_names(tmp_path):
    assert BUILTIN_LABEL_MAPS["btcv"] == {"spleen": 1, "right_kidney": 2, "left_kidney": 3, "liver": 6}
    assert resolve_label_map("CHAOS_png") == {"liver": 63, "right_kidney": 126, "left_kidney": 189, "spleen": 252}
    assert [canonical_organ(n) for n in ("LK", "Kidney-Right", "left kidney", "Liver", "pancreas")] == [
        "left_kidney", "right_kidney", "left_kidney", "liver", None]
    assert parse_organs("liver, RK,liver") == ["liver", "right_kidney"]
    with pytest.raises(InputError, match="'pancreas': unknown organ"):
        parse_organs("liver,pancreas")
    custom = tmp_path / "map.json"
    custom.write_text(json.dumps({"Kidney_L": 5, "liver": 2}))
    assert resolve_label_map(str(custom)) == {"left_kidney": 5, "liver": 2}
    with pytest.raises(InputError, match=r"neither a built-in label map \(btcv, amos, chaos"):
        resolve_label_map(str(tmp_path / "nope.json"))
    assert resolve_label_map("AMOS") == {"spleen": 1, "right_kidney": 2, "left_kidney": 3, "liver": 6}
    custom.write_text(json.dumps({"liver": "one"}))
    with pytest.raises(InputError, match="positive integer"):
        resolve_label_map(str(custom))


def _tiny(path: Path, label: bool = False, spacing=(1.0, 1.0, 2.0)) -> None:
    arr = np.zeros((6, 5, 4), np.uint8 if label else np.float32)
    arr[1:3, 1:3, 1:3] = 1
    save(Volume.from_array(arr, spacing=spacing, is_label=label), path)


def _dataset_folder(root: Path, pairs: list[tuple[str, str]], images: str = "imagesTr", labels: str = "labelsTr") -> Path:
    """``root/images/<image>`` and ``root/labels/<label>`` tiny files for each (image, label) name."""
    (root / images).mkdir(parents=True)
    (root / labels).mkdir()
    for image, label in pairs:
        _tiny(root / images / image)
        _tiny(root / labels / label, label=True)
    return root


def test_manifest_builder_pairs_nnunet_and_btcv_names(tmp_path):
    data = _dataset_folder(tmp_path / "Task", [(f"{c}_0000.nii.gz", f"{c}.nii.gz") for c in ("s001_ct", "s002_ct")])
    out = tmp_path / "elsewhere" / "manifest.json"
    out.parent.mkdir()
    result = CliRunner().invoke(cli, ["manifest", "build", str(data), "--modality", "CT", "--label-map", "btcv",
                                      "--subject-pattern", r"^(s\d+)", "-o", str(out)])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    assert [(c.id, c.subject, c.modality) for c in manifest.cases] == [("s001_ct", "s001", "CT"), ("s002_ct", "s002", "CT")]
    assert manifest.label_names == BUILTIN_LABEL_MAPS["btcv"]
    assert manifest.cases[0].image == "../Task/imagesTr/s001_ct_0000.nii.gz"  # relative to the manifest
    assert manifest.image_path(manifest.cases[0]).resolve() == (data / "imagesTr" / "s001_ct_0000.nii.gz").resolve()
    # BTCV's own layout: img/img0001.nii.gz + label/label0001.nii.gz
    btcv = _dataset_folder(tmp_path / "btcv", [("img0001.nii.gz", "label0001.nii.gz")], images="img", labels="label")
    built = build_manifest(btcv, modality="CT", images="img", labels="label")
    assert [(c.id, c.label) for c in built.cases] == [("img0001", "label/label0001.nii.gz")]
    _tiny(btcv / "label" / "label0002.nii.gz", label=True)
    with pytest.raises(InputError, match=r"label\(s\) without an image in img/: label0002.nii.gz"):
        build_manifest(btcv, modality="CT", images="img", labels="label")
    # the same name in both folders, ending in four digits that are not a channel suffix (AMOS)
    amos = _dataset_folder(tmp_path / "amos22", [(f"{n}.nii.gz", f"{n}.nii.gz") for n in ("amos_0001", "amos_0507")])
    built = build_manifest(amos, modality="CT")
    assert [(c.id, c.image, c.label) for c in built.cases] == [
        ("amos_0001", "imagesTr/amos_0001.nii.gz", "labelsTr/amos_0001.nii.gz"),
        ("amos_0507", "imagesTr/amos_0507.nii.gz", "labelsTr/amos_0507.nii.gz")]


def test_manifest_builder_gives_a_mixed_folder_its_modalities(tmp_path):
    """AMOS keeps CT and MR in one folder; MR case numbers start at 500."""
    names = [f"amos_{number:04d}.nii.gz" for number in (1, 499, 500, 540)]
    data = _dataset_folder(tmp_path / "amos22", [(n, n) for n in names])
    out = tmp_path / "amos.json"
    result = CliRunner().invoke(cli, ["manifest", "build", str(data), "--modality", "CT", "--label-map", "amos",
                                      "--modality-pattern", r"MR=^amos_0[56]\d\d$", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "4 case(s) (CT 2, MR 2)" in result.output
    manifest = read_manifest(out)
    assert [(c.id, c.modality) for c in manifest.cases] == [
        ("amos_0001", "CT"), ("amos_0499", "CT"), ("amos_0500", "MR"), ("amos_0540", "MR")]
    assert [c.id for c in manifest.filter("MR").cases] == ["amos_0500", "amos_0540"]
    assert manifest.label_names["liver"] == 6
    # the first matching pattern wins
    built = build_manifest(data, modality="CT", modality_patterns=[("MR", "_05"), ("CT", "_0540")])
    assert [c.modality for c in built.cases] == ["CT", "CT", "MR", "MR"]
    with pytest.raises(InputError, match="modality 'US' is not CT or MR"):
        build_manifest(data, modality="CT", modality_patterns=[("US", "_05")])
    assert build_manifest(data, modality="CT", modality_patterns=[("mri", "_05")]).cases[2].modality == "MR"
    # bad patterns: a clear error, exit code 2, no manifest written
    for pattern, message in ((r"MR=^amos_(", "not a regular expression"),
                             ("MR=^nope", r"matches no case id of .* \(ids: amos_0001, amos_0499, amos_0500 ...\)"),
                             ("PET=^amos", "modality 'PET' is not CT or MR"),
                             ("^amos_05", "expected MODALITY=REGEX")):
        bad = tmp_path / "bad.json"
        result = CliRunner().invoke(cli, ["manifest", "build", str(data), "--modality", "CT",
                                          "--modality-pattern", pattern, "-o", str(bad)])
        assert result.exit_code == 2, (pattern, result.output)
        assert re.search(message, result.output), (pattern, result.output)
        assert not bad.exists()


def test_csv_manifest_with_a_label_map(tmp_path):
    _tiny(tmp_path / "a.nii.gz")
    _tiny(tmp_path / "a_seg.nii.gz", label=True)
    (tmp_path / "cases.csv").write_text("id,image,label,modality,subject\na,a.nii.gz,a_seg.nii.gz,MRI,p1\n")
    manifest = read_manifest(tmp_path / "cases.csv", resolve_label_map("chaos"))
    assert manifest.label_names["spleen"] == 4
    assert manifest.cases[0].modality == "MR"
    assert read_manifest(tmp_path / "cases.csv").label_names == {}


# -- the up-front report -------------------------------------------------------------------
def test_one_report_lists_every_problem_before_any_compute(tmp_path):
    _tiny(tmp_path / "ok.nii.gz")
    _tiny(tmp_path / "ok_label.nii.gz", label=True)
    _tiny(tmp_path / "off.nii.gz")
    _tiny(tmp_path / "off_label.nii.gz", label=True, spacing=(1.0, 1.0, 3.0))  # not the image's grid
    (tmp_path / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    _tiny(tmp_path / "broken_label.nii.gz", label=True)
    # a label stored with a flipped axis is fine (exactly reorientable)
    _tiny(tmp_path / "flip.nii.gz")
    arr = np.zeros((6, 5, 4), np.uint8)
    arr[1:3, 1:3, 1:3] = 1
    flipped = Volume.from_array(arr[:, ::-1, :].copy(), origin=(0, 4.0, 0), direction=np.diag([1.0, -1.0, 1.0]),
                                spacing=(1.0, 1.0, 2.0), is_label=True)
    save(flipped, tmp_path / "flip_label.nii.gz")
    manifest = {
        "dataset": "bad", "label_names": {"liver": 1},
        "cases": [
            {"id": "ok", "image": "ok.nii.gz", "label": "ok_label.nii.gz", "modality": "CT"},
            {"id": "missing", "image": "missing.nii.gz", "label": "ok_label.nii.gz", "modality": "CT"},
            {"id": "off", "image": "off.nii.gz", "label": "off_label.nii.gz", "modality": "CT"},
            {"id": "broken", "image": "broken.nii.gz", "label": "broken_label.nii.gz", "modality": "CT"},
            {"id": "flip", "image": "flip.nii.gz", "label": "flip_label.nii.gz", "modality": "CT"},
            {"id": "nolabel", "image": "ok.nii.gz", "modality": "CT"},
        ],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["evaluate", "--supports", str(tmp_path / "manifest.json"), "--out", str(out),
                                      "--organs", "liver,spleen", "-q"])
    assert result.exit_code == 2, result.output
    message = result.output
    assert "5 problem(s) in the datasets; nothing was computed" in message
    assert "organ(s) spleen not in its label names (liver 1)" in message
    assert "case nolabel has no label map" in message
    assert "missing.nii.gz': no such file" in message
    assert "broken.nii.gz': cannot read" in message
    assert "case off: label" in message and "is not on its image's voxel grid" in message
    assert "flip" not in message
    assert not (out / "results").exists() and not (out / "cases.csv").exists()


def test_report_names_queries_with_too_few_supports(tmp_path):
    cases = []
    for n in range(3):
        _tiny(tmp_path / f"c{n}.nii.gz")
        _tiny(tmp_path / f"c{n}_label.nii.gz", label=True)
        cases.append({"id": f"c{n}", "image": f"c{n}.nii.gz", "label": f"c{n}_label.nii.gz", "modality": "CT"})
    (tmp_path / "m.json").write_text(json.dumps({"label_names": {"liver": 1, "spleen": 2}, "cases": cases}))
    manifest = read_manifest(tmp_path / "m.json")
    refs, problems = case_refs(manifest, ["liver", "spleen"], "m")
    assert problems == []
    with pytest.raises(DatasetError) as info:
        check_datasets(refs, refs, ["liver", "spleen"], [1, 4])
    assert info.value.problems == [
        "organ spleen: no support label map contains its label id 2 (ids present: 1); is the label map right?",
        "organ spleen: no query label map contains its label id 2 (ids present: 1); is the label map right?",
    ]
    with pytest.raises(DatasetError) as info:
        check_datasets(refs, refs, ["liver"], [1, 4])
    assert len(info.value.problems) == 1
    assert "organ liver: 3 queries have fewer than 4 eligible support(s)" in info.value.problems[0]
    assert "c0 (2), c1 (2), c2 (2)" in info.value.problems[0]
    present = check_datasets(refs, refs, ["liver"], [1, 2], inventory=tmp_path / "inventory.json")
    assert present == {str((tmp_path / f"c{n}_label.nii.gz").resolve()): {1} for n in range(3)}
    assert (tmp_path / "inventory.json").is_file()


# -- aggregation ---------------------------------------------------------------------------
def _record(query, organ, draw, dice, error=None):
    fusion = {"error": error} if error else {"dice": dice, "dice_2d": dice / 2, "hd95": None if dice == 0 else 3.0,
                                             "seconds": 1.0, "timings": {"load": 0.5}}
    return {"key": f"{query}{organ}{draw}", "method": "basic", "query": query, "organ": organ, "shots": 1, "draw": draw,
            "direction": "CT->MRI", "supports": ["s1"], "error": error, "fusions": {"mean": fusion}}


def test_aggregation_averages_draws_per_query_then_across_queries():
    records = [
        _record("q1", "liver", 0, 0.8), _record("q1", "liver", 1, 0.6),  # q1: 0.7
        _record("q2", "liver", 0, 0.9), _record("q2", "liver", 1, 0.0, error="PipelineError: lost"),  # q2: 0.9
        _record("q3", "liver", 0, 0.2), _record("q3", "liver", 1, 0.0),  # q3: 0.1, one HD95 undefined
        _record("q1", "spleen", 0, 0.5),
    ]
    rows = case_rows(records)
    groups = {g["organ"]: g for g in aggregate(rows)}
    liver = groups["liver"]
    assert liver["dice"]["mean"] == pytest.approx((0.7 + 0.9 + 0.1) / 3)
    assert liver["dice"]["std"] == pytest.approx(np.std([0.7, 0.9, 0.1], ddof=1))
    assert liver["dice"]["n"] == 3 and liver["failed"] == 1 and liver["cases"] == 6
    assert liver["hd95"]["undefined"] == 1 and liver["hd95"]["mean"] == pytest.approx(3.0)
    assert groups["spleen"]["dice"] == {"mean": 0.5, "std": 0.0, "n": 1}
    table = markdown_tables(aggregate(rows))
    line = next(l for l in table.splitlines() if l.startswith("| basic / mean |"))
    assert line == "| basic / mean | 56.7 ± 41.6 | - | - | 50.0 ± 0.0 | 53.3 |"
    assert "Failed cases, left out: basic / mean 1 of 7 (see the error column of cases.csv)" in table
    assert "HD95 undefined (empty prediction), left out: basic / mean 1 of 7." in table


def test_a_mixed_support_set_gives_one_direction_per_support_modality():
    cases = [ref(f"s{n}_{m.lower()}", subject=f"s{n}", modality=m) for n in range(4) for m in ("CT", "MR")]
    present = {c.label: {1, 2} for c in cases}
    plan = plan_units([METHOD], cases, cases, ["liver"], [1, 2], draws=2, seed=0, present=present)
    assert len(plan.units) == 8 * 2 * 2 * 2  # queries x support modalities x shots x draws
    directions = {(u.query.modality, u.direction) for u in plan.units}
    assert directions == {("CT", "CT->CT"), ("CT", "MRI->CT"), ("MR", "CT->MRI"), ("MR", "MRI->MRI")}
    for unit in plan.units:
        assert len({s.modality for s in unit.supports}) == 1
        assert all(s.subject != unit.query.subject for s in unit.supports)  # not even the other modality
    assert len({u.key for u in plan.units}) == len(plan.units)
    # the shortfall report names the support modality
    short = pool_shortfalls(cases, cases, ["liver"], [4], present)
    assert short[0].startswith("organ liver: 8 queries have fewer than 4 eligible CT support(s)")


@pytest.mark.parametrize("args, message", [
    (["--fusion", "entropy_gate,nope"], "unknown fusion 'nope'"),
    (["--shots", "1,0"], "--shots '1,0': expected positive integers"),
    (["--organs", "liver,heart"], "--organs 'heart': unknown organ"),
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--set", "window.size=4"], "window sides must be >= 8"),
    (["--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "either --workers"),
    (["--support-label-map", "nope"], "--support-label-map 'nope': neither a built-in label map"),
])
def test_bad_options_fail_before_any_compute(tmp_path, args, message):
    result = CliRunner().invoke(cli, ["evaluate", "--supports", str(tmp_path / "m.json"), "--out", str(tmp_path / "o"), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "o").exists()
