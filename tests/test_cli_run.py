"""`spasem run` end to end, and every bad input it must refuse cleanly."""

from __future__ import annotations

import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

import spasem
from spasem.cli import main as cli_main
from spasem.cli.main import cli
from spasem.core.volume import Volume
from spasem.core.metrics import dice
from tests.conftest import blob_pair

FAST = ["--registration", "identity", "--encoder", "intensity", "--set", "encoder.options.stride=4",
        "--set", "window.size=48"]


@pytest.fixture
def files(tmp_path):
    """Support image + mask, and a query stored with flipped axes and another origin (same
    physical scene shifted by 4 mm)."""
    image, mask = blob_pair()
    spasem.save(image, tmp_path / "support.nii.gz")
    spasem.save(mask, tmp_path / "support_mask.nii.gz")
    q_image, q_mask = blob_pair(shift_vox=2)
    flipped = Volume(
        np.ascontiguousarray(q_image.array[::-1]), q_image.grid.__class__(
            q_image.shape, q_image.spacing, q_image.grid.index_to_physical([q_image.shape[0] - 1, 0, 0]),
            np.diag([-1.0, 1.0, 1.0])),
    )
    spasem.save(flipped, tmp_path / "query.nrrd")
    truth = Volume(np.ascontiguousarray(q_mask.array[::-1]), flipped.grid, is_label=True)
    return tmp_path, truth


def _run(args, **kw):
    return CliRunner().invoke(cli, ["run", *args], catch_exceptions=False, **kw)


def _base(tmp, out="pred.nii.gz"):
    return ["--support", str(tmp / "support.nii.gz"), "--support-mask", str(tmp / "support_mask.nii.gz"),
            "--query", str(tmp / "query.nrrd"), "-o", str(tmp / out)]


def test_run_writes_mask_and_priors_on_the_query_grid(files):
    tmp, truth = files
    result = _run([*_base(tmp), *FAST, "--fusion", "spatial_only", "--save-priors", str(tmp / "priors")])
    assert result.exit_code == 0, result.output
    pred = spasem.load(tmp / "pred.nii.gz", is_label=True)
    assert pred.grid.same_as(truth.grid)
    assert dice(pred, truth) > 0.8  # identity registration, organ moved by 4 mm (ideal 12/14)
    for name in ("p_reg", "p_sim", "entropy", "fused_logits"):
        prior = spasem.load(tmp / "priors" / f"{name}.nii.gz")
        assert prior.grid.same_as(truth.grid)
    p_reg = spasem.load(tmp / "priors" / "p_reg.nii.gz").array
    assert 0 <= p_reg.min() and p_reg.max() <= 1 and p_reg.max() > 0.9
    # progress and summary on stderr
    assert "registering support 1" in result.stderr and "segmented" in result.stderr


def test_quiet_prints_nothing(files):
    tmp, _ = files
    result = _run([*_base(tmp), *FAST, "-q"])
    assert result.exit_code == 0
    assert result.output == ""


def test_k_shot_and_config_file_layers(files):
    tmp, truth = files
    (tmp / "cfg.toml").write_text('[fusion]\nname = "mean"\n[priors]\nsigma = 1.5\n[window]\nsize = 48\n')
    (tmp / "cfg.yaml").write_text("registration: identity\nencoder:\n  name: intensity\n  options: {stride: 4}\n")
    result = _run([
        "--support", str(tmp / "support.nii.gz"), "--support-mask", str(tmp / "support_mask.nii.gz"),
        "--support", str(tmp / "support.nii.gz"), "--support-mask", str(tmp / "support_mask.nii.gz"),
        "--query", str(tmp / "query.nrrd"), "-o", str(tmp / "k2.nii.gz"),
        "--config", str(tmp / "cfg.yaml"), "--set", "window.size=48", "--fusion", "spatial_only", "-q",
    ])
    assert result.exit_code == 0, result.output
    assert dice(spasem.load(tmp / "k2.nii.gz", is_label=True), truth) > 0.8
    result = _run([*_base(tmp, "t.nii.gz"), "--config", str(tmp / "cfg.toml"), "--registration", "identity",
                   "--encoder", "intensity", "--set", "encoder.options.stride=4", "-q"])
    assert result.exit_code == 0, result.output


