"""Synthetic phantom cases shared by the tests of the classical path, generated once per test
session (a case takes a few seconds). Treat the returned volumes as read-only."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from spasem.core.volume import Volume


@lru_cache(maxsize=8)
def phantom_case(subject: int, modality: str, seed: int = 0) -> tuple[Volume, Volume]:
    """``spasem.data.phantoms.generate_case`` memoised; arrays are made read-only so that a test
    that modifies one fails loudly instead of corrupting the others."""
    from spasem.data.phantoms import generate_case

    image, label = generate_case(subject, modality, seed)
    image.array.setflags(write=False)
    label.array.setflags(write=False)
    return image, label


def organ_mask(label: Volume, label_id: int) -> Volume:
    """The 0/1 mask of one label id, on the label map's grid."""
    return label.with_array((np.asarray(label.array) == label_id).astype(np.uint8))


def physical_centroid(label: Volume, label_id: int) -> np.ndarray:
    """Mean LPS position (mm) of the voxels of one label id."""
    index = np.argwhere(np.asarray(label.array) == label_id).mean(axis=0)
    return label.grid.index_to_physical(index)
