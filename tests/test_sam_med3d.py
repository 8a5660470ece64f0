"""SAM-Med3D on medim, random weights: the exact fast encoder path, strict loading of the
official checkpoint layouts, the encoder's normalisation and geometry, and mask prompting."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from tests.backbone_helpers import isolate, shared_weights_home, write_sam_checkpoint

from spasem.core.backends import Features, RunContext
from spasem.core.volume import RAS_DIRECTION, Grid, Volume
from spasem.errors import ConfigError, WeightsError
from spasem.models import sam_med3d as sam

medim_sam = pytest.importorskip("medim.models.sam_med3d", reason="medim is not installed")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    isolate(monkeypatch, shared_weights_home())
    yield
    sam.clear_cache()


def _random_block(dim: int, heads: int, window: int, grid: tuple[int, int, int], seed: int = 0):
    torch.manual_seed(seed)
    block = medim_sam.Block3D(dim=dim, num_heads=heads, use_rel_pos=True, window_size=window, input_size=grid,
                              norm_layer=torch.nn.LayerNorm).eval()
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.3)
    return block


@pytest.mark.parametrize("grid", [(8, 8, 8), (5, 7, 6), (14, 3, 9)])
def test_fast_windowed_block_equals_the_module(grid):
    block = _random_block(dim=96, heads=4, window=14, grid=grid)
    x = torch.randn(2, *grid, 96)
    with torch.no_grad():
        reference = block(x)
        fast = sam.fast_block_forward(block, x)
    assert fast.shape == reference.shape
    assert float((fast - reference).abs().max()) <= 1e-5


def test_fast_path_under_autocast_matches_the_module_under_autocast():
    """Mixed precision (on CUDA: fp16/bf16 autocast) goes through the same dtype plumbing; checked
    here with CPU bf16 autocast."""
    block = _random_block(dim=96, heads=4, window=14, grid=(8, 8, 8), seed=2)
    x = torch.randn(1, 8, 8, 8, 96)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = block(x)
        fast = sam.fast_block_forward(block, x)
    assert fast.dtype == reference.dtype
    assert float((fast.float() - reference.float()).abs().max()) <= 1e-5


def test_fast_path_falls_back_where_it_does_not_apply():
    big = _random_block(dim=48, heads=2, window=4, grid=(6, 6, 6))  # grid larger than one window
    glob = _random_block(dim=48, heads=2, window=0, grid=(5, 5, 5))  # global attention
    with torch.no_grad():
        x = torch.randn(1, 6, 6, 6, 48)
        assert torch.equal(sam.fast_block_forward(big, x), big(x))
        y = torch.randn(1, 5, 5, 5, 48)
        assert torch.equal(sam.fast_block_forward(glob, y), glob(y))


@pytest.mark.slow
def test_fast_encoder_equals_the_unmodified_medim_encoder():
    """The whole ViT-B encoder at its official 128^3 input, random weights (rel. positions too)."""
    torch.manual_seed(3)
    model = sam.build_model().eval()
    with torch.no_grad():
        for name, param in model.image_encoder.named_parameters():
            if "rel_pos" in name:
                param.normal_(0.0, 0.2)
        image = torch.randn(1, 1, 128, 128, 128)
        reference = model.image_encoder(image)
        fast = sam.encoder_forward(model.image_encoder, image, fast=True)
    assert reference.shape == (1, 384, 8, 8, 8)
    assert float((fast - reference).abs().max()) <= 1e-5


# -- loading ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def official_state() -> dict:
    torch.manual_seed(0)
    return sam.build_model().state_dict()


def test_loading_accepts_training_checkpoints_strictly(tmp_path):
    """A checkpoint written by a training script: DataParallel 'module.' prefix, arguments as
    an argparse.Namespace and optimizer state beside the weights."""
    path = tmp_path / "trained.pth"
    state = write_sam_checkpoint(path, seed=5, prefix="module.",
                                 extra={"args": argparse.Namespace(lr=1e-4), "epoch": 3})
    model = sam.load_model(path)
    loaded = model.state_dict()
    assert set(loaded) == {k[len("module."):] for k in state}
    assert torch.equal(loaded["image_encoder.pos_embed"], state["module.image_encoder.pos_embed"])
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())


def test_loading_refuses_a_mismatching_checkpoint(tmp_path, official_state):
    broken = dict(official_state)
    del broken["mask_decoder.iou_token.weight"]
    broken["image_encoder.pos_embed"] = torch.zeros(1, 16, 16, 16, 768)
    broken["image_encoder.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save({"model_state_dict": broken}, path)
    with pytest.raises(WeightsError) as info:
        sam.load_model(path)
    message = info.value.message
    assert "missing key(s): mask_decoder.iou_token.weight" in message
    assert "unexpected key(s): image_encoder.extra.weight" in message
    assert "image_encoder.pos_embed (checkpoint (1, 16, 16, 16, 768), model (1, 8, 8, 8, 768))" in message


def test_non_checkpoint_content_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsError, match="not a SAM-Med3D checkpoint"):
        sam.load_model(path)


# -- encoder and decoder backends ---------------------------------------------------------------
def _window(values: np.ndarray) -> Volume:
    grid = Grid(values.shape, (1.5, 1.5, 1.5), (10.0, -20.0, 5.0), RAS_DIRECTION)
    return Volume(values.astype(np.float32), grid, name="window")


def _backend(kind: str, name: str, **options):
    from spasem.core.registry import get_registry

    return get_registry().create(kind, name, options, RunContext())


def test_window_normalisation_uses_the_voxels_above_zero():
    from spasem.plugins.encoders.sam_med3d import normalise_window

    rng = np.random.default_rng(0)
    values = rng.normal(40.0, 30.0, (32, 32, 32))
    values[:, :, :10] = -1000.0  # air: outside the statistics
    out = normalise_window(values)
    inside = out[values > 0]
    assert abs(float(inside.mean())) < 1e-4 and float(inside.std(ddof=1)) == pytest.approx(1.0, abs=1e-4)
    assert np.allclose(normalise_window(values * 3.0), out, atol=1e-5)  # positive rescaling
    assert np.allclose(normalise_window(np.where(values < -999, -10.0, values))[values > 0], inside, atol=1e-5)
    constant = normalise_window(np.full((8, 8, 8), -5.0))  # nothing > 0: all voxels, constant: centred
    assert np.allclose(constant, 0.0)


def test_encoder_geometry_and_one_model_for_encoder_and_decoder():
    rng = np.random.default_rng(0)
    values = rng.normal(40.0, 30.0, (128, 128, 128))
    values[:, :, :40] = -1000.0
    encoder = _backend("encoder", "sam-med3d")
    window = _window(values)
    features = encoder.encode(window)
    assert isinstance(features, Features)
    assert features.data.shape == (384, 8, 8, 8) and features.data.dtype == torch.float32
    assert torch.isfinite(features.data).all()
    assert features.window.same_as(window.grid)
    assert features.grid.same_as(window.grid.scaled(16))
    decoder = _backend("decoder", "sam-med3d")
    assert decoder.model is encoder.model  # one loaded model for both


def test_encoder_needs_128_windows_and_decoder_needs_its_features():
    encoder = _backend("encoder", "sam-med3d")
    with pytest.raises(ConfigError, match="needs 128\\^3 windows .* set window.size=128"):
        encoder.encode(_window(np.zeros((64, 64, 64))))
    decoder = _backend("decoder", "sam-med3d")
    window = _window(np.zeros((128, 128, 128)))
    foreign = Features(torch.zeros(6, 64, 64, 64), window.grid.scaled(2), window.grid)
    with pytest.raises(ConfigError, match="needs the 'sam-med3d' encoder's image embedding"):
        decoder.decode(window, foreign, window)


def test_the_mask_prompt_reaches_the_decoder():
    torch.manual_seed(0)
    window = _window(np.zeros((128, 128, 128)))
    features = Features(torch.randn(384, 8, 8, 8), window.grid.scaled(16), window.grid)
    decoder = _backend("decoder", "sam-med3d")
    inside = np.full((128, 128, 128), -10.0, np.float32)
    inside[40:90, 30:100, 50:80] = 10.0
    elsewhere = np.full((128, 128, 128), -10.0, np.float32)
    elsewhere[0:30, 0:30, 0:30] = 10.0
    a = decoder.decode(window.with_array(inside), features, window)
    a_again = decoder.decode(window.with_array(inside), features, window)
    b = decoder.decode(window.with_array(elsewhere), features, window)
    assert a.grid.same_as(window.grid) and a.array.dtype == np.float32
    assert np.array_equal(a.array, a_again.array)
    assert np.abs(a.array - b.array).max() > 1e-3
    # the prompt is clipped: logits beyond the clip give the same output
    c = decoder.decode(window.with_array(inside * 10.0), features, window)
    d = _backend("decoder", "sam-med3d", prompt_clip=10.0).decode(window.with_array(inside * 10.0), features, window)
    assert np.array_equal(d.array, a.array) and not np.array_equal(c.array, a.array)


def test_window_prompt_is_the_block_average():
    logits = torch.arange(128**3, dtype=torch.float32).reshape(128, 128, 128) / 1e5 - 10
    prompt = sam.window_prompt(logits, clip=None)
    assert prompt.shape == (1, 1, 32, 32, 32)
    assert torch.allclose(prompt[0, 0, 3, 5, 7], logits[12:16, 20:24, 28:32].mean())
    clipped = sam.window_prompt(logits * 100, clip=20.0)
    assert float(clipped.max()) <= 20.0 and float(clipped.min()) >= -20.0


def test_missing_medim_is_a_clear_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "medim", None)
    with pytest.raises(ConfigError, match="need the package 'medim'.*pip install medim"):
        sam.build_model()
