"""``spasem run --preset paper`` end to end through the real loading code: random-weight
checkpoints in the official layouts in a temporary SPASEM_HOME, a small CT support and an MR
query (one 128^3 window each), reduced registration input (80^3) for speed."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from tests.backbone_helpers import isolate, phantom, shared_weights_home
from click.testing import CliRunner

import spasem
from spasem.cli.main import cli
from spasem.errors import WeightsError

pytest.importorskip("medim", reason="medim is not installed")
pytest.importorskip("unigradicon", reason="unigradicon is not installed")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    isolate(monkeypatch, shared_weights_home())
    yield
    from spasem.models.sam_med3d import clear_cache

    clear_cache()


@pytest.fixture
def scans(tmp_path):
    support, mask = phantom("CT", seed=11)
    query, _ = phantom("MR", shift_mm=6.0, spacing=(2.4, 2.6, 3.2), seed=12)
    paths = {"support": tmp_path / "ct.nii.gz", "mask": tmp_path / "ct_liver.nii.gz", "query": tmp_path / "mr.nii.gz"}
    spasem.save(support, paths["support"])
    spasem.save(mask, paths["mask"])
    spasem.save(query, paths["query"])
    return paths


def test_paper_preset_is_registered():
    from spasem.core.registry import get_registry

    preset = get_registry().preset("paper").config
    assert preset["registration"]["name"] == "gradicon" and preset["registration"]["options"]["model"] == "auto"
    assert preset["encoder"]["name"] == "sam-med3d"
    assert preset["fusion"]["name"] == "entropy_gate"
    assert preset["decoder"]["name"] == "sam-med3d"


@pytest.mark.slow
def test_run_paper_preset_end_to_end(scans, tmp_path):
    out = tmp_path / "pred.nii.gz"
    priors = tmp_path / "priors"
    result = CliRunner().invoke(cli, [
        "run", "--preset", "paper",
        "--support", str(scans["support"]), "--support-mask", str(scans["mask"]),
        "--query", str(scans["query"]), "-o", str(out),
        "--support-modality", "CT", "--query-modality", "MR",
        "--set", "registration.options.input_shape=80",
        "--save-priors", str(priors),
    ])
    assert result.exit_code == 0, result.output
    assert "multiGradICON: CT support -> MR query at 80x80x80" in result.output
    assert "instance optimisation: off (CPU default" in result.output
    assert "1 query window(s) of 128x128x128 at 1.5 mm" in result.output
    prediction = spasem.load(out, is_label=True)
    query = spasem.load(scans["query"])
    assert prediction.grid.same_as(query.grid)
    assert set(np.unique(prediction.array)) <= {0, 1}
    fused = spasem.load(priors / "fused_logits.nii.gz")
    assert fused.grid.same_as(query.grid) and np.isfinite(fused.array).all()


def test_paper_preset_without_weights_fails_with_one_clear_line(scans, tmp_path, monkeypatch):
    isolate(monkeypatch, tmp_path / "empty-home")
    result = CliRunner().invoke(cli, [
        "run", "--preset", "paper", "-q",
        "--support", str(scans["support"]), "--support-mask", str(scans["mask"]),
        "--query", str(scans["query"]), "-o", str(tmp_path / "pred.nii.gz"),
    ])
    assert result.exit_code == WeightsError.exit_code
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("spasem: error: weights '")
    assert "Step_2_final.trch" in lines[0] and "spasem weights fetch" in lines[0]
    assert not (tmp_path / "pred.nii.gz").exists()


def test_importing_spasem_loads_no_foundation_model_package(tmp_path):
    import subprocess

    code = (
        "import sys, spasem; from spasem.core.registry import get_registry; get_registry();"
        "heavy = [m for m in ('medim', 'unigradicon', 'icon_registration', 'itk') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
