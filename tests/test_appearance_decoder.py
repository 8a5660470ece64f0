"""The weight-free ``appearance`` decoder: the fused mask as a soft spatial prior times the query's
own intensity model (core vs surrounding band)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spasem.core.backends import Features
from spasem.core.metrics import dice
from spasem.core.registry import get_registry
from spasem.core.volume import Volume
from spasem.errors import ConfigError
from spasem.plugins.decoders.appearance import AppearanceDecoder, log_likelihood_ratio

SPACING = (1.2, 1.5, 2.5)  # anisotropic on purpose: every distance is in mm


def _ellipsoid(shape, centre_mm, radii_mm, spacing=SPACING) -> np.ndarray:
    axes = [np.arange(n) * s for n, s in zip(shape, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    return ((x - centre_mm[0]) / radii_mm[0]) ** 2 + ((y - centre_mm[1]) / radii_mm[1]) ** 2 + \
        ((z - centre_mm[2]) / radii_mm[2]) ** 2 <= 1.0


def _scene(seed: int = 0):
    """An organ (intensity 100) in background tissue (40), plus a far-away decoy with the organ's
    intensity; Gaussian noise (sd 8). Returns (image, truth, fused logits of a seed mask that is a
    shifted and shrunken copy of the organ, i.e. a registration error)."""
    shape = (48, 40, 28)
    rng = np.random.default_rng(seed)
    truth = _ellipsoid(shape, (28, 30, 35), (14, 15, 25))
    decoy = _ellipsoid(shape, (48, 48, 35), (5, 5, 10))
    image = np.where(truth | decoy, 100.0, 40.0) + rng.normal(0, 8, shape)
    seed_mask = _ellipsoid(shape, (31, 27, 38), (11, 12, 20))
    grid_args = dict(spacing=SPACING, origin=(3.0, -7.0, 11.0))
    fused = Volume.from_array(np.where(seed_mask, 5.0, -5.0).astype(np.float32), **grid_args, name="fused")
    return Volume.from_array(image.astype(np.float32), **grid_args, name="image"), truth, decoy, fused


def _features(grid) -> Features:
    coarse = grid.scaled(2)
    return Features(torch.zeros(2, *coarse.shape), coarse, grid)


def test_registered_and_is_the_classical_default():
    from spasem.core.config import CLASSICAL

    assert get_registry().get("decoder", "appearance").cls is AppearanceDecoder
    assert CLASSICAL["decoder"]["name"] == "appearance"


def test_recovers_the_boundary_from_a_misplaced_seed_and_ignores_a_far_decoy():
    image, truth, decoy, fused = _scene()
    seed_dice = dice(fused.array > 0, truth)
    out = AppearanceDecoder().decode(fused, _features(fused.grid), image)
    assert out.grid.same_as(fused.grid) and out.array.dtype == np.float32
    pred = out.array > 0
    assert seed_dice < 0.75
    assert dice(pred, truth) > 0.9 > seed_dice + 0.15
    assert not pred[decoy].any()  # same intensity as the organ but far from the prior


def test_more_iterations_stay_close():
    image, truth, _, fused = _scene(1)
    one = AppearanceDecoder().decode(fused, _features(fused.grid), image).array > 0
    three = AppearanceDecoder(AppearanceDecoder.Config(iterations=3)).decode(fused, _features(fused.grid), image).array > 0
    assert dice(three, truth) >= dice(one, truth) - 0.02


def test_prior_limits_how_far_the_result_reaches():
    """Beyond the distance where the soft prior falls below sigmoid(-max_log_ratio) no voxel can be
    inside, whatever the image says (here the whole image looks like the core)."""
    image, _, _, fused = _scene()
    flat = image.with_array(np.full(image.shape, 100.0, np.float32))
    flat.array[fused.array > 0] += np.random.default_rng(0).normal(0, 1, int((fused.array > 0).sum())).astype(np.float32)
    decoder = AppearanceDecoder(AppearanceDecoder.Config(prior_sigma_mm=3.0, max_log_ratio=2.0))
    pred = decoder.decode(fused, _features(fused.grid), flat).array > 0
    from scipy import ndimage

    distance = ndimage.distance_transform_edt(fused.array <= 0, sampling=SPACING)
    assert pred.any() and not pred[distance > 3.0 * 4].any()


def test_passes_the_fused_logits_through_without_enough_samples():
    image, _, _, fused = _scene()
    empty = fused.with_array(np.full(fused.shape, -5.0, np.float32))
    out = AppearanceDecoder().decode(empty, _features(fused.grid), image)
    np.testing.assert_array_equal(out.array, empty.array)
    everything = fused.with_array(np.full(fused.shape, 5.0, np.float32))  # no band around it
    np.testing.assert_array_equal(AppearanceDecoder().decode(everything, _features(fused.grid), image).array, everything.array)
    tiny = fused.with_array(np.full(fused.shape, -5.0, np.float32))
    tiny.array[20:22, 20:22, 14:16] = 5.0  # 8 voxels: too few core samples
    np.testing.assert_array_equal(AppearanceDecoder().decode(tiny, _features(fused.grid), image).array, tiny.array)


def test_constant_image_leaves_the_soft_prior_alone():
    """No appearance contrast: the logits are the logit of the smoothed seed (sigma in mm per axis)."""
    from scipy import ndimage

    _, _, _, fused = _scene()
    flat = fused.with_array(np.full(fused.shape, 7.0, np.float32))
    out = AppearanceDecoder(AppearanceDecoder.Config(prior_sigma_mm=4.0)).decode(fused, _features(fused.grid), flat)
    prior = np.clip(ndimage.gaussian_filter((fused.array > 0).astype(np.float64), 4.0 / np.asarray(SPACING), mode="constant"),
                    1e-4, 1 - 1e-4)
    np.testing.assert_allclose(out.array, np.log(prior / (1 - prior)), atol=2e-3)


@settings(max_examples=40, deadline=None)
@given(
    mu_in=st.floats(-500, 500), mu_out=st.floats(-500, 500), sd=st.floats(0.1, 50),
    bins=st.integers(4, 256), clip=st.floats(0.5, 8),
)
def test_log_likelihood_ratio_properties(mu_in, mu_out, sd, bins, clip):
    rng = np.random.default_rng(0)
    inside, outside = rng.normal(mu_in, sd, 2000), rng.normal(mu_out, sd, 2000)
    values = np.array([[mu_in, mu_out], [-1e9, 1e9]])
    ratio = log_likelihood_ratio(inside, outside, values, bins, clip)
    assert ratio.shape == values.shape and ratio.dtype == np.float32 and np.all(np.isfinite(ratio))
    assert np.all(np.abs(ratio) <= clip + 1e-6)
    if abs(mu_in - mu_out) > 6 * sd:  # well separated: each mean is claimed by its own side
        assert ratio[0, 0] > 0 > ratio[0, 1]
    swapped = log_likelihood_ratio(outside, inside, values, bins, clip)
    np.testing.assert_allclose(swapped, -ratio, atol=1e-5)


def test_identical_samples_give_zero_ratio():
    assert not np.any(log_likelihood_ratio(np.full(100, 3.0), np.full(100, 3.0), np.arange(5.0), 16, 4.0))


@pytest.mark.parametrize("options, field", [
    ({"band_mm": (10.0, 5.0)}, "band_mm"),
    ({"prior_sigma_mm": 0}, "prior_sigma_mm"),
    ({"iterations": 0}, "iterations"),
    ({"sigma": 3}, "sigma"),
])
def test_options_are_validated(options, field):
    with pytest.raises(ConfigError, match=field):
        AppearanceDecoder.parse_options(options)


def test_postprocess_keeps_the_largest_component():
    arr = np.zeros((20, 20, 20), np.uint8)
    arr[2:8, 2:8, 2:8] = 1
    arr[15:17, 15:17, 15:17] = 1
    mask = Volume.from_array(arr, spacing=SPACING, is_label=True)
    out = AppearanceDecoder(AppearanceDecoder.Config(largest_component=True)).postprocess(mask)
    assert int(out.array.sum()) == 6 ** 3 and out.array.dtype == np.uint8
