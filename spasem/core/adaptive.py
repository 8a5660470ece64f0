"""Query-adaptive inputs for the semantic prior (options of :class:`~spasem.core.config.PriorsConfig`,
all off by default, i.e. the paper's method).

The warped support mask tells, with a margin for registration error, where the query is
confidently inside the structure (its *core*: deeper than ``core_margin_mm``) and confidently
outside (farther than ``background_margin_mm``). From the query's own features there:

* **query prototypes** (``query_prototypes``): the core's features are prototypes, alone or with the
  support's. They share the query's modality, so any feature (even modality-specific intensity
  channels) compares like with like;
* **contrastive prior** (``semantic = "contrastive"``): background prototypes from the
  confident outside, and ``P_sim`` = the class-balanced soft assignment to the foreground set,

      a_F = log mean_{j in F} exp(sim_j / tau_s),   a_B likewise over B,   P_sim = sigmoid(a_F - a_B),

  with ``H`` the normalised entropy of that two-set assignment (binary entropy of ``P_sim`` in
  bits). The paper's ``S = sum softmax(sim/tau_s) sim`` is close to the best similarity to any
  prototype: with weight-free features every voxel has some close prototype, so ``P_sim`` stays
  high everywhere and the semantic term adds false positives; comparing with the background
  removes that bias;
* **semantic reach** (``semantic_reach_mm``): the semantic prior is used only within this distance
  of the warped mask (elsewhere ``P_sim = 0, H = 1``, exactly as outside the query windows).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from spasem.core.volume import Grid
from spasem.core.windows import Window


def evenly_spaced(rows: torch.Tensor, limit: int | None) -> torch.Tensor:
    """At most ``limit`` rows of ``rows`` ``[N, C]``, evenly spaced over the list (deterministic)."""
    if limit is None or rows.shape[0] <= limit:
        return rows
    keep = torch.linspace(0, rows.shape[0] - 1, limit, device=rows.device).round().long()
    return rows[keep]


def mask_distances(mask: np.ndarray, spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean depth inside ``mask`` and distance outside it (mm), each ``mask.shape`` float32
    (0 on the other side). A mask touching nothing gives infinite outside distances."""
    if not mask.any():
        return np.zeros(mask.shape, np.float32), np.full(mask.shape, np.inf, np.float32)
    depth = ndimage.distance_transform_edt(mask, sampling=spacing).astype(np.float32)
    distance = ndimage.distance_transform_edt(~mask, sampling=spacing).astype(np.float32)
    return depth, distance


def windows_box(windows: Sequence[Window], shape: Sequence[int]) -> tuple[slice, ...]:
    """The box of the working grid (of ``shape``) covered by ``windows``, as slices (the windows'
    union box clipped to the grid)."""
    starts = np.array([w.start for w in windows])
    stops = np.array([np.add(w.start, w.size) for w in windows])
    lo = np.maximum(starts.min(axis=0), 0)
    hi = np.minimum(stops.max(axis=0), np.asarray(shape))
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def pool_to_features(mask: np.ndarray, window: Window, feature_grid: Grid, device, min_fraction: float = 0.5) -> torch.Tensor:
    """A working-grid bool mask brought to a window's feature grid: feature voxels of which at
    least ``min_fraction`` of the window voxels are in the mask (``> 0`` when ``min_fraction`` is 0)."""
    crop = torch.as_tensor(window.crop(mask.astype(np.float32), fill=0.0), device=device)
    fraction = F.adaptive_avg_pool3d(crop[None, None], feature_grid.shape)[0, 0]
    return fraction > 0 if min_fraction <= 0 else fraction >= min_fraction


def log_mean_exp(sim: torch.Tensor, tau: float) -> torch.Tensor:
    """``log mean_j exp(sim_j / tau)`` over dim 0 of ``sim`` ``[N, V]``."""
    return torch.logsumexp(sim / tau, dim=0) - math.log(sim.shape[0])


