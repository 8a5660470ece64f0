"""The engine: one query, k supports, four backends.

Stages (see README, "How it works"):

1. **register** each support to the query; warp its mask (linearly, then >= 0.5) onto the
   query's *working grid* (canonical RAS, 1.5 mm, covering the query's field of view); the mean
   over supports, smoothed (sigma = 2 voxels) and divided by its max, is ``P_reg``.
2. **windows**: the box of the warped mask (plus a margin) is covered by overlapping 128^3
   windows of the working grid; each support's own mask box is tiled by windows of its own
   working grid.
3. **encode** support windows -> prototypes (features inside the mask, all supports
   concatenated); encode query windows -> ``P_sim`` and entropy ``H`` on each window's feature
   grid, brought to the window grid (trilinear, in physical space) and merged over windows.
4. **fuse** ``P_reg``, ``P_sim``, ``H`` on the working grid.
5. **decode** each query window (fused logits + query features), merge logits over windows,
   resample them (linearly) onto the query's own grid and threshold (> ``config.threshold``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from spasem.core.adaptive import (best_shift, clean_core, contrastive_prior, evenly_spaced, region_masks,
                                  translated_appearance)
from spasem.core.backends import Decoder, Encoder, Features, Fusion, RegistrationBackend, RunContext, Timer, tensor_to_volume
from spasem.core.cache import StageCache, grid_digest, grid_from_dict, grid_to_dict, make_key, volume_digest
from spasem.core.config import PipelineConfig, StageConfig, build_config
from spasem.core.priors import prototypes as extract_prototypes
from spasem.core.priors import semantic_prior, spatial_prior
from spasem.core.progress import Progress
from spasem.core.registry import Registry, get_registry
from spasem.core.resample import resample
from spasem.core.validation import align_mask, binary_mask, check_image
from spasem.core.volume import Grid, Volume
from spasem.core.windows import Window, WindowMerger, plan_windows, roi_bounds, tile_windows
from spasem.errors import ConfigError, PipelineError

#: logit given to working-grid voxels that no query window covers (certainly outside)
OUTSIDE_LOGIT = -50.0

#: maps kept on the working grid, and the value each takes outside the windows
MAP_DEFAULTS = {"p_reg": 0.0, "p_sim": 0.0, "entropy": 1.0, "fused_logits": OUTSIDE_LOGIT, "logits": OUTSIDE_LOGIT}


@dataclass(frozen=True)
class Support:
    """One annotated example: an image and a mask on the image's grid (label map)."""

    image: Volume
    mask: Volume


@dataclass
class Backends:
    registration: RegistrationBackend
    encoder: Encoder
    fusion: Fusion
    decoder: Decoder


@dataclass
class SegmentationResult:
    """What :func:`segment` returns.

    :param mask: uint8 0/1 label map on the query's own grid.
    :param maps: float maps on the working grid: ``p_reg``, ``p_sim``, ``entropy``,
        ``fused_logits`` (fusion output) and ``logits`` (decoder output, merged).
    :param work_grid: the working grid (canonical RAS, isotropic).
    :param windows: the query windows used.
    :param timings: seconds per stage.
    :param num_prototypes: prototypes taken from the supports.
    """

    mask: Volume
    maps: dict[str, Volume]
    work_grid: Grid
    windows: list[Window]
    query_grid: Grid
    timings: dict[str, float] = field(default_factory=dict)
    num_prototypes: int = 0
    config: PipelineConfig | None = None

    def maps_on_query_grid(self, names: Sequence[str] | None = None) -> dict[str, Volume]:
        """The working-grid maps resampled (linearly) onto the query's own grid."""
        names = list(names or self.maps)
        return {n: paste_to_grid(self.maps[n], self.query_grid, MAP_DEFAULTS.get(n, 0.0), name=n) for n in names}


def paste_to_grid(values: Volume, target: Grid, outside: float, name: str | None = None) -> Volume:
    """Resample a float working-grid map onto ``target`` (linear), ``outside`` beyond its field of
    view. Only the target box that the map can reach is resampled."""
    corners = values.grid.corners()
    idx = target.physical_to_index(corners)
    lo = np.maximum(np.floor(idx.min(axis=0)).astype(int) - 1, 0)
    hi = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 1, np.asarray(target.shape) - 1)
    out = np.full(target.shape, outside, dtype=np.float32)
    if np.all(hi >= lo):
        sub = target.subgrid(lo, hi - lo + 1)
        part = resample(values, sub, interpolation="linear", fill=outside)
        out[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1] = part.array
    return Volume(out, target, name=name)


