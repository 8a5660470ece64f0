"""Working grids, 128^3 windows, intensity normalisation and merging window outputs.

The method works on a *working grid*: the canonical RAS grid at isotropic spacing (1.5 mm)
covering a scan's field of view (:meth:`Grid.canonical`). Windows are boxes of that grid's index
space (``start`` .. ``start + size``), so cutting a window out of a working-grid array and putting
a window's output back are plain array slicing, with padding where a window sticks out of the
field of view. Going from the working grid back to the scan's own grid is one physical-space
resampling (:func:`spasem.core.resample.resample`).

Window placement rules (:func:`plan_windows`):

* one window per axis when the region of interest (plus margin) fits: centred on it;
* otherwise ``n = ceil((L - size) / (size * (1 - min_overlap))) + 1`` windows spaced evenly
  from the region's first to its last voxel, so neighbours overlap by at least ``min_overlap``;
* support windows tile the support mask's box *without* overlap (:func:`tile_windows`), so each
  prototype is taken once.

Merging (:class:`WindowMerger`): a weighted average of overlapping window outputs, each window
weighted by a separable Gaussian importance map (sigma = size / 8 per axis, floor 1e-3), as in
sliding-window inference of nnU-Net; voxels no window covers get a default value.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from spasem.core.volume import Grid, Volume


@dataclass(frozen=True)
class Window:
    """A box ``[start, start + size)`` in the index space of a working grid.

    :param start: index (i, j, k) of the window's first voxel on the working grid (may be < 0).
    :param size: window size in voxels.
    :param grid: the window's own physical grid (spacing/direction of the working grid).
    """

    start: tuple[int, int, int]
    size: tuple[int, int, int]
    grid: Grid

    @classmethod
    def on(cls, work_grid: Grid, start: Sequence[int], size: Sequence[int]) -> "Window":
        start_t = tuple(int(s) for s in start)
        size_t = tuple(int(s) for s in size)
        return cls(start_t, size_t, work_grid.subgrid(start_t, size_t))

    def _overlap(self, work_shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
        work_sl, win_sl = [], []
        for a in range(3):
            lo = max(self.start[a], 0)
            hi = min(self.start[a] + self.size[a], int(work_shape[a]))
            if hi <= lo:
                return None
            work_sl.append(slice(lo, hi))
            win_sl.append(slice(lo - self.start[a], hi - self.start[a]))
        return tuple(work_sl), tuple(win_sl)

    def crop(self, array: np.ndarray | torch.Tensor, fill: float = 0.0):
        """Cut this window out of a working-grid array ``[..., I, J, K]`` (padding with ``fill``)."""
        lead = tuple(array.shape[:-3])
        work_shape = tuple(array.shape[-3:])
        if isinstance(array, torch.Tensor):
            out = torch.full(lead + self.size, fill, dtype=array.dtype, device=array.device)
        else:
            out = np.full(lead + self.size, fill, dtype=array.dtype)
        ov = self._overlap(work_shape)
        if ov is not None:
            work_sl, win_sl = ov
            out[(Ellipsis,) + win_sl] = array[(Ellipsis,) + work_sl]
        return out

    def crop_volume(self, volume: Volume, fill: float = 0.0) -> Volume:
        """:meth:`crop` for a volume on the working grid; the result lives on ``self.grid``."""
        return Volume(self.crop(volume.array, fill), self.grid, volume.is_label, volume.name, volume.modality)


def roi_bounds(mask: np.ndarray, work_grid: Grid, margin_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray] | None:
    """Inclusive index bounds (lo, hi) of the non-zero voxels of a working-grid mask, grown by
    ``margin_mm`` on each side (clipped to the grid); None if the mask is empty."""
    nz = np.argwhere(mask)
    if nz.size == 0:
        return None
    margin = np.ceil(margin_mm / work_grid.spacing).astype(int)
    lo = np.maximum(nz.min(axis=0) - margin, 0)
    hi = np.minimum(nz.max(axis=0) + margin, np.asarray(work_grid.shape) - 1)
    return lo, hi


def _axis_starts(lo: int, hi: int, size: int, min_overlap: float) -> list[int]:
    length = hi - lo + 1
    if length <= size:
        centre = (lo + hi) / 2
        return [int(math.floor(centre - (size - 1) / 2 + 0.5))]
    step = size * (1.0 - min_overlap)
    n = int(math.ceil((length - size) / step)) + 1
    first, last = lo, hi - size + 1
    return sorted({int(round(first + (last - first) * t / (n - 1))) for t in range(n)})


def plan_windows(
    work_grid: Grid,
    lo: Sequence[int],
    hi: Sequence[int],
    size: Sequence[int] = (128, 128, 128),
    min_overlap: float = 0.25,
) -> list[Window]:
    """Overlapping windows of ``size`` covering the inclusive index box ``[lo, hi]`` (rules in
    the module docstring)."""
    per_axis = [_axis_starts(int(lo[a]), int(hi[a]), int(size[a]), min_overlap) for a in range(3)]
    return [Window.on(work_grid, start, size) for start in itertools.product(*per_axis)]


def tile_windows(work_grid: Grid, lo: Sequence[int], hi: Sequence[int], size: Sequence[int] = (128, 128, 128)) -> list[Window]:
    """Non-overlapping windows of ``size`` tiling the inclusive index box ``[lo, hi]``, the tiling
    centred on the box."""
    per_axis = []
    for a in range(3):
        length = int(hi[a]) - int(lo[a]) + 1
        n = max(1, int(math.ceil(length / size[a])))
        first = int(math.floor((int(lo[a]) + int(hi[a])) / 2 - (n * size[a] - 1) / 2 + 0.5))
        per_axis.append([first + t * int(size[a]) for t in range(n)])
    return [Window.on(work_grid, start, size) for start in itertools.product(*per_axis)]


def importance_map(size: Sequence[int], sigma_fraction: float = 1 / 8, floor: float = 1e-3) -> torch.Tensor:
    """Separable Gaussian weights ``size`` peaking (1.0) at the window centre."""
    axes = []
    for n in size:
        x = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        axes.append(torch.exp(-0.5 * (x / (sigma_fraction * n)) ** 2))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return (w / w.max()).clamp_min(floor)


class WindowMerger:
    """Weighted average of window outputs on the working grid (see module docstring)."""

    def __init__(self, work_shape: Sequence[int], device: torch.device | str = "cpu"):
        self.work_shape = tuple(int(s) for s in work_shape)
        self.sum = torch.zeros(self.work_shape, dtype=torch.float32, device=device)
        self.weight = torch.zeros(self.work_shape, dtype=torch.float32, device=device)
        self._weights: dict[tuple[int, ...], torch.Tensor] = {}

    def add(self, window: Window, values: torch.Tensor) -> None:
        """Accumulate a window's values (shape ``window.size``)."""
        ov = window._overlap(self.work_shape)
        if ov is None:
            return
        if window.size not in self._weights:
            self._weights[window.size] = importance_map(window.size).to(self.sum.device)
        w = self._weights[window.size]
        work_sl, win_sl = ov
        values = values.to(self.sum.device, torch.float32)
        self.sum[work_sl] += values[win_sl] * w[win_sl]
        self.weight[work_sl] += w[win_sl]

    @property
    def covered(self) -> torch.Tensor:
        """Boolean map of the voxels at least one window covers."""
        return self.weight > 0

    def result(self, default: float = 0.0) -> torch.Tensor:
        """The merged map; ``default`` where no window contributed."""
        out = torch.full_like(self.sum, float(default))
        covered = self.covered
        out[covered] = self.sum[covered] / self.weight[covered]
        return out


def zscore(values: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor | None = None):
    """Z-score normalise: subtract the mean and divide by the (unbiased) standard deviation of the
    voxels in ``mask`` (all voxels if None). A constant region is only centred (std taken as 1)."""
    is_numpy = isinstance(values, np.ndarray)
    t = torch.as_tensor(values, dtype=torch.float32)
    sel = t if mask is None else t[torch.as_tensor(mask, dtype=torch.bool, device=t.device)]
    if sel.numel() == 0:
        sel = t.reshape(-1)
    mean = sel.mean()
    std = sel.std() if sel.numel() > 1 else torch.tensor(0.0)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    out = (t - mean) / std
    return out.numpy() if is_numpy else out
