"""The weight-free ``threshold`` decoder: logits pass through; optional clean-up of the final
mask (largest 26-connected component, hole filling)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spasem.core.backends import Features
from spasem.core.registry import get_registry
from spasem.core.volume import Volume
from spasem.errors import ConfigError
from spasem.plugins.decoders.threshold import ThresholdDecoder


def _mask() -> Volume:
    """A hollow 8^3 cube (a 4^3 hole), a 2^3 blob touching it only at a corner (26-connected),
    and a separate 3^3 blob far away; anisotropic LPS geometry."""
    arr = np.zeros((24, 20, 16), np.uint8)
    arr[2:10, 2:10, 2:10] = 1
    arr[4:8, 4:8, 4:8] = 0  # enclosed hole
    arr[10:12, 10:12, 10:12] = 1  # corner contact with the cube
    arr[18:21, 14:17, 2:5] = 1  # separate
    return Volume.from_array(arr, spacing=(0.8, 0.8, 2.5), origin=(5.0, -3.0, 7.0), is_label=True, name="mask")


def test_decode_returns_the_fused_logits_unchanged():
    logits = Volume.from_array(np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32), spacing=(1.5,) * 3)
    features = Features(torch.zeros(2, 4, 4, 4), logits.grid.scaled(2), logits.grid)
    out = ThresholdDecoder().decode(logits, features, logits)
    assert out.grid.same_as(logits.grid)
    np.testing.assert_array_equal(out.array, logits.array)


@pytest.mark.parametrize(("largest", "fill"), [(False, False), (True, False), (False, True), (True, True)])
def test_postprocess_options(largest, fill):
    mask = _mask()
    out = ThresholdDecoder(ThresholdDecoder.Config(largest_component=largest, fill_holes=fill)).postprocess(mask)
    assert out.grid.same_as(mask.grid) and out.array.dtype == np.uint8
    arr = out.array
    cube_voxels = 8**3 - 4**3
    expected = cube_voxels + 8 + (4**3 if fill else 0) + (0 if largest else 27)
    assert int(arr.sum()) == expected
    assert bool(arr[10, 10, 10]) and bool(arr[11, 11, 11])  # corner-connected blob kept either way
    assert bool(arr[5, 5, 5]) == fill
    assert bool(arr[19, 15, 3]) != largest
    assert set(np.unique(arr)) <= {0, 1}


def test_postprocess_of_an_empty_mask_is_empty():
    empty = _mask().with_array(np.zeros((24, 20, 16), np.uint8))
    out = ThresholdDecoder(ThresholdDecoder.Config(largest_component=True, fill_holes=True)).postprocess(empty)
    assert not out.array.any()


def test_registered_and_options_validated():
    assert get_registry().get("decoder", "threshold").cls is ThresholdDecoder
    with pytest.raises(ConfigError, match="decoder 'threshold': largest: unknown option"):
        ThresholdDecoder.parse_options({"largest": True})
    assert ThresholdDecoder.parse_options({"fill_holes": True}).fill_holes