def features_to_window(values: torch.Tensor, features: Features) -> torch.Tensor:
    """A map ``[d, h, w]`` on ``features.grid`` brought to ``features.window`` ``[D, H, W]``:
    trilinear interpolation in physical space, edge values beyond the outermost feature centres."""
    fgrid, wgrid = features.grid, features.window
    # window index -> feature index: idx_f = M @ idx_w + t
    m = np.linalg.inv(fgrid.direction * fgrid.spacing[None, :]) @ (wgrid.direction * wgrid.spacing[None, :])
    t = fgrid.physical_to_index(wgrid.origin)
    device = values.device
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in wgrid.shape]
    ii, jj, kk = torch.meshgrid(*axes, indexing="ij")
    idx_w = torch.stack([ii, jj, kk], dim=-1)  # [D, H, W, 3]
    idx_f = idx_w @ torch.as_tensor(m.T, dtype=torch.float32, device=device) + torch.as_tensor(t, dtype=torch.float32, device=device)
    sizes = torch.as_tensor(fgrid.shape, dtype=torch.float32, device=device)
    norm = torch.where(sizes > 1, idx_f / (sizes - 1).clamp_min(1) * 2 - 1, torch.zeros_like(idx_f))
    grid = norm.flip(-1)[None]  # grid_sample wants (x, y, z) = (k, j, i)
    out = F.grid_sample(values[None, None].to(torch.float32), grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out[0, 0]


def _coerce_config(config: PipelineConfig | Mapping[str, Any] | None) -> PipelineConfig:
    if config is None:
        return PipelineConfig()
    if isinstance(config, PipelineConfig):
        return config
    return build_config(config)


def make_context(config: PipelineConfig, progress: Progress | None = None) -> RunContext:
    """Run context for ``config``; refuses a CUDA device that does not exist."""
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device '{config.device}': no CUDA device is available (torch {torch.__version__}"
            f"{' is a CPU-only build' if torch.version.cuda is None else ' sees no GPU'}); use --device cpu"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device '{config.device}': only {torch.cuda.device_count()} CUDA device(s) present")
    return RunContext(device=device, seed=config.seed, progress=progress or Progress(enabled=False),
                      mixed_precision=config.mixed_precision)


def create_backends(config: PipelineConfig, context: RunContext, registry: Registry | None = None) -> Backends:
    """Instantiate the four backends of ``config`` (options validated before any compute)."""
    registry = registry or get_registry()
    return Backends(
        registration=registry.create("registration", config.registration.name, config.registration.options, context),  # type: ignore[arg-type]
        encoder=registry.create("encoder", config.encoder.name, config.encoder.options, context),  # type: ignore[arg-type]
        fusion=registry.create("fusion", config.fusion.name, config.fusion.options, context),  # type: ignore[arg-type]
        decoder=registry.create("decoder", config.decoder.name, config.decoder.options, context),  # type: ignore[arg-type]
    )


def prepare_supports(
    supports: Sequence[Support | tuple[Volume, Volume]], label: int | None, resample_mask: bool
) -> list[Support]:
    """Check each (image, mask) pair and reduce the mask to the 0/1 map of ``label``."""
    if len(supports) == 0:
        raise ConfigError("at least one support (image + mask) is needed")
    prepared = []
    for n, item in enumerate(supports, start=1):
        image, mask = (item.image, item.mask) if isinstance(item, Support) else item
        role = f"support {n}" if len(supports) > 1 else "support"
        check_image(image, f"{role} image")
        aligned = align_mask(mask, image, resample_mask=resample_mask)
        prepared.append(Support(image, binary_mask(aligned, label, f"{role} mask")))
    return prepared


@dataclass
class PreparedQuery:
    """A query and its image on the working grid."""

    volume: Volume
    work_grid: Grid
    image_work: Volume
    fill: float


@dataclass
class Priors:
    """Everything computed before fusion, on the query's working grid.

    :param p_reg: spatial prior ``[I, J, K]`` (working grid).
    :param p_sim: semantic prior ``[I, J, K]``; 0 outside the windows.
    :param entropy: normalised entropy ``[I, J, K]``; 1 outside the windows.
    :param query_windows: per window, its query features and raw image (for the decoder).
    """

    query: PreparedQuery
    windows: list[Window]
    p_reg: torch.Tensor
    p_sim: torch.Tensor
    entropy: torch.Tensor
    query_windows: list[tuple[Window, Features, Volume]]
    num_prototypes: int


class Engine:
    """Runs the stages of the method with one set of backends; reusable across queries.

    :param config: the pipeline configuration.
    :param registry: where backends are looked up (default: all installed plugins).
    :param progress: progress reporter (default: silent).
    :param backends: already-instantiated backends (else created from ``config``).
    :param cache: optional :class:`~spasem.core.cache.StageCache` for registration results,
        support prototypes and query features (keyed by content hash).
    """

    def __init__(
        self,
        config: PipelineConfig | Mapping[str, Any] | None = None,
        *,
        registry: Registry | None = None,
        progress: Progress | None = None,
        backends: Backends | None = None,
        cache: StageCache | None = None,
    ):
        self.config = _coerce_config(config)
        self.progress = progress or Progress(enabled=False)
        self.context = backends.encoder.context if backends is not None else make_context(self.config, self.progress)
        self.backends = backends or create_backends(self.config, self.context, registry)
        self.registry = registry
        self.cache = cache
        self.timer = Timer()
        self._digests: dict[int, tuple[Volume, str]] = {}

    # -- helpers -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.context.device

    def _digest(self, volume: Volume) -> str:
        entry = self._digests.get(id(volume))
        if entry is None or entry[0] is not volume:
            entry = (volume, volume_digest(volume))
            self._digests[id(volume)] = entry
        return entry[1]

    def _stage_id(self, kind: str) -> dict[str, Any]:
        stage = getattr(self.config, kind)
        backend = getattr(self.backends, kind)
        return {"name": stage.name, "options": backend.config.model_dump(mode="json")}

    def _cached(self, stage: str, key: str, compute):
        if self.cache is not None:
            hit = self.cache.load(stage, key)
            if hit is not None:
                return hit
        value = compute()
        if self.cache is not None:
            self.cache.store(stage, key, value)
        return value

    # -- stages --------------------------------------------------------------------------------
    def prepare_query(self, query: Volume) -> PreparedQuery:
        """Check the query and resample it onto its working grid."""
        check_image(query, "query image")
        work_grid = query.grid.canonical(self.config.window.spacing_mm)
        with self.timer.time("resample"):
            image_work = resample(query, work_grid, fill="min")
        return PreparedQuery(query, work_grid, image_work, float(np.min(query.array)))

    def prepare_supports(self, supports: Sequence[Support | tuple[Volume, Volume]]) -> list[Support]:
        return prepare_supports(supports, self.config.label, self.config.resample_mask)

    def warp_support(self, support: Support, query: PreparedQuery, index: int = 1) -> tuple[np.ndarray, np.ndarray | None]:
        """Register one support to the query; its mask on the working grid as a bool array
        (linear warp of the 0/1 mask, >= 0.5) and, with ``priors.core_appearance``, the
        :func:`~spasem.core.adaptive.translated_appearance` log-ratio map (float32, working grid;
        else None)."""
        appearance = self.config.priors.core_appearance
        parts = ["appearance"] if appearance else []
        key = make_key("warp", self._digest(support.image), self._digest(support.mask), self._digest(query.volume),
                       self._stage_id("registration"), grid_digest(query.work_grid), *parts)

        def compute() -> dict[str, Any]:
            with self.timer.time("register"):
                backend = self.backends.registration
                if backend.uses_support_mask:
                    transform = backend.register(support.image, query.volume, support_mask=support.mask)  # type: ignore[call-arg]
                else:
                    transform = backend.register(support.image, query.volume)
            with self.timer.time("warp"):
                soft = Volume(support.mask.array.astype(np.float32), support.mask.grid, name=support.mask.name)
                warped = transform.warp(soft, query.work_grid)
            mask = np.ascontiguousarray(warped.array >= 0.5)
            out = {"mask": torch.from_numpy(mask)}
            if appearance:
                with self.timer.time("appearance"):
                    # shifted so that every support voxel is >= 1 and 0 means "outside its field of view"
                    image = np.asarray(support.image.array, np.float32)
                    lifted = Volume(image - float(image.min()) + 1.0, support.image.grid, name=support.image.name)
                    warped_image = np.asarray(transform.warp(lifted, query.work_grid).array, np.float32)
                    log_ratio = translated_appearance(warped_image, warped_image >= 0.5, mask,
                                                      np.asarray(query.image_work.array, np.float32), query.work_grid.spacing)
                out["appearance"] = torch.from_numpy(log_ratio)
            return out

        with self.progress.stage(f"registering support {index} ({self.backends.registration.name})"):
            found = self._cached("warp", key, compute)
            mask = found["mask"].numpy()
        if not mask.any():
            raise PipelineError(
                f"registration '{self.backends.registration.name}' moved the mask of support {index} "
                f"({support.image.label_for_messages}) entirely outside the query's field of view"
            )
        return mask, (found["appearance"].numpy() if appearance else None)

    def support_prototypes(self, support: Support, index: int = 1) -> torch.Tensor:
        """Prototypes ``[N, C]`` of one support: encoder features inside its mask, over
        non-overlapping windows tiling the mask's box on the support's working grid."""
        cfg = self.config.window
        key = make_key("prototypes", self._digest(support.image), self._digest(support.mask),
                       self._stage_id("encoder"), cfg.model_dump(mode="json"))

        def compute() -> dict[str, Any]:
            sgrid = support.image.grid.canonical(cfg.spacing_mm)
            with self.timer.time("resample"):
                simage = resample(support.image, sgrid, fill="min")
                smask = resample(support.mask, sgrid)
            sfill = float(np.min(support.image.array))
            sbounds = roi_bounds(smask.array > 0, sgrid)
            if sbounds is None:
                raise PipelineError(
                    f"support {index}: its mask vanished when resampled to {cfg.spacing_mm:g} mm (structure too small)"
                )
            found = []
            for window in self.progress.iterate(tile_windows(sgrid, sbounds[0], sbounds[1], cfg.size), f"support {index} windows"):
                mask_win = window.crop(smask.array)
                if not mask_win.any():
                    continue
                with self.timer.time("encode"):
                    feats = self.backends.encoder.encode(window.crop_volume(simage, fill=sfill))
                with self.timer.time("semantic_prior"):
                    found.append(extract_prototypes(feats.data.to(self.device), torch.as_tensor(mask_win, device=self.device)).cpu())
            return {"prototypes": torch.cat(found) if found else torch.zeros(0, 0)}

        return self._cached("prototypes", key, compute)["prototypes"].to(self.device)

    def encode_query(self, query: PreparedQuery, windows: Sequence[Window]) -> list[tuple[Window, Features, Volume]]:
        """Encoder features of each query window (with the window's raw image)."""
        key = make_key("query_features", self._digest(query.volume), self._stage_id("encoder"),
                       grid_digest(query.work_grid), [[list(w.start), list(w.size)] for w in windows])
        images = [window.crop_volume(query.image_work, fill=query.fill) for window in windows]

        def compute() -> dict[str, Any]:
            out = []
            for image in self.progress.iterate(images, "query windows"):
                with self.timer.time("encode"):
                    feats = self.backends.encoder.encode(image)
                out.append({"data": feats.data.detach().cpu(), "grid": grid_to_dict(feats.grid),
                            "window": grid_to_dict(feats.window)})
            return {"windows": out}

        stored = self._cached("query_features", key, compute)["windows"]
        return [
            (window, Features(entry["data"], grid_from_dict(entry["grid"]), grid_from_dict(entry["window"])), image)
            for window, entry, image in zip(windows, stored, images)
        ]

    def semantic_maps(
        self,
        query: PreparedQuery,
        query_windows: Sequence[tuple[Window, Features, Volume]],
        prototypes: torch.Tensor,
        background: torch.Tensor | None = None,
        bands: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``P_sim`` and entropy on the working grid, merged over the query windows.

        :param background: background prototypes ``[N_B, C]``: the contrastive prior
            (:func:`spasem.core.adaptive.contrastive_prior`) instead of the paper's.
        :param bands: per-window bool masks on the feature grid: the prior is computed only
            there; elsewhere ``P_sim = 0`` and ``H = 1`` (the values outside the windows).
        """
        p_sim_merge = WindowMerger(query.work_grid.shape, self.device)
        entropy_merge = WindowMerger(query.work_grid.shape, self.device)
        pcfg = self.config.priors

        def prior(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if background is not None:
                return contrastive_prior(data, prototypes, background, pcfg.tau_s)
            return semantic_prior(data, prototypes, pcfg.tau_s, pcfg.tau_e)

        for n, (window, feats, _) in enumerate(query_windows):
            with self.timer.time("semantic_prior"):
                data = feats.data.to(self.device)
                if bands is None:
                    p_sim_f, entropy_f = prior(data)
                else:
                    band = bands[n].to(self.device)
                    p_sim_f = torch.full(band.shape, MAP_DEFAULTS["p_sim"], dtype=torch.float32, device=self.device)
                    entropy_f = torch.full(band.shape, MAP_DEFAULTS["entropy"], dtype=torch.float32, device=self.device)
                    if band.any():
                        p_sel, h_sel = prior(data[:, band])
                        p_sim_f[band], entropy_f[band] = p_sel, h_sel
                p_sim_merge.add(window, features_to_window(p_sim_f, feats))
                entropy_merge.add(window, features_to_window(entropy_f, feats))
        p_sim = p_sim_merge.result(MAP_DEFAULTS["p_sim"]).clamp(0, 1)
        entropy = entropy_merge.result(MAP_DEFAULTS["entropy"]).clamp(0, 1)
        return p_sim, entropy

    def _semantic_pass(
        self,
        query: PreparedQuery,
        inside: np.ndarray,
        query_windows: Sequence[tuple[Window, Features, Volume]],
        support_prototypes: Sequence[torch.Tensor],
        reach_mm: float | None,
        core_keep: np.ndarray | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Prototypes (support and/or query core), optional background set and band, then
        ``P_sim`` and entropy on the working grid. ``inside`` is the warped mask (bool, working
        grid) the query-adaptive regions are taken from; ``core_keep`` (bool, working grid)
        restricts the query core (:func:`~spasem.core.adaptive.region_masks`)."""
        pcfg = self.config.priors
        found = list(support_prototypes)
        background, bands = None, None
        if pcfg.query_prototypes != "off" or pcfg.semantic != "paper" or reach_mm is not None:
            with self.timer.time("query_regions"):
                regions = region_masks(
                    inside, query.work_grid, [w for w, _, _ in query_windows], [f.grid for _, f, _ in query_windows],
                    self.device, pcfg.core_margin_mm, pcfg.background_margin_mm, reach_mm, core_keep,
                )

                def rows(key: str) -> torch.Tensor:
                    return torch.cat([feats.data.to(self.device)[:, r[key]].T for (_, feats, _), r in zip(query_windows, regions)])

                if pcfg.semantic == "contrastive":
                    background = evenly_spaced(rows("outside"), pcfg.max_prototypes)
                    if background.shape[0] == 0:
                        raise PipelineError(
                            "the contrastive semantic prior found no query voxel farther than "
                            f"priors.background_margin_mm={pcfg.background_margin_mm:g} mm from the warped mask "
                            "inside the windows; lower it or enlarge the windows")
                if pcfg.query_prototypes != "off":
                    core = evenly_spaced(rows("core"), pcfg.max_prototypes)
                    if background is not None:
                        core = clean_core(core, background, pcfg.tau_s)
                    found.append(core)
                if reach_mm is not None:
                    bands = [r["band"] for r in regions]
        found = [p for p in found if p.numel() > 0]
        if not found:
            raise PipelineError("no prototype could be taken (structure smaller than a feature voxel)")
        prototypes = torch.cat([evenly_spaced(p.to(self.device), pcfg.max_prototypes) for p in found])
        self.progress.message(f"{prototypes.shape[0]} prototype(s) of {prototypes.shape[1]} channels"
                              + (f", {background.shape[0]} background" if background is not None else ""))
        p_sim, entropy = self.semantic_maps(query, query_windows, prototypes, background, bands)
        return p_sim, entropy, int(prototypes.shape[0])

    def priors(self, supports: Sequence[Support | tuple[Volume, Volume]], query: Volume) -> Priors:
        """Stages 1-3: registration, spatial prior, windows, prototypes, semantic prior.

        With :class:`~spasem.core.config.PriorsConfig`'s defaults this is the paper's method; its
        options ``query_prototypes``, ``semantic``, ``semantic_reach_mm``, ``realign_mm`` and
        ``max_prototypes`` change what the priors receive (:mod:`spasem.core.adaptive`)."""
        prepared_query = self.prepare_query(query)
        prepared = self.prepare_supports(supports)
        torch.manual_seed(self.config.seed)
        cfg = self.config
        pcfg = cfg.priors
        work_grid = prepared_query.work_grid
        warped_sum = np.zeros(work_grid.shape, dtype=np.float32)
        appearance_sum = np.zeros(work_grid.shape, dtype=np.float32) if pcfg.core_appearance else None
        for n, support in enumerate(prepared, start=1):
            mask, log_ratio = self.warp_support(support, prepared_query, n)
            warped_sum += mask
            if appearance_sum is not None:
                appearance_sum += log_ratio
        warped_mean = warped_sum / len(prepared)
        core_keep = appearance_sum > 0 if appearance_sum is not None else None
        realign = pcfg.realign_mm
        bounds = roi_bounds(warped_sum > 0, work_grid, cfg.window.margin_mm + (realign or 0.0))
        assert bounds is not None  # every warped mask is non-empty (checked in warp_support)
        windows = plan_windows(work_grid, bounds[0], bounds[1], cfg.window.size, cfg.window.min_overlap)
        size = cfg.window.size
        self.progress.message(f"{len(windows)} query window(s) of {size[0]}x{size[1]}x{size[2]} at {cfg.window.spacing_mm:g} mm")

        found: list[torch.Tensor] = []
        if pcfg.query_prototypes != "replace":
            with self.progress.stage(f"encoding supports ({self.backends.encoder.name})"):
                found = [self.support_prototypes(support, n) for n, support in enumerate(prepared, start=1)]
            found = [p.to(self.device) for p in found if p.numel() > 0]
            if not found:
                raise PipelineError("no prototype could be taken from the support masks (structure smaller than a feature voxel)")

        with self.progress.stage(f"encoding query ({len(windows)} window(s))"):
            query_windows = self.encode_query(prepared_query, windows)
            if realign is not None:
                with self.progress.stage("realigning the spatial prior on the semantic prior"):
                    reach = realign + (pcfg.semantic_reach_mm or 0.0)
                    p_sim0, _, _ = self._semantic_pass(prepared_query, warped_mean >= 0.5, query_windows, found, reach,
                                                       core_keep)
                    with self.timer.time("realign"):
                        shift = best_shift(warped_mean >= 0.5, p_sim0.cpu().numpy(), work_grid.spacing, realign,
                                           [w for w, _, _ in query_windows])
                        if np.any(shift):
                            warped_mean = ndimage.shift(warped_mean, shift, order=0, mode="constant", cval=0.0)
                    self.progress.message(f"shift {tuple(np.round(shift * work_grid.spacing, 1))} mm (working-grid axes)")
            with self.timer.time("spatial_prior"):
                p_reg = spatial_prior(torch.as_tensor(warped_mean, device=self.device), cfg.priors.sigma)
            p_sim, entropy, n_prototypes = self._semantic_pass(
                prepared_query, warped_mean >= 0.5, query_windows, found, pcfg.semantic_reach_mm, core_keep)
        return Priors(prepared_query, windows, p_reg, p_sim, entropy, query_windows, n_prototypes)

    def decode(self, priors: Priors, fusion: Fusion | None = None) -> SegmentationResult:
        """Stages 4-5: fuse, decode each window, merge, paste back onto the query's grid."""
        fusion = fusion or self.backends.fusion
        decoder = self.backends.decoder
        timer = Timer()
        with timer.time("fuse"):
            fused = fusion.fuse(priors.p_reg, priors.p_sim, priors.entropy)
            if fused.shape != priors.p_reg.shape:
                raise PipelineError(
                    f"fusion '{fusion.name}' returned shape {tuple(fused.shape)}, expected {tuple(priors.p_reg.shape)}"
                )
            fused = torch.nan_to_num(fused.to(torch.float32), nan=0.0, posinf=-OUTSIDE_LOGIT, neginf=OUTSIDE_LOGIT)
        work_grid = priors.query.work_grid
        logits_merge = WindowMerger(work_grid.shape, self.device)
        with self.progress.stage(f"decoding ({decoder.name})"):
            for window, feats, qimage in priors.query_windows:
                fused_win = tensor_to_volume(window.crop(fused, fill=OUTSIDE_LOGIT), window.grid, name="fused_logits")
                with timer.time("decode"):
                    out = decoder.decode(fused_win, feats, qimage)
                if not out.grid.same_as(window.grid):
                    raise PipelineError(
                        f"decoder '{decoder.name}' returned logits on {out.grid.describe()}, expected the window grid"
                    )
                logits_merge.add(window, torch.as_tensor(np.asarray(out.array, dtype=np.float32)))
        logits = logits_merge.result(OUTSIDE_LOGIT)
        maps = {
            "p_reg": tensor_to_volume(priors.p_reg, work_grid, "p_reg"),
            "p_sim": tensor_to_volume(priors.p_sim, work_grid, "p_sim"),
            "entropy": tensor_to_volume(priors.entropy, work_grid, "entropy"),
            "fused_logits": tensor_to_volume(fused, work_grid, "fused_logits"),
            "logits": tensor_to_volume(logits, work_grid, "logits"),
        }
        query = priors.query.volume
        with self.progress.stage("pasting back onto the query grid"), timer.time("paste"):
            query_logits = paste_to_grid(maps["logits"], query.grid, OUTSIDE_LOGIT)
            mask = Volume((query_logits.array > self.config.threshold).astype(np.uint8), query.grid, is_label=True,
                          name="prediction", modality=query.modality)
            mask = decoder.postprocess(mask)
        timings = dict(self.timer.seconds)
        for stage, seconds in timer.seconds.items():
            timings[stage] = timings.get(stage, 0.0) + seconds
        return SegmentationResult(
            mask=mask,
            maps=maps,
            work_grid=work_grid,
            windows=priors.windows,
            query_grid=query.grid,
            timings=timings,
            num_prototypes=priors.num_prototypes,
            config=self.config,
        )

    def run(self, supports: Sequence[Support | tuple[Volume, Volume]], query: Volume) -> SegmentationResult:
        """All stages with the configured fusion."""
        self.timer = Timer()
        return self.decode(self.priors(supports, query))

    def run_fusions(
        self, supports: Sequence[Support | tuple[Volume, Volume]], query: Volume, fusions: Sequence[str | Mapping[str, Any]]
    ) -> dict[str, SegmentationResult]:
        """All stages once up to the priors, then fuse and decode once per fusion strategy
        (name, or ``{"name": ..., "options": {...}}``); results keyed by fusion name."""
        registry = self.registry or get_registry()
        self.timer = Timer()
        priors = self.priors(supports, query)
        results = {}
        for spec in fusions:
            stage = StageConfig.model_validate(spec)
            fusion = registry.create("fusion", stage.name, stage.options, self.context)
            results[stage.name] = self.decode(priors, fusion)  # type: ignore[arg-type]
        return results


def segment(
    supports: Sequence[Support | tuple[Volume, Volume]],
    query: Volume,
    config: PipelineConfig | Mapping[str, Any] | None = None,
    *,
    registry: Registry | None = None,
    progress: Progress | None = None,
    backends: Backends | None = None,
    cache: StageCache | None = None,
) -> SegmentationResult:
    """Segment in ``query`` the structure drawn in the supports' masks.

    :param supports: one or more ``(image, mask)`` pairs (k-shot); masks may be multi-label
        (``config.label`` picks one id; default: all non-zero voxels). Each mask must be on its
        image's grid (or the same voxels with flipped/permuted axes); see ``resample_mask``.
    :param query: the image to segment.
    :param config: a :class:`PipelineConfig` or a mapping of its fields.
    :param registry: backends to choose from (default: all installed plugins).
    :param progress: progress reporter (default: silent).
    :param backends: already-instantiated backends (reused across calls, e.g. in evaluation).
    :param cache: stage cache (registration, prototypes, query features) shared across calls.
    :returns: :class:`SegmentationResult` with the mask on the query's grid and the priors.
    """
    engine = Engine(config, registry=registry, progress=progress, backends=backends, cache=cache)
    return engine.run(supports, query)
