"""Overlap metrics between a predicted and a reference mask on the same grid."""

from __future__ import annotations

import numpy as np

from spasem.core.volume import Volume, require_same_grid


def dice(prediction: Volume | np.ndarray, truth: Volume | np.ndarray) -> float:
    """3D Dice coefficient ``2|P & T| / (|P| + |T|)`` of the non-zero voxels; 1.0 when both are empty.

    Volumes must share a grid (arrays: the same shape)."""
    if isinstance(prediction, Volume) and isinstance(truth, Volume):
        require_same_grid(prediction, truth, "prediction and reference")
    p = np.asarray(prediction.array if isinstance(prediction, Volume) else prediction) != 0
    t = np.asarray(truth.array if isinstance(truth, Volume) else truth) != 0
    if p.shape != t.shape:
        raise ValueError(f"prediction shape {p.shape} != reference shape {t.shape}")
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / denom
