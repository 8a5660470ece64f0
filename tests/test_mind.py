"""The ``mind`` encoder: MIND-SSC itself, feature grid and norms, invariance of the MIND block to
intensity remaps (exact for affine maps, approximate for monotonic ones), the intensity embedding's
Gaussian kernel, option validation."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spasem.core.registry import get_registry
from spasem.core.resample import resample
from spasem.core.volume import Volume
from spasem.errors import ConfigError
from spasem.plugins.encoders.mind import SSC_PAIRS, MindEncoder, mind_ssc, robust_normalise
from tests.phantom_helpers import phantom_case, physical_centroid

MIND_ONLY = MindEncoder.Config(intensity_bins=0)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (F.normalize(a, dim=0) * F.normalize(b, dim=0)).sum(dim=0)


@lru_cache(maxsize=1)
def kidney_window() -> Volume:
    """A 48^3 window at 1.5 mm (canonical RAS) of the MR phantom around its left kidney, as the
    engine would hand it to the encoder."""
    mr, label = phantom_case(0, "mr")
    grid = mr.grid.canonical(1.5)
    centre = np.round(grid.physical_to_index(physical_centroid(label, 3))).astype(int)
    window = resample(mr, grid.subgrid(centre - 24, (48, 48, 48)), fill="min")
    return window


def test_ssc_pairs_are_the_twelve_orthogonal_neighbour_pairs():
    six = np.array([(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)])
    assert len(SSC_PAIRS) == len(set(SSC_PAIRS)) == 12
    for a, b in SSC_PAIRS:
        assert a < b and six[a] @ six[b] == 0


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dilation=st.integers(1, 3))
def test_mind_ssc_values_in_unit_interval_with_max_one(seed, dilation):
    image = torch.as_tensor(np.random.default_rng(seed).normal(size=(10, 9, 8)), dtype=torch.float32)
    mind = mind_ssc(image, dilation=dilation)
    assert mind.shape == (12, 10, 9, 8)
    assert bool(((mind > 0) & (mind <= 1)).all())
    torch.testing.assert_close(mind.max(dim=0).values, torch.ones(10, 9, 8))


def test_mind_ssc_of_a_constant_image_is_uniform():
    mind = mind_ssc(torch.full((6, 6, 6), 7.0))
    torch.testing.assert_close(mind, torch.ones(12, 6, 6, 6))


@pytest.mark.parametrize(("shape", "resolution", "stride"), [((30, 34, 36), 2, 2), ((20, 21, 22), 1, 3), ((16, 16, 16), 2, 1)])
def test_feature_grid_is_the_window_grid_scaled_by_resolution_times_stride(shape, resolution, stride):
    rng = np.random.default_rng(0)
    direction = np.diag([-1.0, -1.0, 1.0])
    image = Volume.from_array(rng.normal(100, 20, shape).astype(np.float32), spacing=(1.5, 1.5, 1.5),
                              origin=(10.0, -4.0, 3.0), direction=direction)
    encoder = MindEncoder(MindEncoder.Config(dilations=(1, 2), intensity_bins=5, intensity_scales=(0.0, 1.0),
                                             resolution=resolution, stride=stride))
    features = encoder.encode(image)
    expected = image.grid.scaled(resolution * stride)
    assert features.grid.same_as(expected)
    assert features.window.same_as(image.grid)
    assert tuple(features.data.shape) == (12 * 2 + 5 * 2, *expected.shape)
    assert features.data.dtype == torch.float32 and bool(torch.isfinite(features.data).all())


@pytest.mark.parametrize(
    ("options", "norm"),
    [({"intensity_bins": 0}, 1.0),
     ({"intensity_bins": 0, "mind_weight": 0.3}, 0.3),
     ({"mind_weight": 0.5, "intensity_bins": 16, "intensity_weight": 1.0}, math.sqrt(0.25 + 1.0)),
     ({"mind_weight": 0.0, "intensity_bins": 8, "intensity_scales": (0.0, 2.0), "intensity_weight": 2.0}, math.sqrt(8.0))],
)
def test_each_block_is_l2_normalised_and_weighted(options, norm):
    """Per voxel, every block has norm = its weight, so the feature norm is sqrt(sum weight^2)."""
    features = MindEncoder(MindEncoder.Config(**options)).encode(kidney_window())
    norms = features.data.norm(dim=0)
    torch.testing.assert_close(norms, torch.full_like(norms, norm), atol=1e-4, rtol=1e-4)
    if options.get("mind_weight", 1.0) > 0:
        mind_norms = features.data[: 12 * 2].norm(dim=0)  # default dilations (1, 2): 24 MIND channels first
        torch.testing.assert_close(mind_norms, torch.full_like(mind_norms, options.get("mind_weight", 1.0)), atol=1e-4, rtol=1e-4)


def test_standardized_mind_channels_are_centred():
    """``standardize``: each MIND channel has zero mean over the window before the L2 scaling, so
    cosine similarities are spread over [-1, 1] instead of all close to 1."""
    window = kidney_window()
    raw = MindEncoder(MindEncoder.Config(intensity_bins=0, standardize=False)).encode(window).data.flatten(1)
    centred = MindEncoder(MindEncoder.Config(intensity_bins=0)).encode(window).data.flatten(1)
    pick = torch.arange(0, raw.shape[1], 97)
    raw_cos = F.normalize(raw[:, pick], dim=0).T @ F.normalize(raw[:, pick], dim=0)
    centred_cos = F.normalize(centred[:, pick], dim=0).T @ F.normalize(centred[:, pick], dim=0)
    assert float(raw_cos.min()) > 0.3  # all MIND values positive: measured min 0.46, mean 0.75
    assert float(raw_cos.mean()) > 0.7
    assert float(centred_cos.min()) < -0.5 and abs(float(centred_cos.mean())) < 0.1  # measured -0.86, 0.008


@settings(max_examples=8, deadline=None)
@given(scale=st.floats(0.05, 20.0) | st.floats(-20.0, -0.05), offset=st.floats(-2000.0, 2000.0))
def test_mind_block_is_invariant_to_affine_intensity_maps(scale, offset):
    """MIND depends on ratios of patch distances: ``a * I + b`` (even a contrast inversion) gives
    the same descriptor."""
    window = kidney_window()
    encoder = MindEncoder(MIND_ONLY)
    reference = encoder.encode(window).data
    remapped = encoder.encode(window.with_array((scale * window.array.astype(np.float64) + offset).astype(np.float32))).data
    torch.testing.assert_close(remapped, reference, atol=2e-3, rtol=0)


def test_mind_block_is_nearly_invariant_to_monotonic_remaps_and_intensity_block_is_not():
    """A non-linear monotonic remap (square root, square) changes the patch distances unevenly:
    MIND stays close (mean cosine > 0.95; a 9 mm shift of the same image gives < 0.6), while the
    intensity embedding (the classical preset's 96 bins over (-2, 4)), modality-specific by
    design, changes much more (measured: MIND mean cosine 0.99 / 0.98, intensity 0.61 / 0.43)."""
    window = kidney_window()
    arr = np.maximum(window.array.astype(np.float64), 0.0)
    mind = MindEncoder(MIND_ONLY)
    reference = mind.encode(window).data
    shifted = mind.encode(window.with_array(np.roll(window.array, 6, axis=0))).data
    assert float(_cosine(reference, shifted).mean()) < 0.6
    both = MindEncoder(MindEncoder.Config(mind_weight=1.0, intensity_bins=96, intensity_range=(-2.0, 4.0)))
    both_reference = both.encode(window).data
    for remapped in (np.sqrt(arr), arr * arr / 1000.0):
        volume = window.with_array(remapped.astype(np.float32))
        mind_cos = _cosine(reference, mind.encode(volume).data)
        assert float(mind_cos.mean()) > 0.95
        assert float(torch.quantile(mind_cos.flatten(), 0.1)) > 0.85
        intensity_cos = _cosine(both_reference[24:], both.encode(volume).data[24:])
        assert float(intensity_cos.mean()) < float(mind_cos.mean()) - 0.3


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), bins=st.integers(24, 64))
def test_intensity_embedding_cosine_is_a_gaussian_kernel(seed, bins):
    """With ``intensity_bins`` centres ``w`` apart, the cosine of two voxels' embeddings is
    ``exp(-(t1 - t2)^2 / (4 w^2))`` of their robust intensities ``t`` (away from the range ends)."""
    lo, hi = -3.0, 5.0
    rng = np.random.default_rng(seed)
    array = rng.gamma(2.0, 50.0, (6, 6, 6)).astype(np.float32)
    image = Volume.from_array(array)
    config = MindEncoder.Config(mind_weight=0.0, intensity_bins=bins, intensity_range=(lo, hi), intensity_scales=(0.0,),
                                resolution=1, stride=1, presmooth=0.0)
    features = MindEncoder(config).encode(image).data.flatten(1)
    t = robust_normalise(torch.as_tensor(array), float(array.min())).flatten()
    w = (hi - lo) / (bins - 1)
    interior = (t > lo + 3 * w) & (t < hi - 3 * w)
    assert int(interior.sum()) >= 10
    f, t = features[:, interior], t[interior]
    cos = F.normalize(f, dim=0).T @ F.normalize(f, dim=0)
    kernel = torch.exp(-((t[:, None] - t[None, :]) ** 2) / (4 * w * w))
    torch.testing.assert_close(cos, kernel, atol=2e-3, rtol=0)


def test_registered_and_options_validated():
    registry = get_registry()
    assert registry.get("encoder", "mind").cls is MindEncoder
    with pytest.raises(ConfigError, match="encoder 'mind': dilation: unknown option"):
        MindEncoder.parse_options({"dilation": 2})
    for bad in ({"resolution": 0}, {"resolution": 9}, {"stride": 0}, {"sigma": 0.0}, {"intensity_bins": -1},
                {"mind_weight": -1.0}, {"presmooth": -0.5}):
        with pytest.raises(ConfigError, match=f"encoder 'mind': {next(iter(bad))}"):
            MindEncoder.parse_options(bad)
    config = MindEncoder.parse_options({"dilations": [1, 3], "intensity_range": [-1, 2]})
    assert config.dilations == (1, 3) and config.intensity_range == (-1.0, 2.0)
    with pytest.raises(ConfigError, match="no channels"):
        MindEncoder(MindEncoder.Config(mind_weight=0.0, intensity_bins=0)).encode(Volume.from_array(np.ones((8, 8, 8), np.float32)))
