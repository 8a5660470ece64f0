"""Shared fixtures: the real test data beside the checkout, small synthetic volumes, a clean
plugin environment."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from spasem.core.volume import Volume

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` next to the checkout (read-only real scans); skipped where absent,
    e.g. in a user's own clone."""
    if not (SHARED_DATA / "ct-dicom-liver-spleen").is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA} (only present beside the project's CI checkout)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_plugins(monkeypatch):
    """Tests see only the built-in plugins unless they opt in, and a fresh default registry."""
    from spasem.core import registry

    monkeypatch.setenv("SPASEM_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry.reset_registry()
    yield
    registry.reset_registry()


def blob_pair(shift_vox: int = 0, spacing=(2.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0)) -> tuple[Volume, Volume]:
    """A small synthetic scan: a body box with one bright organ box, and the organ's mask.
    ``shift_vox`` moves the organ along i."""
    image = np.zeros((48, 44, 32), np.float32)
    image[6:42, 6:38, 4:28] = 100.0
    organ = np.zeros(image.shape, np.uint8)
    organ[16 + shift_vox : 30 + shift_vox, 14:30, 10:22] = 1
    image[organ > 0] = 300.0
    rng = np.random.default_rng(0)
    image += rng.normal(0, 5, image.shape).astype(np.float32)
    return (
        Volume.from_array(image, spacing=spacing, origin=origin, name="blob.nii.gz"),
        Volume.from_array(organ, spacing=spacing, origin=origin, is_label=True, name="blob_mask.nii.gz"),
    )


@pytest.fixture
def blob():
    return blob_pair()


@pytest.fixture
def fast_config() -> dict:
    """A pipeline configuration small enough for unit tests (64^3 windows)."""
    return {
        "registration": "identity",
        "encoder": {"name": "intensity", "options": {"stride": 4}},
        "window": {"size": 48},
    }


def pytest_configure(config):
    os.environ.setdefault("MPLBACKEND", "Agg")