def test_multilabel_mask_with_label_and_flipped_storage(files):
    tmp, truth = files
    image, mask = blob_pair()
    multi = mask.array * 7
    multi[2:5, 2:5, 2:5] = 3
    # stored with j flipped: same voxels, different file layout -> accepted exactly
    flipped = Volume(np.ascontiguousarray(multi[:, ::-1]), mask.grid.__class__(
        mask.shape, mask.spacing, mask.grid.index_to_physical([0, mask.shape[1] - 1, 0]), np.diag([1.0, -1.0, 1.0])),
        is_label=True)
    spasem.save(flipped, tmp / "multi.nii.gz")
    result = _run(["--support", str(tmp / "support.nii.gz"), "--support-mask", str(tmp / "multi.nii.gz"),
                   "--label", "7", "--query", str(tmp / "query.nrrd"), "-o", str(tmp / "p7.nii.gz"),
                   *FAST, "--fusion", "spatial_only", "-q"])
    assert result.exit_code == 0, result.output
    assert dice(spasem.load(tmp / "p7.nii.gz", is_label=True), truth) > 0.8
    absent = _run(["--support", str(tmp / "support.nii.gz"), "--support-mask", str(tmp / "multi.nii.gz"),
                   "--label", "5", "--query", str(tmp / "query.nrrd"), "-o", str(tmp / "p5.nii.gz"), *FAST])
    assert absent.exit_code == 2
    assert "has no voxel with label 5; labels present: 3, 7" in absent.stderr
    assert not (tmp / "p5.nii.gz").exists()


def _expect_error(args, code, *fragments):
    result = CliRunner().invoke(cli, ["run", *args])
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.startswith("spasem: error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def test_missing_corrupt_and_unsupported_inputs(files):
    tmp, _ = files
    base = _base(tmp)
    missing = [*base]
    missing[5] = str(tmp / "nope.nii.gz")
    _expect_error([*missing, *FAST], 2, "nope.nii.gz", "no such file")
    (tmp / "bad.nii.gz").write_bytes(b"\x1f\x8b garbage")
    corrupt = [*base]
    corrupt[1] = str(tmp / "bad.nii.gz")
    _expect_error([*corrupt, *FAST], 2, "bad.nii.gz", "cannot read")
    assert not (tmp / "pred.nii.gz").exists()


def test_2d_and_4d_images(files):
    tmp, _ = files
    sitk.WriteImage(sitk.Image([20, 20], sitk.sitkFloat32), str(tmp / "slice.nii.gz"))
    args = _base(tmp)
    args[5] = str(tmp / "slice.nii.gz")
    _expect_error([*args, *FAST], 2, "slice.nii.gz", "expected a 3D volume, got a 2D image")
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 1), np.float32), np.eye(4)), tmp / "thin.nii.gz")
    args[5] = str(tmp / "thin.nii.gz")
    _expect_error([*args, *FAST], 2, "thin.nii.gz", "is 2D (size 20x20x1)")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), tmp / "dyn.nii.gz")
    args[5] = str(tmp / "dyn.nii.gz")
    _expect_error([*args, *FAST], 2, "dyn.nii.gz", "4D image")


def test_empty_mask_and_nan_voxels(files):
    tmp, _ = files
    image, mask = blob_pair()
    spasem.save(mask.with_array(np.zeros_like(mask.array)), tmp / "empty.nii.gz")
    args = _base(tmp)
    args[3] = str(tmp / "empty.nii.gz")
    _expect_error([*args, *FAST], 2, "empty.nii.gz", "is empty")
    arr = image.array.copy()
    arr[3, 4, 5] = np.inf
    spasem.save(image.with_array(arr), tmp / "inf.nii.gz")
    args = _base(tmp)
    args[5] = str(tmp / "inf.nii.gz")
    _expect_error([*args, *FAST], 2, "inf.nii.gz", "NaN/infinite", "(3, 4, 5)")


def test_mask_on_another_grid_is_refused_unless_resampling_is_asked(files):
    tmp, truth = files
    _, mask = blob_pair()
    shifted = Volume(mask.array, mask.grid.__class__(mask.shape, mask.spacing, (0.7, 0.0, 0.0)), is_label=True)
    spasem.save(shifted, tmp / "shifted_mask.nii.gz")
    args = _base(tmp)
    args[3] = str(tmp / "shifted_mask.nii.gz")
    line = _expect_error([*args, *FAST], 2, "shifted_mask.nii.gz", "not on its image's voxel grid",
                         "origin (0.70, 0.00, 0.00)", "origin (0.00, 0.00, 0.00)", "--resample-mask")
    assert "support.nii.gz" in line
    ok = _run([*args, *FAST, "--resample-mask", "--fusion", "spatial_only", "-q"])
    assert ok.exit_code == 0, ok.output
    assert dice(spasem.load(tmp / "pred.nii.gz", is_label=True), truth) > 0.8


