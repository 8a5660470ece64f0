"""Checks on user inputs, with messages that name the file, the value and what was expected."""

from __future__ import annotations

import numpy as np

from spasem.core.resample import resample
from spasem.core.volume import Volume
from spasem.errors import GeometryError, InputError


def check_image(image: Volume, role: str = "image") -> None:
    """A usable 3D scan: every side >= 2 voxels (not a 2D slice), finite intensities."""
    if min(image.shape) < 2:
        raise InputError(
            f"{role} {image.label_for_messages} is 2D (size {'x'.join(map(str, image.shape))}); expected a 3D volume"
        )
    if image.is_label:
        raise InputError(f"{role} {image.label_for_messages} was read as a label map; expected an intensity image")
    image.check_finite()


def binary_mask(mask: Volume, label: int | None = None, role: str = "mask") -> Volume:
    """The voxels of ``label`` (or all non-zero voxels when None) as a uint8 0/1 label map.

    :raises InputError: the mask is empty, or ``label`` is absent (the message lists the ids present).
    """
    arr = mask.array
    if label is None:
        binary = arr != 0
        if not binary.any():
            raise InputError(f"{role} {mask.label_for_messages} is empty (no non-zero voxel); expected the structure to segment")
    else:
        binary = arr == label
        if not binary.any():
            present = [int(v) for v in np.unique(arr) if v != 0]
            listed = ", ".join(map(str, present[:30])) + (" ..." if len(present) > 30 else "")
            raise InputError(
                f"{role} {mask.label_for_messages} has no voxel with label {label}; labels present: {listed or 'none'}"
            )
    return Volume(binary.astype(np.uint8), mask.grid, is_label=True, name=mask.name, modality=mask.modality)


def align_mask(mask: Volume, image: Volume, resample_mask: bool = False) -> Volume:
    """Put a mask on its image's voxel grid.

    * same grid (within tolerance): returned on the image's grid object;
    * same voxels with permuted/flipped axes (e.g. a label file stored flipped): moved exactly;
    * otherwise refused with both geometries named, unless ``resample_mask`` asks for a
      nearest-neighbour resampling in physical space.
    """
    if mask.grid.same_as(image.grid):
        return Volume(mask.array, image.grid, is_label=True, name=mask.name, modality=mask.modality)
    exact = mask.reoriented_onto(image.grid)
    if exact is not None:
        return exact
    if resample_mask:
        return resample(Volume(mask.array, mask.grid, is_label=True, name=mask.name), image.grid)
    raise GeometryError(
        f"mask {mask.label_for_messages} is not on its image's voxel grid: mask is {mask.grid.describe()}; "
        f"image {image.label_for_messages} is {image.grid.describe()}. "
        "Pass --resample-mask to resample the mask onto the image in physical space"
    )