def contrastive_prior(
    query_features: torch.Tensor, foreground: torch.Tensor, background: torch.Tensor, tau_s: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-set semantic prior (module docstring).

    :param query_features: ``[C, ...]`` (L2-normalised here along C).
    :param foreground: ``[N_F, C]`` prototypes, ``N_F >= 1``.
    :param background: ``[N_B, C]`` prototypes, ``N_B >= 1``.
    :returns: ``(P_sim, H)`` each ``query_features.shape[1:]`` in [0, 1].
    """
    c = query_features.shape[0]
    spatial = query_features.shape[1:]
    q = F.normalize(query_features.reshape(c, -1).to(torch.float32), dim=0)
    fg = F.normalize(foreground.to(torch.float32), dim=1)
    bg = F.normalize(background.to(torch.float32), dim=1)
    p_sim = torch.empty(q.shape[1], dtype=torch.float32, device=q.device)
    chunk = max(1, (1 << 24) // max(fg.shape[0], bg.shape[0]))
    for start in range(0, q.shape[1], chunk):
        block = q[:, start : start + chunk]
        logit = log_mean_exp(fg @ block, tau_s) - log_mean_exp(bg @ block, tau_s)
        p_sim[start : start + chunk] = torch.sigmoid(logit)
    p = p_sim.clamp(1e-7, 1 - 1e-7)
    entropy = -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))
    return p_sim.reshape(spatial), entropy.clamp(0, 1).reshape(spatial)


def clean_core(core: torch.Tensor, background: torch.Tensor, tau_s: float, rounds: int = 2) -> torch.Tensor:
    """Drop core prototypes that the two-set assignment (core vs background) puts outside
    (``P_sim < 0.5``): parts of other tissue caught in the core by registration error. Keeps at
    least a quarter of the core (its most foreground-like rows)."""
    if core.shape[0] < 8 or background.shape[0] == 0:
        return core
    for _ in range(rounds):
        p, _ = contrastive_prior(core.T, core, background, tau_s)
        keep = p >= 0.5
        minimum = max(1, core.shape[0] // 4)
        if int(keep.sum()) < minimum:
            keep = p >= torch.topk(p, minimum).values.min()
        if bool(keep.all()):
            break
        core = core[keep]
    return core


def region_masks(
    warped: np.ndarray, work_grid: Grid, windows: Sequence[Window], feature_grids: Sequence[Grid], device,
    core_margin_mm: float, background_margin_mm: float, reach_mm: float | None,
    core_keep: np.ndarray | None = None, min_kept: float = 0.25,
) -> list[dict[str, torch.Tensor]]:
    """Per window, bool masks on its feature grid: ``core`` (deeper than ``core_margin_mm`` inside
    the warped mask ``warped``), ``outside`` (farther than ``background_margin_mm``) and, with a
    reach, ``band`` (within ``reach_mm`` of it). Distances are computed on the windows' union box
    of the working grid. A structure too thin for a core gets its deepest half as core.

    ``core_keep`` (bool, working grid) restricts the core to its voxels, unless fewer than
    ``min_kept`` of the core's voxels would remain (then the core is left whole)."""
    box = windows_box(windows, work_grid.shape)
    depth = np.zeros(work_grid.shape, np.float32)
    distance = np.full(work_grid.shape, np.inf, np.float32)
    depth[box], distance[box] = mask_distances(warped[box], work_grid.spacing)
    core_mask = depth >= max(core_margin_mm, 1e-3)
    if not core_mask.any():
        core_mask = depth >= 0.5 * float(depth.max())
    if core_keep is not None:
        kept = core_mask & core_keep
        if kept.sum() >= min_kept * core_mask.sum():
            core_mask = kept
    regions = []
    for window, fgrid in zip(windows, feature_grids):
        region = {
            "core": pool_to_features(core_mask, window, fgrid, device),
            "outside": pool_to_features(distance > background_margin_mm, window, fgrid, device),
        }
        if reach_mm is not None:
            region["band"] = pool_to_features(distance <= reach_mm, window, fgrid, device, min_fraction=0.0)
        regions.append(region)
    if not any(bool(r["core"].any()) for r in regions):  # smaller than a feature voxel
        for region, window, fgrid in zip(regions, windows, feature_grids):
            region["core"] = pool_to_features(core_mask, window, fgrid, device, min_fraction=0.0)
    return regions


def _bin_index(values: np.ndarray, sample: np.ndarray, bins: int) -> np.ndarray:
    """Bin index ``[0, bins)`` of every value, over the 0.5-99.5 percentile range of ``sample``
    (not empty)."""
    lo, hi = np.percentile(sample, [0.5, 99.5])
    scale = bins / max(float(hi - lo), 1e-6)
    return np.clip(((values - lo) * scale).astype(np.int64), 0, bins - 1)


def translated_appearance(
    warped_image: np.ndarray, covered: np.ndarray, warped_mask: np.ndarray, query_image: np.ndarray,
    spacing: np.ndarray, band_mm: tuple[float, float] = (3.0, 15.0), support_bins: int = 48, query_bins: int = 64,
) -> np.ndarray:
    """How much each query voxel's intensity looks like the support structure rather than its
    surroundings, with the support's appearance carried into the query's modality by the
    registration's joint histogram.

    ``p(q | s)`` is the joint histogram of (support intensity, query intensity) over the voxels
    the support covers after registration, normalised per support bin. The support intensities
    inside the warped mask give ``p_in(q) = sum_s h_in(s) p(q | s)``; those of a band around it
    (``band_mm`` outside) give ``p_out(q)``. The result is ``log p_in(q) - log p_out(q)`` at every
    voxel: a function of the query's intensity alone, so it does not move with the registration
    error that places the warped mask, only its estimate does (the whole covered body votes).

    :param warped_image: support image warped onto the working grid ``[D, H, W]`` (any units).
    :param covered: bool ``[D, H, W]``: where ``warped_image`` has support data.
    :param warped_mask: bool ``[D, H, W]``: the warped support mask.
    :param query_image: query image on the same grid.
    :param spacing: working-grid spacing (mm, array axes).
    :returns: float32 ``[D, H, W]`` log-ratio (0 where nothing is known: no covered voxel).
    """
    out = np.zeros(query_image.shape, np.float32)
    inside = warped_mask & covered
    if not inside.any():
        return out
    s_bin = _bin_index(warped_image, warped_image[covered], support_bins)
    q_bin = _bin_index(query_image, query_image[covered], query_bins)
    joint = np.bincount(s_bin[covered] * query_bins + q_bin[covered], minlength=support_bins * query_bins)
    joint = joint.reshape(support_bins, query_bins).astype(np.float64) + 0.5 / query_bins
    q_given_s = joint / joint.sum(axis=1, keepdims=True)
    distance = ndimage.distance_transform_edt(~warped_mask, sampling=spacing)
    band = covered & (distance > band_mm[0]) & (distance <= band_mm[1])

    def translated(region: np.ndarray) -> np.ndarray:
        h = np.bincount(s_bin[region], minlength=support_bins).astype(np.float64) + 1e-3
        return (h / h.sum()) @ q_given_s

    log_ratio = (np.log(translated(inside)) - np.log(translated(band))).astype(np.float32)
    return log_ratio[q_bin]


def best_shift(inside: np.ndarray, p_sim: np.ndarray, spacing: np.ndarray, max_shift_mm: float,
               windows: Sequence[Window], step: int = 2) -> np.ndarray:
    """Voxel translation ``t`` (working-grid axes, ``|t| <= max_shift_mm``) maximising the
    agreement ``sum_x inside(x - t) * (2 P_sim(x) - 1)`` of the warped mask with a semantic map,
    searched on the windows' union box block-averaged by ``step`` (FFT cross-correlation).
    ``t = 0`` when nothing agrees better than no shift."""
    from scipy.signal import fftconvolve

    box = windows_box(windows, inside.shape)

    def coarse(values: np.ndarray) -> np.ndarray:
        t = torch.as_tensor(np.ascontiguousarray(values, dtype=np.float32))[None, None]
        return F.avg_pool3d(t, step, step, ceil_mode=True)[0, 0].numpy()

    mask = coarse(inside[box])
    evidence = coarse(2.0 * p_sim[box] - 1.0)
    score = fftconvolve(evidence, mask[::-1, ::-1, ::-1], mode="full")
    # score index of shift t: t + (mask.shape - 1)
    origin = np.asarray(mask.shape) - 1
    radius = np.floor(max_shift_mm / (spacing * step)).astype(int)
    window = score[tuple(slice(int(o - r), int(o + r + 1)) for o, r in zip(origin, radius))]
    offsets = np.stack(np.meshgrid(*[np.arange(-r, r + 1) for r in radius], indexing="ij"), -1)
    allowed = np.linalg.norm(offsets * spacing * step, axis=-1) <= max_shift_mm + 1e-6
    window = np.where(allowed, window, -np.inf)
    best = np.unravel_index(int(np.argmax(window)), window.shape)
    zero = tuple(int(r) for r in radius)
    if window[best] <= window[zero] + 1e-6:
        return np.zeros(3, int)
    return (np.asarray(best) - radius) * step


__all__ = ["best_shift", "clean_core", "contrastive_prior", "evenly_spaced", "log_mean_exp", "mask_distances", "pool_to_features",
           "region_masks", "translated_appearance", "windows_box"]
