"""``appearance``: a weight-free decoder that lets the query's own intensities place the boundary.

The fused logits say roughly where the structure is; the query image says where its tissue
ends. Per window (all distances in mm on the window grid, which may be anisotropic):

1. ``seed`` = fused logits > 0;
2. spatial prior ``pi = G_sigma * seed`` (Gaussian of ``prior_sigma_mm``), clamped to
   ``[prior_floor, 1 - prior_floor]``: a soft version of the seed that leaves room for the
   registration's error;
3. appearance: intensity histograms of the seed's *core* (deeper than ``core_margin_mm``) and of
   a *band* around it (``band_mm[0] < distance <= band_mm[1]``), both from this query, so the
   model fits this scan's modality, contrast and bias; the per-voxel log-likelihood ratio
   ``log p_core(I) - log p_band(I)`` clipped to ``+-max_log_ratio``;
4. logits = ``logit(pi) + ratio``: a voxel joins the structure when it looks like the core and is
   plausibly near it, and leaves it when it looks like the surroundings.

``iterations > 1`` re-estimates the histograms from the previous result (the prior stays the
seed's). This is the classical "atlas prior x intensity likelihood" posterior with the fused
map as the atlas; docs/classical.md has its ablation.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field, field_validator
from scipy import ndimage

from spasem.core.backends import Decoder, Features
from spasem.core.volume import Volume
from spasem.hookspecs import hookimpl
from spasem.plugins.decoders.threshold import CleanupConfig, clean_mask

#: fewer samples than this in the core or the band: the histograms are not trusted and the
#: fused logits pass through unchanged
MIN_SAMPLES = 50


def log_likelihood_ratio(
    inside: np.ndarray, outside: np.ndarray, values: np.ndarray, bins: int, max_log_ratio: float
) -> np.ndarray:
    """``log p_in(v) - log p_out(v)`` for each of ``values`` (any shape), from histograms of the
    samples ``inside`` and ``outside`` (1-D) over their common 0.5-99.5 percentile range with
    ``bins`` bins, smoothed by one bin and floored at 0.1 % of a uniform density; values beyond
    the range take the end bins. Clipped to ``[-max_log_ratio, max_log_ratio]``; float32."""
    lo, hi = np.percentile(np.concatenate([inside, outside]), [0.5, 99.5])
    if not hi > lo:
        return np.zeros(values.shape, np.float32)
    edges = np.linspace(lo, hi, bins + 1)

    def density(samples: np.ndarray) -> np.ndarray:
        counts = np.histogram(np.clip(samples, lo, hi), edges)[0].astype(np.float64)
        counts = ndimage.gaussian_filter1d(counts, 1.0, mode="nearest") + 1e-3 * counts.sum() / bins
        return counts / counts.sum()

    ratio = np.clip(np.log(density(inside)) - np.log(density(outside)), -max_log_ratio, max_log_ratio)
    index = np.clip(((values - lo) / (hi - lo) * bins).astype(np.int64), 0, bins - 1)
    return ratio[index].astype(np.float32)


class AppearanceDecoder(Decoder):
    """Fused mask as a soft spatial prior + the query's own intensity model (module docstring)."""

    name = "appearance"
    description = ("weight-free: fused mask as a soft prior x the query's intensity histograms (core vs "
                   "surrounding band); optional largest component / hole filling")

    class Config(CleanupConfig):
        prior_sigma_mm: float = Field(6.0, gt=0, description="Gaussian sigma (mm) turning the fused mask into the spatial prior")
        prior_floor: float = Field(1e-4, gt=0, lt=0.5, description="the spatial prior is clamped to [floor, 1 - floor]")
        core_margin_mm: float = Field(3.0, ge=0, description="core = fused mask deeper than this (mm): the structure's intensity samples")
        band_mm: tuple[float, float] = Field((3.0, 15.0), description="band = distance (mm) from the fused mask in (lo, hi]: the surroundings' samples")
        bins: int = Field(64, ge=4, le=4096, description="histogram bins over the samples' 0.5-99.5 percentile range")
        max_log_ratio: float = Field(4.0, gt=0, description="the log-likelihood ratio is clipped to +- this")
        iterations: int = Field(1, ge=1, le=10, description="re-estimate the histograms from the previous result this many times - 1")

        @field_validator("band_mm")
        @classmethod
        def _band(cls, value: tuple[float, float]) -> tuple[float, float]:
            if not 0 <= value[0] < value[1]:
                raise ValueError(f"expected 0 <= lo < hi, got {value}")
            return value

    def decode(self, fused_logits: Volume, query_features: Features, query_image: Volume) -> Volume:
        cfg = self.config
        fused = np.asarray(fused_logits.array, dtype=np.float32)
        seed = fused > 0
        if not seed.any() or seed.all():
            return fused_logits
        spacing = np.asarray(fused_logits.grid.spacing, dtype=np.float64)
        # everything that can change lies within the band or 4 prior sigmas (the Gaussian's
        # support) of the seed: work on that box; beyond it the prior is at its floor
        margin = np.ceil(max(4.0 * cfg.prior_sigma_mm, cfg.band_mm[1]) / spacing).astype(int) + 1
        found = np.argwhere(seed)
        lo = np.maximum(found.min(axis=0) - margin, 0)
        hi = np.minimum(found.max(axis=0) + margin + 1, seed.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        seed_box = seed[box]
        image = np.asarray(query_image.array, dtype=np.float32)[box]
        floor_logit = float(np.log(cfg.prior_floor) - np.log1p(-cfg.prior_floor))
        prior = ndimage.gaussian_filter(seed_box.astype(np.float32), cfg.prior_sigma_mm / spacing, mode="constant")
        prior = np.clip(prior, cfg.prior_floor, 1.0 - cfg.prior_floor)
        prior_logit = np.log(prior) - np.log1p(-prior)
        mask, logits = seed_box, None
        for _ in range(cfg.iterations):
            ratio = self._ratio(mask, image, spacing)
            if ratio is None:
                break
            logits = prior_logit + ratio
            mask = logits > 0
            if not mask.any():
                break
        if logits is None:
            return fused_logits
        out = np.full(seed.shape, floor_logit, dtype=np.float32)
        out[box] = logits
        return fused_logits.with_array(out)

    def _ratio(self, mask: np.ndarray, image: np.ndarray, spacing: np.ndarray) -> np.ndarray | None:
        """Appearance log-likelihood ratio for ``mask``'s core vs band; None with too few samples."""
        cfg = self.config
        depth = ndimage.distance_transform_edt(mask, sampling=spacing)
        core = depth >= cfg.core_margin_mm
        if int(core.sum()) < MIN_SAMPLES:  # thin structure: its deepest half
            core = mask & (depth >= 0.5 * float(depth.max()))
        distance = ndimage.distance_transform_edt(~mask, sampling=spacing)
        band = (distance > cfg.band_mm[0]) & (distance <= cfg.band_mm[1])
        if int(core.sum()) < MIN_SAMPLES or int(band.sum()) < MIN_SAMPLES:
            return None
        return log_likelihood_ratio(image[core], image[band], image, cfg.bins, cfg.max_log_ratio)

    def postprocess(self, mask: Volume) -> Volume:
        return clean_mask(mask, self.config.largest_component, self.config.fill_holes)


@hookimpl
def spasem_register_decoders(register):
    register(AppearanceDecoder)
