"""Synthetic phantoms (spasem.data.phantoms) and ``spasem phantoms``: determinism, labels and
their anatomical sides, the documented per-modality geometry and contrast, cohorts on disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage

from spasem.cli.main import cli
from spasem.core.io import load
from spasem.core.volume import RAS_DIRECTION
from spasem.data.manifest import read_manifest
from spasem.data.phantoms import (LABELS, MAX_VARIABILITY, PROTOCOLS, cohort_name, generate_case, make_anatomy,
                                  parse_modalities, write_cohort)
from spasem.errors import InputError
from tests.phantom_helpers import phantom_case, physical_centroid


def _median(image, label, label_id) -> float:
    return float(np.median(np.asarray(image.array, np.float32)[np.asarray(label.array) == label_id]))


def _outer_shell(image, threshold: float, depth_mm: tuple[float, float]) -> np.ndarray:
    """Body voxels whose in-plane depth below the body surface is within ``depth_mm`` (the
    subcutaneous fat of the phantoms is at least 7 mm thick)."""
    arr = np.asarray(image.array, np.float32)
    body = ndimage.binary_opening(ndimage.binary_fill_holes(arr > threshold), iterations=2)
    shell = np.zeros(arr.shape, bool)
    for k in range(arr.shape[2]):
        depth = ndimage.distance_transform_edt(body[:, :, k], sampling=image.spacing[:2])
        shell[:, :, k] = (depth > depth_mm[0]) & (depth < depth_mm[1])
    return shell


# ------------------------------------------------------------------------------------------
# one case
# ------------------------------------------------------------------------------------------
def test_generate_case_is_deterministic_per_subject_modality_and_seed():
    image, label = phantom_case(0, "ct")
    again_image, again_label = generate_case(0, "CT ", seed=0)  # case and spaces do not matter
    np.testing.assert_array_equal(image.array, again_image.array)
    np.testing.assert_array_equal(label.array, again_label.array)
    assert image.grid.same_as(again_image.grid) and label.grid.same_as(image.grid)
    # another subject is another anatomy (the CT field of view follows the body size)
    other, other_label = phantom_case(1, "ct")
    assert other.shape != image.shape
    # another seed is another cohort
    reseeded, _ = generate_case(0, "mr", seed=1)
    mr, _ = phantom_case(0, "mr")
    assert reseeded.shape == mr.shape  # fixed MR field of view ...
    assert not np.array_equal(reseeded.array, mr.array)  # ... other content


def test_names_modality_types_and_label_ids():
    for modality, dtype in (("ct", np.int16), ("mr", np.float32)):
        image, label = phantom_case(0, modality)
        assert image.array.dtype == dtype and label.array.dtype == np.uint8
        assert label.is_label and not image.is_label
        assert image.name == f"s000_{modality}" and label.name == f"s000_{modality}_label"
        assert image.modality == label.modality == modality.upper()
        assert set(np.unique(label.array)) == {0, *LABELS.values()}
    assert LABELS == {"liver": 1, "spleen": 2, "left_kidney": 3, "right_kidney": 4}


@pytest.mark.parametrize("modality", ["ct", "mr"])
def test_organs_lie_on_their_anatomical_sides(modality):
    """LPS: +x is the patient's left, +y posterior, +z superior, whatever the file direction."""
    _, label = phantom_case(0, modality)
    liver, spleen, left, right = (physical_centroid(label, LABELS[n]) for n in LABELS)
    assert left[0] - right[0] > 60  # left kidney on the patient's left
    assert spleen[0] - liver[0] > 60  # spleen left, liver right
    assert left[1] > liver[1] and right[1] > liver[1]  # kidneys posterior (retroperitoneal)
    assert liver[2] > left[2] and spleen[2] > left[2]  # upper abdomen above the kidneys
    volumes_ml = {n: np.count_nonzero(label.array == v) * np.prod(label.spacing) / 1000 for n, v in LABELS.items()}
    assert volumes_ml["liver"] > 2 * volumes_ml["spleen"] > 0
    assert 50 < volumes_ml["left_kidney"] < 400 and 50 < volumes_ml["right_kidney"] < 400


def test_modalities_have_the_documented_spacing_and_file_direction():
    ct, _ = phantom_case(0, "ct")
    mr, _ = phantom_case(0, "mr")
    np.testing.assert_allclose(ct.spacing, (0.8, 0.8, 2.5))
    np.testing.assert_allclose(mr.spacing, (1.5, 1.5, 6.0))
    np.testing.assert_allclose(ct.direction, np.eye(3))  # LPS: i -> L, j -> P, k -> S
    np.testing.assert_allclose(mr.direction, RAS_DIRECTION)  # RAS: i -> R, j -> A, k -> S
    # the MR field of view is fixed (~380 x 300 x 180 mm); the CT one follows the body (160 mm in z)
    np.testing.assert_allclose(mr.grid.extent_mm, (380.0, 300.0, 180.0), atol=1.5)
    assert abs(ct.shape[2] * 2.5 - 160.0) <= 2.5
    for modality in ("ct", "mr"):
        assert PROTOCOLS[modality].spacing == tuple(phantom_case(0, modality)[0].spacing)


