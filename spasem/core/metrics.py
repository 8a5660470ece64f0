"""Overlap and surface-distance metrics between a predicted and a reference mask on one grid.

* :func:`dice` — 3D Dice of the non-zero voxels.
* :func:`dice_2d` — mean Dice over the *axial* slices where the reference or the prediction is
  non-empty. Axial = perpendicular to the patient's superior (S) axis: the array axis whose
  direction cosine has the largest |z| component in LPS (found from the grid's direction matrix,
  never assumed to be array axis 2).
* :func:`hd95` — 95th-percentile symmetric Hausdorff distance between the mask surfaces, in mm
  (physical spacing): ``max(P95(d(surface_P -> surface_T)), P95(d(surface_T -> surface_P)))``.
  Both masks empty: 0.0; exactly one empty: NaN (undefined; Dice already scores that case 0).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage

from spasem.core.volume import Grid, Volume, require_same_grid


def _pair(prediction: Volume | np.ndarray, truth: Volume | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean arrays of the non-zero voxels of both; volumes must share a grid."""
    if isinstance(prediction, Volume) and isinstance(truth, Volume):
        require_same_grid(prediction, truth, "prediction and reference")
    p = np.asarray(prediction.array if isinstance(prediction, Volume) else prediction) != 0
    t = np.asarray(truth.array if isinstance(truth, Volume) else truth) != 0
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} != reference shape {t.shape}")
    return p, t


def dice(prediction: Volume | np.ndarray, truth: Volume | np.ndarray) -> float:
    """3D Dice coefficient ``2|P & T| / (|P| + |T|)`` of the non-zero voxels; 1.0 when both are empty.

    Volumes must share a grid (arrays: the same shape)."""
    p, t = _pair(prediction, truth)
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / denom


def axial_axis(grid: Grid) -> int:
    """Array axis (0, 1 or 2) running along the patient's superior-inferior axis: the one whose
    direction column has the largest |z| (LPS). Slices perpendicular to it are axial."""
    return int(np.argmax(np.abs(np.asarray(grid.direction)[2, :])))


def dice_2d(prediction: Volume | np.ndarray, truth: Volume | np.ndarray, axis: int | None = None) -> float:
    """Mean 2D Dice over the axial slices where the reference or the prediction is non-empty.

    :param axis: the slice axis; default: :func:`axial_axis` of the volumes' grid (Volumes),
        array axis 2 for bare arrays.
    :returns: the mean over those slices; 1.0 when both masks are empty (no slice counts).
    """
    p, t = _pair(prediction, truth)
    if axis is None:
        grid = prediction.grid if isinstance(prediction, Volume) else truth.grid if isinstance(truth, Volume) else None
        axis = axial_axis(grid) if grid is not None else 2
    others = tuple(a for a in range(3) if a != axis)
    p_count = p.sum(axis=others)
    t_count = t.sum(axis=others)
    both = np.logical_and(p, t).sum(axis=others)
    counted = (p_count + t_count) > 0
    if not counted.any():
        return 1.0
    return float(np.mean(2.0 * both[counted] / (p_count[counted] + t_count[counted])))


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one 6-neighbour outside it (outside the array counts as outside)."""
    structure = ndimage.generate_binary_structure(3, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _box(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of ``a | b`` plus one voxel (clipped to the array)."""
    both = np.argwhere(a | b)
    lo = np.maximum(both.min(axis=0) - 1, 0)
    hi = np.minimum(both.max(axis=0) + 2, a.shape)
    return tuple(slice(int(l), int(h)) for l, h in zip(lo, hi))


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distances (mm) from each surface voxel centre of ``a`` to the nearest surface voxel centre
    of ``b``; both non-empty boolean arrays on one grid with voxel ``spacing`` (mm)."""
    # the box of both (+1 voxel) keeps the work small; its extra voxels are outside both masks,
    # and where it meets the array's edge, outside the array counts as outside, as it should
    box = _box(a, b)
    surf_a, surf_b = _surface(a[box]), _surface(b[box])
    return ndimage.distance_transform_edt(~surf_b, sampling=[float(s) for s in spacing])[surf_a]


def hd95(
    prediction: Volume | np.ndarray, truth: Volume | np.ndarray, spacing: Sequence[float] | None = None
) -> float:
    """95% Hausdorff distance (mm) between the surfaces of ``prediction`` and ``truth``.

    ``max(P95(prediction -> truth), P95(truth -> prediction))``, each the 95th percentile (linear
    interpolation) of the distances from one mask's surface voxel centres to the nearest surface
    voxel centre of the other; distances in physical mm using ``spacing`` (default: the Volumes'
    grid spacing; bare arrays need ``spacing``).

    :returns: 0.0 when both masks are empty; NaN when exactly one is empty (undefined).
    """
    p, t = _pair(prediction, truth)
    if spacing is None:
        grid = prediction.grid if isinstance(prediction, Volume) else truth.grid if isinstance(truth, Volume) else None
        if grid is None:
            raise ValueError("hd95 of bare arrays needs the voxel spacing (mm)")
        spacing = grid.spacing
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return math.nan
    box = _box(p, t)
    surf_p, surf_t = _surface(p[box]), _surface(t[box])
    sampling = [float(s) for s in spacing]
    forward = np.percentile(ndimage.distance_transform_edt(~surf_t, sampling=sampling)[surf_p], 95)
    backward = np.percentile(ndimage.distance_transform_edt(~surf_p, sampling=sampling)[surf_t], 95)
    return float(max(forward, backward))
