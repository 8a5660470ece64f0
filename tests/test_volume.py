"""Grid / Volume geometry."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from spasem.core.volume import RAS_DIRECTION, Grid, Volume, orientation_code, require_same_grid
from spasem.errors import GeometryError, InputError


def test_index_physical_round_trip_and_affine():
    direction = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]], dtype=float)  # rotated axes
    grid = Grid((10, 20, 30), (0.5, 1.0, 2.0), (10.0, -5.0, 3.0), direction)
    idx = np.array([[0, 0, 0], [1, 2, 3], [9.5, 19, 29]])
    pts = grid.index_to_physical(idx)
    # voxel (1, 0, 0) is one i-step: 0.5 mm along direction column 0 = (0, -1, 0)
    assert np.allclose(grid.index_to_physical([1, 0, 0]), [10.0, -5.5, 3.0])
    assert np.allclose(grid.physical_to_index(pts), idx)
    homog = np.c_[idx, np.ones(3)] @ grid.affine.T
    assert np.allclose(homog[:, :3], pts)
    # RAS affine flips x and y of the LPS affine
    assert np.allclose(grid.affine_ras[:2], -grid.affine[:2])


def test_grid_rejects_bad_values():
    with pytest.raises(InputError, match="spacing"):
        Grid((2, 2, 2), (1, 0, 1), (0, 0, 0))
    with pytest.raises(InputError, match="direction"):
        Grid((2, 2, 2), (1, 1, 1), (0, 0, 0), np.zeros((3, 3)))
    with pytest.raises(InputError, match="3D"):
        Volume(np.zeros((3, 3)), Grid((3, 3, 1), (1, 1, 1), (0, 0, 0)))


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
@pytest.mark.parametrize("flips", [(False, False, False), (False, True, False), (True, False, True)])
def test_axis_mapping_recovers_any_permutation_and_flip(perm, flips):
    """A volume stored with permuted/flipped axes (same voxels) is moved back exactly."""
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 50, size=(5, 6, 7)).astype(np.int16)
    grid = Grid(arr.shape, (0.8, 0.9, 2.5), (-10.0, 20.0, 5.0), np.eye(3))
    # build the other storage: axes permuted and flipped, geometry adjusted to the same voxels
    stored = arr.transpose(perm)
    direction = grid.direction[:, list(perm)].copy()
    spacing = grid.spacing[list(perm)]
    origin = grid.origin.copy()
    for c in range(3):
        if flips[c]:
            stored = np.flip(stored, axis=c)
            origin = origin + direction[:, c] * spacing[c] * (stored.shape[c] - 1)
            direction[:, c] *= -1
    other = Volume(np.ascontiguousarray(stored), Grid(stored.shape, spacing, origin, direction))
    back = other.reoriented_onto(grid)
    assert back is not None
    assert back.grid is grid
    np.testing.assert_array_equal(back.array, arr)


def test_axis_mapping_refuses_shifted_or_resampled_grids():
    grid = Grid((4, 4, 4), (1, 1, 1), (0, 0, 0))
    assert grid.axis_mapping_to(Grid((4, 4, 4), (1, 1, 1), (0.5, 0, 0))) is None  # half-voxel shift
    assert grid.axis_mapping_to(Grid((4, 4, 4), (1, 1, 1.1), (0, 0, 0))) is None  # other spacing
    assert grid.axis_mapping_to(Grid((4, 4, 5), (1, 1, 1), (0, 0, 0))) is None


def test_canonical_grid_covers_the_field_of_view_in_ras():
    direction = np.diag([1.0, 1.0, 1.0])  # LPS storage
    grid = Grid((100, 80, 20), (0.8, 0.8, 2.5), (-40.0, -30.0, 100.0), direction)
    canon = grid.canonical(1.5)
    assert np.allclose(canon.direction, RAS_DIRECTION)
    assert orientation_code(canon.direction) == "RAS"
    assert orientation_code(grid.direction) == "LPS"
    assert np.allclose(canon.spacing, 1.5)
    lo, hi = grid.corners().min(0), grid.corners().max(0)
    clo, chi = canon.corners().min(0), canon.corners().max(0)
    assert np.all(clo <= lo + 1e-6) and np.all(chi >= hi - 1e-6)
    assert np.all(chi - clo < hi - lo + 1.5 + 1e-6)  # at most one extra voxel per axis
    assert np.allclose((clo + chi) / 2, (lo + hi) / 2)


def test_scaled_grid_centres_coarse_voxels_on_fine_blocks():
    grid = Grid((8, 8, 8), (1.5, 1.5, 1.5), (0, 0, 0), RAS_DIRECTION)
    coarse = grid.scaled(4)
    assert coarse.shape == (2, 2, 2)
    # coarse voxel 0 is the centre of fine voxels 0..3 -> fine index 1.5
    assert np.allclose(coarse.origin, grid.index_to_physical([1.5, 1.5, 1.5]))
    assert np.allclose(coarse.corners().min(0), grid.corners().min(0))


def test_require_same_grid_names_both_geometries():
    a = Volume.from_array(np.zeros((2, 2, 2)), name="a.nii")
    b = Volume.from_array(np.zeros((2, 2, 2)), spacing=(1, 1, 2), name="b.nii")
    with pytest.raises(GeometryError, match=r"'a.nii' is 2x2x2 voxels, 1x1x1 mm.*'b.nii' is 2x2x2 voxels, 1x1x2 mm"):
        require_same_grid(a, b)


def test_check_finite_names_the_first_bad_voxel():
    arr = np.zeros((3, 3, 3), np.float32)
    arr[1, 2, 0] = np.nan
    with pytest.raises(InputError, match=r"'x.nii' has 1 NaN/infinite voxel\(s\) \(first at index \(1, 2, 0\)\)"):
        Volume.from_array(arr, name="x.nii").check_finite()
