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

from spasem.core.backends import Decoder, Encoder, Features, Fusion, RegistrationBackend, RunContext, Timer, tensor_to_volume
from spasem.core.config import PipelineConfig, build_config
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


def segment(
    supports: Sequence[Support | tuple[Volume, Volume]],
    query: Volume,
    config: PipelineConfig | Mapping[str, Any] | None = None,
    *,
    registry: Registry | None = None,
    progress: Progress | None = None,
    backends: Backends | None = None,
) -> SegmentationResult:
    """Segment in ``query`` the structure drawn in the supports' masks.

    :param supports: one or more ``(image, mask)`` pairs (k-shot); masks may be multi-label
        (``config.label`` picks one id; default: all non-zero voxels).
    :param query: the image to segment.
    :param config: a :class:`PipelineConfig` or a mapping of its fields.
    :param registry: backends to choose from (default: all installed plugins).
    :param progress: progress reporter (default: silent).
    :param backends: already-instantiated backends (reused across calls, e.g. in evaluation).
    :returns: :class:`SegmentationResult` with the mask on the query's grid and the priors.
    """
    config = _coerce_config(config)
    progress = progress or Progress(enabled=False)
    context = backends.encoder.context if backends is not None else make_context(config, progress)
    backends = backends or create_backends(config, context, registry)
    check_image(query, "query image")
    prepared = prepare_supports(supports, config.label, config.resample_mask)
    torch.manual_seed(config.seed)
    timer = Timer()
    device = context.device
    spacing = config.window.spacing_mm
    size = config.window.size

    # 1. registration and spatial prior ------------------------------------------------------
    work_grid = query.grid.canonical(spacing)
    with timer.time("resample"):
        query_work = resample(query, work_grid, fill="min")
    query_fill = float(np.min(query.array))
    warped_sum = np.zeros(work_grid.shape, dtype=np.float32)
    for n, support in enumerate(prepared, start=1):
        with progress.stage(f"registering support {n}/{len(prepared)} ({backends.registration.name})"):
            with timer.time("register"):
                transform = backends.registration.register(support.image, query)
            with timer.time("warp"):
                soft = Volume(support.mask.array.astype(np.float32), support.mask.grid, name=support.mask.name)
                warped = transform.warp(soft, work_grid)
        binary = warped.array >= 0.5
        if not binary.any():
            raise PipelineError(
                f"registration '{backends.registration.name}' moved the mask of support {n} "
                f"({support.image.label_for_messages}) entirely outside the query's field of view"
            )
        warped_sum += binary
    warped_mean = torch.as_tensor(warped_sum / len(prepared), device=device)
    with timer.time("spatial_prior"):
        p_reg = spatial_prior(warped_mean, config.priors.sigma)

    bounds = roi_bounds(warped_sum > 0, work_grid, config.window.margin_mm)
    assert bounds is not None  # checked per support above
    windows = plan_windows(work_grid, bounds[0], bounds[1], size, config.window.min_overlap)
    progress.message(f"{len(windows)} query window(s) of {size[0]}x{size[1]}x{size[2]} at {spacing:g} mm")

    # 2. prototypes from the supports ---------------------------------------------------------
    protos = []
    with progress.stage(f"encoding supports ({backends.encoder.name})"):
        for n, support in enumerate(prepared, start=1):
            sgrid = support.image.grid.canonical(spacing)
            with timer.time("resample"):
                simage = resample(support.image, sgrid, fill="min")
                smask = resample(support.mask, sgrid)
            sfill = float(np.min(support.image.array))
            sbounds = roi_bounds(smask.array > 0, sgrid)
            if sbounds is None:
                raise PipelineError(f"support {n}: its mask vanished when resampled to {spacing:g} mm (structure too small)")
            for window in progress.iterate(tile_windows(sgrid, sbounds[0], sbounds[1], size), f"support {n} windows"):
                mask_win = window.crop(smask.array)
                if not mask_win.any():
                    continue
                with timer.time("encode"):
                    feats = backends.encoder.encode(window.crop_volume(simage, fill=sfill))
                with timer.time("semantic_prior"):
                    protos.append(extract_prototypes(feats.data.to(device), torch.as_tensor(mask_win, device=device)))
    prototypes = torch.cat(protos) if protos else torch.zeros(0)
    if prototypes.shape[0] == 0:
        raise PipelineError("no prototype could be taken from the support masks (structure smaller than a feature voxel)")
    progress.message(f"{prototypes.shape[0]} prototype(s) of {prototypes.shape[1]} channels")

    # 3. semantic prior on the query windows ---------------------------------------------------
    p_sim_merge = WindowMerger(work_grid.shape, device)
    entropy_merge = WindowMerger(work_grid.shape, device)
    query_windows: list[tuple[Window, Features, Volume]] = []
    with progress.stage(f"encoding query ({len(windows)} window(s))"):
        for window in progress.iterate(windows, "query windows"):
            qimage = window.crop_volume(query_work, fill=query_fill)
            with timer.time("encode"):
                feats = backends.encoder.encode(qimage)
            with timer.time("semantic_prior"):
                p_sim_f, entropy_f = semantic_prior(
                    feats.data.to(device), prototypes, config.priors.tau_s, config.priors.tau_e
                )
                p_sim_merge.add(window, features_to_window(p_sim_f, feats))
                entropy_merge.add(window, features_to_window(entropy_f, feats))
            query_windows.append((window, feats, qimage))
    p_sim = p_sim_merge.result(MAP_DEFAULTS["p_sim"]).clamp(0, 1)
    entropy = entropy_merge.result(MAP_DEFAULTS["entropy"]).clamp(0, 1)

    # 4. fusion --------------------------------------------------------------------------------
    with timer.time("fuse"):
        fused = backends.fusion.fuse(p_reg, p_sim, entropy)
        if fused.shape != p_reg.shape:
            raise PipelineError(f"fusion '{backends.fusion.name}' returned shape {tuple(fused.shape)}, expected {tuple(p_reg.shape)}")
        fused = torch.nan_to_num(fused.to(torch.float32), nan=0.0, posinf=50.0, neginf=-50.0)

    # 5. decoding and paste-back ----------------------------------------------------------------
    logits_merge = WindowMerger(work_grid.shape, device)
    with progress.stage(f"decoding ({backends.decoder.name})"):
        for window, feats, qimage in query_windows:
            fused_win = tensor_to_volume(window.crop(fused, fill=OUTSIDE_LOGIT), window.grid, name="fused_logits")
            with timer.time("decode"):
                out = backends.decoder.decode(fused_win, feats, qimage)
            if not out.grid.same_as(window.grid):
                raise PipelineError(f"decoder '{backends.decoder.name}' returned logits on {out.grid.describe()}, expected the window grid")
            logits_merge.add(window, torch.as_tensor(np.asarray(out.array, dtype=np.float32)))
    logits = logits_merge.result(OUTSIDE_LOGIT)

    maps = {
        "p_reg": tensor_to_volume(p_reg, work_grid, "p_reg"),
        "p_sim": tensor_to_volume(p_sim, work_grid, "p_sim"),
        "entropy": tensor_to_volume(entropy, work_grid, "entropy"),
        "fused_logits": tensor_to_volume(fused, work_grid, "fused_logits"),
        "logits": tensor_to_volume(logits, work_grid, "logits"),
    }
    with progress.stage("pasting back onto the query grid"), timer.time("paste"):
        query_logits = paste_to_grid(maps["logits"], query.grid, OUTSIDE_LOGIT)
        mask = Volume((query_logits.array > config.threshold).astype(np.uint8), query.grid, is_label=True,
                      name="prediction", modality=query.modality)
        mask = backends.decoder.postprocess(mask)
    return SegmentationResult(
        mask=mask,
        maps=maps,
        work_grid=work_grid,
        windows=windows,
        query_grid=query.grid,
        timings=dict(timer.seconds),
        num_prototypes=int(prototypes.shape[0]),
        config=config,
    )
