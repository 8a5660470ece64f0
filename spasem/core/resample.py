"""Resampling volumes between grids in physical space.

Labels are always resampled nearest-neighbour; images and probability maps linearly (or with a
B-spline when asked). Every function here works in physical LPS space, so flipped or permuted
axes, different spacings and origins are handled by geometry, never by array tricks.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import SimpleITK as sitk

from spasem.core.io import from_sitk, to_sitk
from spasem.core.volume import Grid, Volume

Interpolation = Literal["linear", "nearest", "bspline"]

_SITK_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}


def resample(
    volume: Volume,
    onto: Grid,
    *,
    interpolation: Interpolation | None = None,
    fill: float | Literal["min"] = 0.0,
    transform: sitk.Transform | None = None,
) -> Volume:
    """Resample ``volume`` onto the grid ``onto``.

    :param volume: source volume.
    :param onto: target grid (physical LPS).
    :param interpolation: 'linear' (default for images), 'nearest' (always for labels) or 'bspline'.
    :param fill: value for target voxels outside the source's field of view; 'min' = the
        source's minimum (e.g. air for CT).
    :param transform: optional SimpleITK transform mapping target points to source points.
    :returns: a volume on ``onto`` (labels keep their integer type; images become float32).
    """
    if volume.is_label:
        if interpolation not in (None, "nearest"):
            raise ValueError(f"labels are resampled nearest-neighbour only, not '{interpolation}'")
        interpolation = "nearest"
    interpolation = interpolation or "linear"
    if transform is None and volume.grid.same_as(onto):
        return Volume(volume.array, onto, volume.is_label, volume.name, volume.modality)
    if transform is None:
        exact = volume.reoriented_onto(onto)
        if exact is not None:
            return exact
    fill_value = float(np.min(volume.array)) if fill == "min" else float(fill)
    source = to_sitk(volume if volume.is_label or volume.array.dtype == np.float32 else volume.with_array(volume.array.astype(np.float32)))
    out_type = source.GetPixelID()
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(s) for s in onto.shape])
    resampler.SetOutputSpacing([float(s) for s in onto.spacing])
    resampler.SetOutputOrigin([float(o) for o in onto.origin])
    resampler.SetOutputDirection([float(d) for d in onto.direction.ravel()])
    resampler.SetInterpolator(_SITK_INTERPOLATORS[interpolation])
    resampler.SetDefaultPixelValue(fill_value)
    resampler.SetOutputPixelType(out_type)
    if transform is not None:
        resampler.SetTransform(transform)
    result = from_sitk(resampler.Execute(source), is_label=volume.is_label, name=volume.name, modality=volume.modality)
    return result


def resample_to_spacing(volume: Volume, spacing_mm: float = 1.5, *, fill: float | Literal["min"] = "min") -> Volume:
    """Resample onto the canonical RAS grid at isotropic ``spacing_mm`` covering the volume's
    field of view (images linearly, labels nearest-neighbour)."""
    return resample(volume, volume.grid.canonical(spacing_mm), fill=0.0 if volume.is_label else fill)


def grid_to_sitk_reference(grid: Grid) -> sitk.Image:
    """An empty (uint8) SimpleITK image with ``grid``'s geometry, for filters that need a reference."""
    ref = sitk.Image([int(s) for s in grid.shape], sitk.sitkUInt8)
    ref.SetSpacing([float(s) for s in grid.spacing])
    ref.SetOrigin([float(o) for o in grid.origin])
    ref.SetDirection([float(d) for d in grid.direction.ravel()])
    return ref