def test_ct_is_in_hounsfield_units():
    ct, label = phantom_case(0, "ct")
    arr = ct.array
    assert arr.min() >= -1024 and arr.max() <= 3071
    assert np.median(arr[:8, :8, :]) == pytest.approx(-1000, abs=40)  # corners: air
    assert 70 < _median(ct, label, LABELS["liver"]) < 140  # liver ~105 HU
    assert 80 < _median(ct, label, LABELS["spleen"]) < 150  # spleen ~115 HU
    assert 120 < _median(ct, label, LABELS["left_kidney"]) < 200  # cortex ~170 / medulla ~120
    assert np.percentile(arr, 99.95) > 400  # bone
    fat = float(np.median(arr[_outer_shell(ct, -500, (2.5, 5.5))]))
    assert -140 < fat < -60  # subcutaneous fat ~-100 HU


def test_mr_contrast_ordering_differs_from_ct():
    """T2-like: fat bright, spleen much brighter than liver, kidneys brighter still; in CT fat is
    the darkest soft tissue and liver and spleen are within a few HU."""
    ct, ct_label = phantom_case(0, "ct")
    mr, mr_label = phantom_case(0, "mr")
    assert mr.array.min() >= 0  # magnitude image
    assert np.median(mr.array[:8, :8, :]) < 60  # air: Rician noise floor (sigma 18)
    ct_organs = {n: _median(ct, ct_label, v) for n, v in LABELS.items()}
    mr_organs = {n: _median(mr, mr_label, v) for n, v in LABELS.items()}
    ct_fat = float(np.median(ct.array[_outer_shell(ct, -500, (2.5, 5.5))]))
    mr_fat = float(np.median(mr.array[_outer_shell(mr, 100.0, (3.0, 5.5))]))
    # fat: darker than liver in CT, brighter than every organ in MR
    assert ct_fat < ct_organs["liver"] - 150
    assert mr_fat > max(mr_organs.values())
    # spleen / liver: nearly equal in CT, > 1.5x in MR
    assert abs(ct_organs["spleen"] - ct_organs["liver"]) < 30
    assert mr_organs["spleen"] > 1.5 * mr_organs["liver"]
    assert mr_organs["left_kidney"] > mr_organs["spleen"] and mr_organs["right_kidney"] > mr_organs["spleen"]


def test_bad_case_arguments():
    with pytest.raises(InputError, match="phantom modality 'pet'.*expected one of ct, mr"):
        generate_case(0, "pet")
    with pytest.raises(InputError, match="phantom subject -1"):
        generate_case(-1, "ct")
    assert parse_modalities("MR, ct,mr") == ("mr", "ct")
    with pytest.raises(InputError, match="none given"):
        parse_modalities(" , ")


# ------------------------------------------------------------------------------------------
# variability between subjects
# ------------------------------------------------------------------------------------------
def _organs(anatomy) -> dict:
    return {"liver_right": anatomy.liver[0], "liver_left": anatomy.liver[1], "spleen": anatomy.spleen,
            **anatomy.kidneys, "stomach": anatomy.stomach}


def test_variability_scales_the_organs_spread_between_subjects():
    subjects = range(8)
    for subject in subjects:
        still, default, wide = (_organs(make_anatomy(subject, 0, v)) for v in (0.0, 1.0, 2.0))
        for name in still:
            # the centres move linearly with the factor, from the mean anatomy (v = 0) outwards (along
            # z nearly: the respiratory shift is also scaled by the organ scale, both grow with v)
            moved, moved_twice = default[name].centre - still[name].centre, wide[name].centre - still[name].centre
            np.testing.assert_allclose(moved_twice[:2], 2.0 * moved[:2], atol=1e-9)
            assert abs(moved_twice[2] - 2.0 * moved[2]) < 0.85  # 2 * 6 mm * 0.07 at most
            assert still[name].deformation is not None
            assert np.abs(still[name].deformation.amplitudes).max() == 0.0  # no shape deformation at 0
        # the body outline is not the organs': the same at every factor
        assert make_anatomy(subject, 0, 0.0).body_axes == make_anatomy(subject, 0, 3.0).body_axes
    # at 0 every subject has the same organs (up to the body's size, which scales x and y) ...
    a, b = make_anatomy(0, 0, 0.0), make_anatomy(5, 0, 0.0)
    np.testing.assert_allclose(a.spleen.radii, b.spleen.radii)
    np.testing.assert_allclose(a.spleen.rotation, b.spleen.rotation)
    # ... and the spread of organ sizes (log volume) grows with the factor
    def log_volume_sd(v: float, organ: str) -> float:
        return float(np.std([np.log(np.prod(_organs(make_anatomy(s, 0, v))[organ].radii)) for s in range(12)]))

    for organ in ("liver_right", "spleen", "left_kidney"):
        assert log_volume_sd(0.0, organ) < 1e-12
        assert log_volume_sd(1.0, organ) > 0.05
        assert log_volume_sd(2.5, organ) > 2.0 * log_volume_sd(1.0, organ)


