"""Dice 3D / 2D and HD95: hand-computed values, anisotropic spacing, axial axis from geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from spasem.core.metrics import axial_axis, dice, dice_2d, hd95
from spasem.core.volume import Volume
from spasem.errors import GeometryError


def test_dice_2d_hand_computed():
    # axial = array axis 2 (identity direction); slice k=0: P 2 voxels, T 2 voxels, overlap 1 -> 0.5;
    # slice k=1: P empty, T 1 voxel -> 0; slice k=2: both empty -> not counted; slice k=3: identical -> 1
    p = np.zeros((4, 4, 4), np.uint8)
    t = np.zeros((4, 4, 4), np.uint8)
    p[0, 0, 0] = p[0, 1, 0] = 1
    t[0, 1, 0] = t[0, 2, 0] = 1
    t[2, 2, 1] = 1
    p[3, 3, 3] = t[3, 3, 3] = 1
    assert dice_2d(p, t) == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    # 3D Dice of the same masks: 2 * 2 / (3 + 4)
    assert dice(p, t) == pytest.approx(4 / 7)


def test_dice_2d_empty_masks():
    empty = np.zeros((3, 3, 3), bool)
    assert dice_2d(empty, empty) == 1.0
    one = empty.copy()
    one[1, 1, 1] = True
    assert dice_2d(one, empty) == 0.0


def test_axial_axis_follows_the_direction_matrix():
    # columns: i -> S (z), j -> L (x), k -> P (y): the slices perpendicular to S are along array axis 0
    direction = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    grid = Volume.from_array(np.zeros((5, 4, 3)), direction=direction).grid
    assert axial_axis(grid) == 0
    assert axial_axis(Volume.from_array(np.zeros((2, 2, 2))).grid) == 2
    # oblique: k axis tilted 20 degrees from S still counts as the S axis
    a = math.radians(20)
    tilted = np.array([[1.0, 0, 0], [0, math.cos(a), math.sin(a)], [0, -math.sin(a), math.cos(a)]])
    assert axial_axis(Volume.from_array(np.zeros((2, 2, 2)), direction=tilted).grid) == 2


def test_dice_2d_uses_axial_slices_of_the_volume_geometry():
    p = np.zeros((4, 3, 3), np.uint8)
    t = np.zeros((4, 3, 3), np.uint8)
    p[0, 0, 0] = p[0, 0, 1] = 1
    t[0, 0, 0] = t[0, 0, 1] = 1
    t[1, 0, 0] = 1
    # array axis 0 runs along S here: slice i=0 identical -> 1; slice i=1 truth only -> 0; mean 0.5
    direction = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    pv = Volume.from_array(p, direction=direction, is_label=True)
    tv = Volume.from_array(t, direction=direction, is_label=True)
    assert dice_2d(pv, tv) == pytest.approx(0.5)
    assert dice_2d(p, t, axis=0) == pytest.approx(0.5)
    # slicing along array axis 2 instead (bare arrays): k=0 -> 2*1/3, k=1 -> 1; mean 5/6
    assert dice_2d(p, t) == pytest.approx(5 / 6)


def test_metrics_refuse_volumes_on_different_grids():
    a = Volume.from_array(np.ones((3, 3, 3), np.uint8), is_label=True)
    b = Volume.from_array(np.ones((3, 3, 3), np.uint8), spacing=(2, 2, 2), is_label=True)
    with pytest.raises(GeometryError):
        dice_2d(a, b)
    with pytest.raises(GeometryError):
        hd95(a, b)


def test_hd95_two_planes_anisotropic_spacing():
    # two one-voxel-thick planes 4 voxels apart along i; spacing 1.5 mm along i -> 6 mm everywhere
    p = np.zeros((8, 10, 10), bool)
    t = np.zeros((8, 10, 10), bool)
    p[1] = True
    t[5] = True
    assert hd95(p, t, spacing=(1.5, 1.0, 1.0)) == pytest.approx(6.0)
    assert hd95(p, t, spacing=(1.0, 0.7, 3.0)) == pytest.approx(4.0)
    # the Volume's spacing is used when none is given
    pv = Volume.from_array(p.astype(np.uint8), spacing=(2.5, 1, 1), is_label=True)
    tv = Volume.from_array(t.astype(np.uint8), spacing=(2.5, 1, 1), is_label=True)
    assert hd95(pv, tv) == pytest.approx(10.0)


def test_hd95_is_robust_to_one_outlier_voxel():
    # a line of 19 voxels vs the same line plus one voxel 10 voxels away along i (1.5 mm): the
    # truth's 20 surface distances are nineteen 0s and one 15 mm; 95th percentile (linear) at
    # position 0.95 * 19 = 18.05 -> 0 + 0.05 * 15 = 0.75 mm; the other direction is all 0.
    p = np.zeros((12, 20, 3), bool)
    p[0, 0:19, 1] = True
    t = p.copy()
    t[10, 0, 1] = True
    assert hd95(p, t, spacing=(1.5, 1.0, 1.0)) == pytest.approx(0.75)
    assert hd95(t, p, spacing=(1.5, 1.0, 1.0)) == pytest.approx(0.75)


def test_hd95_surface_only():
    # a solid 5^3 cube vs the same cube: 0; vs the cube grown by one voxel on the +i side (2 mm): the
    # grown face is 2 mm from the old face; interior voxels do not count
    p = np.zeros((9, 9, 9), bool)
    p[2:7, 2:7, 2:7] = True
    assert hd95(p, p, spacing=(2.0, 1.0, 1.0)) == 0.0
    t = p.copy()
    t[7, 2:7, 2:7] = True
    value = hd95(p, t, spacing=(2.0, 1.0, 1.0))
    # 25 of the truth's 98 + 25 surface voxels (the new face) are 2 mm away: well above 5%
    assert value == pytest.approx(2.0)


def test_hd95_empty_cases():
    empty = np.zeros((4, 4, 4), bool)
    one = empty.copy()
    one[1, 1, 1] = True
    assert hd95(empty, empty, spacing=(1, 1, 1)) == 0.0
    assert math.isnan(hd95(one, empty, spacing=(1, 1, 1)))
    assert math.isnan(hd95(empty, one, spacing=(1, 1, 1)))
    with pytest.raises(ValueError, match="spacing"):
        hd95(one, one)


masks = arrays(np.bool_, (6, 5, 4), elements=st.booleans())
spacings = st.tuples(*[st.floats(0.3, 4.0)] * 3)


@settings(max_examples=60, deadline=None)
@given(masks, masks, spacings)
def test_hd95_properties(a, b, spacing):
    value = hd95(a, b, spacing=spacing)
    assert value == hd95(b, a, spacing=spacing) or (math.isnan(value) and math.isnan(hd95(b, a, spacing=spacing)))
    if a.any() and b.any():
        diagonal = float(np.sqrt(np.sum((np.asarray(a.shape) * np.asarray(spacing)) ** 2)))
        assert 0.0 <= value <= diagonal
        assert hd95(a, a, spacing=spacing) == 0.0
        # scaling every spacing by 2 doubles the distances
        assert hd95(a, b, spacing=tuple(2 * s for s in spacing)) == pytest.approx(2 * value)


@settings(max_examples=60, deadline=None)
@given(masks, masks, st.permutations([0, 1, 2]))
def test_dice_2d_properties(a, b, perm):
    value = dice_2d(a, b)
    assert 0.0 <= value <= 1.0
    assert dice_2d(a, a) == 1.0
    assert value == pytest.approx(dice_2d(b, a))
    # permuting the array axes together with the direction columns keeps the axial slices
    direction = np.eye(3)[:, list(perm)]
    av = Volume.from_array(np.transpose(a, perm).astype(np.uint8), direction=direction, is_label=True)
    bv = Volume.from_array(np.transpose(b, perm).astype(np.uint8), direction=direction, is_label=True)
    assert dice_2d(av, bv) == pytest.approx(value)


@settings(max_examples=40, deadline=None)
@given(masks, masks, spacings)
def test_hd95_does_not_depend_on_the_empty_space_around_the_masks(a, b, spacing):
    # masks touching the array's edge: outside the array counts as outside the mask
    padded = lambda m: np.pad(m, 3)  # noqa: E731
    value = hd95(a, b, spacing=spacing)
    other = hd95(padded(a), padded(b), spacing=spacing)
    assert (math.isnan(value) and math.isnan(other)) or value == pytest.approx(other)
