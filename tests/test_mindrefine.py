"""The MIND refinement of a registration (spasem.plugins.registration.mindrefine): axis and frame
conventions, recovery of known displacements within and across contrasts, its options."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import SimpleITK as sitk
import torch

from spasem.core.metrics import dice
from spasem.core.priors import gaussian_smooth
from spasem.plugins.registration.mindrefine import (
    MindRefineOptions,
    discrete_search,
    displacement_transform,
    mind_features,
    refine_displacement,
    warp_features,
)


def _texture(shape, seed=0, sigma=1.5) -> np.ndarray:
    noise = torch.from_numpy(np.random.default_rng(seed).normal(size=shape).astype(np.float32))
    return gaussian_smooth(noise, sigma).numpy()


def _blobs(shape, centres, radii) -> np.ndarray:
    """Integer label map of ellipsoids (label i + 1 for centre i), ``[D, H, W]``."""
    grid = np.indices(shape).astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    for n, (c, r) in enumerate(zip(centres, radii)):
        inside = sum(((grid[a] - c[a]) / r[a]) ** 2 for a in range(3)) <= 1.0
        labels[inside] = n + 1
    return labels


def _shift(array: np.ndarray, offset) -> np.ndarray:
    """``out[p] = array[p - offset]`` (edge values where that falls outside)."""
    padded = np.pad(array, [(abs(o), abs(o)) for o in offset], mode="edge")
    return padded[tuple(slice(abs(o) - o, abs(o) - o + n) for o, n in zip(offset, array.shape))]


def test_warp_features_samples_at_position_plus_displacement():
    image = torch.from_numpy(_texture((12, 14, 16)))[None]
    displacement = torch.zeros(3, 12, 14, 16)
    displacement[0], displacement[2] = 2.0, -1.0  # z + 2, x - 1
    warped = warp_features(image, displacement)[0]
    assert torch.allclose(warped[2:8, :, 3:14], image[0, 4:10, :, 2:13], atol=1e-5)


def test_displacement_transform_matches_warp_features_and_the_physical_frame():
    """Resampling through the physical transform equals warping the array by the voxel field, on a
    grid with anisotropic spacing and flipped axes (the canonical RAS grid in LPS)."""
    shape = (10, 12, 14)
    reference = sitk.GetImageFromArray(_texture(shape, seed=3))
    reference.SetSpacing((3.0, 2.0, 1.5))
    reference.SetOrigin((40.0, -7.0, 12.0))
    reference.SetDirection((-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0))
    rng = np.random.default_rng(1)
    field = np.stack([gaussian_smooth(torch.from_numpy(rng.normal(scale=3.0, size=shape).astype(np.float32)), 2.0).numpy()
                      for _ in range(3)])
    transform = displacement_transform(field, reference)
    # one point by hand: voxel (z, y, x) = (4, 5, 6) moves by the field along the index axes
    z, y, x = 4, 5, 6
    point = np.asarray(reference.TransformIndexToPhysicalPoint((x, y, z)))
    expected = np.asarray(reference.TransformContinuousIndexToPhysicalPoint(
        (x + float(field[2, z, y, x]), y + float(field[1, z, y, x]), z + float(field[0, z, y, x]))))
    assert np.allclose(transform.TransformPoint(point.tolist()), expected, atol=1e-6)
    resampled = sitk.GetArrayFromImage(sitk.Resample(reference, reference, transform, sitk.sitkLinear, 0.0))
    warped = warp_features(torch.from_numpy(sitk.GetArrayFromImage(reference))[None], torch.from_numpy(field))[0].numpy()
    inner = (slice(3, -3),) * 3
    assert np.allclose(resampled[inner], warped[inner], atol=1e-4)


def test_discrete_search_recovers_an_integer_translation():
    fixed = _texture((24, 24, 24), seed=5)
    moving = _shift(fixed, (2, -1, 1))  # moving(p + s) = fixed(p)
    options = MindRefineOptions(penalties=(), field_sigma=0.0)
    field = discrete_search(mind_features(fixed, options), mind_features(moving, options), 3, options)
    inner = (slice(5, -5),) * 3
    for axis, expected in enumerate((2, -1, 1)):
        assert torch.all(field[axis][inner] == expected)


@pytest.mark.parametrize("pooling", [1, 2])
def test_refinement_aligns_structures_across_contrasts(pooling):
    """Two ellipsoids moved apart by different displacements; the moving image has another contrast
    ordering (as CT vs MR): the refined field brings both back."""
    shape = (40, 44, 48)
    centres, radii = [(18, 14, 15), (20, 28, 33)], [(7, 6, 8), (6, 5, 5)]
    moved_centres = [(20, 12, 16), (18, 30, 31)]
    fixed_labels, moving_labels = _blobs(shape, centres, radii), _blobs(shape, moved_centres, radii)
    background = _texture(shape, seed=2, sigma=2.0) * 0.1
    fixed = np.choose(fixed_labels, [0.3, 0.8, 0.55]).astype(np.float32) + background
    moving = np.choose(moving_labels, [0.6, 0.2, 0.9]).astype(np.float32) + _texture(shape, seed=9, sigma=2.0) * 0.1
    options = MindRefineOptions(levels=((pooling, 3 if pooling == 1 else 2),), iterations=10)
    field = refine_displacement(fixed, moving, np.ones(shape, bool), options)
    warped = warp_features(torch.from_numpy(moving_labels.astype(np.float32))[None], torch.from_numpy(field))[0].numpy()
    for label in (1, 2):
        before = dice(moving_labels == label, fixed_labels == label)
        after = dice(np.abs(warped - label) < 0.5, fixed_labels == label)
        assert before < 0.75 and after > 0.85, (label, before, after)


def test_refinement_leaves_aligned_images_and_empty_masks_alone():
    image = _texture((20, 20, 20), seed=4)
    options = MindRefineOptions()
    still = np.abs(refine_displacement(image, image, np.ones(image.shape, bool), options))
    # the discrete search finds exactly 0; Adam's normalised first steps wobble by < lr
    assert still.mean() < 0.05 and still.max() < options.learning_rate
    assert not refine_displacement(image, _shift(image, (2, 0, 0)), np.zeros(image.shape, bool), options).any()
    mask = np.zeros(image.shape, bool)
    mask[5:15, 4:16, 6:12] = True
    field = refine_displacement(image, _shift(image, (2, 0, 0)), mask, options)
    assert not field[:, ~np.pad(np.ones((10, 12, 6), bool), ((5, 5), (4, 4), (6, 8)))].any()


def test_options_are_validated():
    with pytest.raises(pydantic.ValidationError):
        MindRefineOptions(levels=((2, 3),), stride=2)
    with pytest.raises(pydantic.ValidationError):
        MindRefineOptions(dilations=())