@pytest.mark.parametrize("bad", [-0.5, MAX_VARIABILITY + 0.1, float("nan"), "wide"])
def test_bad_variability_is_refused(bad):
    with pytest.raises(InputError, match="phantom variability"):
        make_anatomy(0, 0, bad)
    with pytest.raises(InputError, match="phantom variability"):
        generate_case(0, "mr", 0, bad)


def test_cohort_name_records_seed_and_variability():
    assert cohort_name() == "phantoms"
    assert cohort_name(3) == "phantoms-seed3"
    assert cohort_name(0, 2.5) == "phantoms-var2.5"
    assert cohort_name(1, 0.0) == "phantoms-seed1-var0"


# ------------------------------------------------------------------------------------------
# cohorts on disk
# ------------------------------------------------------------------------------------------
def _check_cohort(folder, subjects: int, modalities: tuple[str, ...]) -> None:
    manifest = read_manifest(folder / "manifest.json")
    assert manifest.dataset == "phantoms"
    assert manifest.label_names == LABELS
    expected = [f"s{s:03d}_{m}" for s in range(subjects) for m in modalities]
    assert [c.id for c in manifest.cases] == expected
    for case in manifest.cases:
        subject, modality = case.id.split("_")
        assert case.modality == modality.upper() and case.subject == subject
        image = load(manifest.image_path(case))
        label = load(manifest.label_path(case), is_label=True)
        memory_image, memory_label = phantom_case(int(subject[1:]), modality)
        # what was written is the case itself: same voxels and geometry (file direction kept)
        assert image.grid.same_as(memory_image.grid) and label.grid.same_as(memory_image.grid)
        np.testing.assert_array_equal(label.array, memory_label.array)
        np.testing.assert_allclose(image.array, memory_image.array, atol=1e-3)
    data = json.loads((folder / "manifest.json").read_text())
    assert all(not c["image"].startswith("/") for c in data["cases"])  # relative paths


def test_write_cohort_writes_cases_and_a_readable_manifest(tmp_path):
    path = write_cohort(tmp_path / "cohort", 1, "mr")
    assert path == tmp_path / "cohort" / "manifest.json"
    _check_cohort(tmp_path / "cohort", 1, ("mr",))
    assert sorted(p.name for p in (tmp_path / "cohort").iterdir()) == ["manifest.json", "s000_mr.nii.gz",
                                                                         "s000_mr_label.nii.gz"]
    with pytest.raises(InputError, match="subjects 0"):
        write_cohort(tmp_path / "none", 0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        write_cohort(tmp_path / "file", 1, "mr")


@pytest.mark.slow
def test_phantoms_cli_writes_files_and_manifest(tmp_path):
    out = tmp_path / "cohort"
    result = CliRunner().invoke(cli, ["phantoms", "--out", str(out), "--subjects", "1", "--modalities", "ct,mr", "-q"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(out / "manifest.json")
    _check_cohort(out, 1, ("ct", "mr"))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_write_cohort_with_variability_names_the_dataset_and_writes_those_cases(tmp_path):
    path = write_cohort(tmp_path / "wide", 1, "mr", seed=2, variability=2.5)
    manifest = read_manifest(path)
    assert manifest.dataset == "phantoms-seed2-var2.5"
    written = load(manifest.label_path(manifest.cases[0]), is_label=True)
    _, expected = generate_case(0, "mr", seed=2, variability=2.5)
    _, default = generate_case(0, "mr", seed=2)
    np.testing.assert_array_equal(written.array, expected.array)
    assert not np.array_equal(expected.array, default.array)  # the organs did move
    with pytest.raises(InputError, match="phantom variability 9"):
        write_cohort(tmp_path / "bad", 1, "mr", variability=9)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--subjects", "1", "--variability", "9"], "phantom variability 9.0: expected a number in [0, 4]"),
        (["--subjects", "0"], "0 is not in the range x>=1"),
        (["--subjects", "1", "--modalities", "ct,pet"], "phantom modality 'pet'"),
        (["--subjects", "1", "--modalities", ","], "none given"),
        (["--subjects", "two"], "'two' is not a valid integer"),
    ],
)
def test_phantoms_cli_bad_arguments_fail_cleanly(tmp_path, args, message):
    out = tmp_path / "cohort"
    result = CliRunner().invoke(cli, ["phantoms", "--out", str(out), *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()  # failed before writing anything