def test_outputs_checked_before_compute(files):
    tmp, _ = files
    args = _base(tmp)
    args[7] = str(tmp / "no_such_dir" / "pred.nii.gz")
    _expect_error([*args, *FAST], 2, "no_such_dir", "does not exist")
    args[7] = str(tmp / "pred.png")
    _expect_error([*args, *FAST], 2, "pred.png", "unsupported file type")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        args[7] = str(ro / "pred.nii.gz")
        _expect_error([*args, *FAST], 2, "not writable")


def test_bad_options(files):
    tmp, _ = files
    _expect_error([*_base(tmp), "--encoder", "nope"], 2, "unknown encoder 'nope'; available:", "intensity")
    _expect_error([*_base(tmp), "--set", "priors.sigma=-1"], 2, "priors.sigma: Input should be greater than 0")
    _expect_error([*_base(tmp), "--set", "encoder.options.strid=2", "--encoder", "intensity"], 2,
                  "encoder 'intensity': strid: unknown option")
    _expect_error([*_base(tmp), "--preset", "nope"], 2, "unknown preset 'nope'")
    if not __import__("torch").cuda.is_available():
        _expect_error([*_base(tmp), *FAST, "--device", "cuda"], 2, "no CUDA device is available")
    usage = CliRunner().invoke(cli, ["run", *_base(tmp), "--support", str(tmp / "support.nii.gz")])
    assert usage.exit_code == 2 and "got 2 --support and 1 --support-mask" in usage.output


def test_failed_run_leaves_no_partial_output(files):
    """Registration that leaves the organ outside the query: clean error, no mask, no priors folder."""
    tmp, _ = files
    image, _ = blob_pair(origin=(1000.0, 0.0, 0.0))  # a query 1 m away, no registration to bring it back
    spasem.save(image, tmp / "far.nii.gz")
    args = _base(tmp)
    args[5] = str(tmp / "far.nii.gz")
    _expect_error([*args, *FAST, "--save-priors", str(tmp / "priors")], 5, "moved the mask of support 1",
                  "entirely outside the query's field of view")
    assert not (tmp / "pred.nii.gz").exists() and not (tmp / "priors").exists()


def test_unexpected_errors_are_one_line_outside_tests(files, monkeypatch):
    tmp, _ = files
    monkeypatch.setattr(cli_main, "debug_mode", lambda: False)

    def boom(*args, **kwargs):
        raise ZeroDivisionError("bug")

    monkeypatch.setattr("spasem.core.pipeline.Engine.run", boom)
    result = CliRunner().invoke(cli, ["run", *_base(tmp), *FAST])
    assert result.exit_code == cli_main.INTERNAL_ERROR_EXIT
    assert "spasem: error: internal error: ZeroDivisionError: bug" in result.stderr
    # under tests (debug mode) the exception itself propagates, with its traceback
    monkeypatch.setattr(cli_main, "debug_mode", lambda: True)
    result = CliRunner().invoke(cli, ["run", *_base(tmp), *FAST])
    assert isinstance(result.exception, ZeroDivisionError)


def test_console_script_entry_point_runs(tmp_path):
    """The installed `spasem` script (python -m spasem) answers and exits 2 with one line on bad input."""
    env = {**os.environ, "SPASEM_DISABLE_PLUGIN_AUTOLOAD": "1"}
    env.pop("PYTEST_CURRENT_TEST", None)
    ok = subprocess.run([sys.executable, "-m", "spasem", "--version"], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and spasem.__version__ in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "spasem", "run", "--support", "a.nii.gz", "--support-mask", "b.nii.gz",
                          "--query", "c.nii.gz", "-o", str(tmp_path / "o.nii.gz")], capture_output=True, text=True,
                         env=env, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip() == "spasem: error: 'a.nii.gz': no such file or folder"


def test_real_dicom_support_with_flipped_labels(shared_data, tmp_path):
    """The shared CT (DICOM folder) with its y-flipped label file as support, itself as query:
    the liver comes back on the DICOM grid (a mirrored label would fail)."""
    folder = shared_data / "ct-dicom-liver-spleen"
    result = _run(["--support", str(folder / "dicom"), "--support-mask", str(folder / "labels.nii.gz"), "--label", "5",
                   "--query", str(folder / "dicom"), "-o", str(tmp_path / "liver.nii.gz"), "--registration", "identity",
                   "--encoder", "intensity", "--set", "encoder.options.stride=8", "--fusion", "spatial_only", "-q"])
    assert result.exit_code == 0, result.output
    pred = spasem.load(tmp_path / "liver.nii.gz", is_label=True)
    ct = spasem.load(folder / "dicom")
    assert pred.grid.same_as(ct.grid)
    truth = spasem.load(folder / "labels.nii.gz", is_label=True).reoriented_onto(ct.grid).array == 5
    assert dice(pred.array, truth) > 0.95
