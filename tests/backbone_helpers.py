"""Helpers for the foundation-backbone tests: the real architectures with random weights,
saved in the official checkpoint layouts, and small synthetic CT/MR scans."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from spasem.core.volume import Volume


def write_sam_checkpoint(path: Path, seed: int = 0, prefix: str = "", extra: dict | None = None) -> dict:
    """SAM-Med3D with random weights saved like the official file: ``{"model_state_dict": ...}``.
    Returns the state dict written."""
    from spasem.models.sam_med3d import build_model

    torch.manual_seed(seed)
    model = build_model()
    with torch.no_grad():  # non-trivial relative positions (zero-initialised otherwise)
        for name, param in model.named_parameters():
            if "rel_pos" in name:
                param.normal_(0.0, 0.05)
    state = {prefix + k: v for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state_dict": state, **(extra or {})}, path)
    return state


def write_icon_checkpoint(path: Path, seed: int = 0) -> dict:
    """(uni|multi)GradICON with random weights saved like ``Step_2_final.trch`` (the state dict
    of ``regis_net``). A random network predicts exactly zero displacement."""
    from spasem.models.gradicon import build_network

    torch.manual_seed(seed)
    net = build_network((65, 65, 65))
    state = net.regis_net.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def write_all_weights(home: Path) -> dict[str, Path]:
    """Random-weight checkpoints of the three models at their cache paths under ``home``
    (use with ``SPASEM_HOME=home``)."""
    weights = home / "weights"
    paths = {
        "sam-med3d-turbo": weights / "sam-med3d" / "sam_med3d_turbo.pth",
        "unigradicon": weights / "unigradicon" / "Step_2_final.trch",
        "multigradicon": weights / "multigradicon" / "Step_2_final.trch",
    }
    write_sam_checkpoint(paths["sam-med3d-turbo"])
    write_icon_checkpoint(paths["unigradicon"], seed=1)
    write_icon_checkpoint(paths["multigradicon"], seed=2)
    return paths


def phantom(modality: str, shift_mm: float = 0.0, spacing=(2.5, 2.5, 3.0), shape=(64, 64, 40),
            organ_lo=(22, 24, 14), organ_hi=(40, 44, 28), seed: int = 0) -> tuple[Volume, Volume]:
    """A body ellipsoid with one organ box (the mask), CT (HU, air -1000) or MR (>= 0)
    intensities. ``shift_mm`` moves the origin along x."""
    rng = np.random.default_rng(seed)
    idx = np.indices(shape).astype(np.float32)
    centre = (np.asarray(shape) - 1) / 2
    radii = np.asarray(shape) * np.array([0.42, 0.38, 0.48])
    body = (((idx - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1.0
    organ = np.zeros(shape, np.uint8)
    organ[organ_lo[0]:organ_hi[0], organ_lo[1]:organ_hi[1], organ_lo[2]:organ_hi[2]] = 1
    if modality == "CT":
        image = np.full(shape, -1000.0, np.float32)
        image[body] = 20.0
        image[organ > 0] = 120.0
        noise = 10.0
    else:
        image = np.zeros(shape, np.float32)
        image[body] = 300.0
        image[organ > 0] = 700.0
        noise = 15.0
    image += rng.normal(0.0, noise, shape).astype(np.float32)
    origin = (-80.0 + shift_mm, -80.0, -60.0)
    img = Volume.from_array(image, spacing=spacing, origin=origin, name=f"{modality.lower()}.nii.gz")
    mask = Volume.from_array(organ, spacing=spacing, origin=origin, is_label=True, name=f"{modality.lower()}_mask.nii.gz")
    return img, mask


_SHARED_HOME: Path | None = None


def shared_weights_home() -> Path:
    """One folder per test process holding random-weight checkpoints of all three models at
    their cache paths (written once: building and saving them takes seconds); removed at exit."""
    global _SHARED_HOME
    if _SHARED_HOME is None:
        import atexit
        import shutil
        import tempfile

        home = Path(tempfile.mkdtemp(prefix="spasem-test-weights-"))
        atexit.register(shutil.rmtree, home, True)
        write_all_weights(home)
        _SHARED_HOME = home
    return _SHARED_HOME


def isolate(monkeypatch, home: Path) -> None:
    """Point spasem at ``home`` for weights, forbid downloads, use only built-in plugins."""
    from spasem.core import registry

    monkeypatch.setenv("SPASEM_HOME", str(home))
    monkeypatch.setenv("SPASEM_OFFLINE", "1")
    monkeypatch.setenv("SPASEM_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry.reset_registry()
