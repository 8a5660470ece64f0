"""The method's context priors as plain tensor functions (no plugin, no geometry objects needed).

Shapes and frames: volumes are ``[D, H, W]`` arrays indexed ``[i, j, k]`` like every working-grid
or window array of spasem; feature maps are ``[C, d, h, w]`` on the feature grid of a window;
prototypes are ``[N_p, C]``. All functions work on whatever device their tensors are on.

* :func:`spatial_prior` -- ``P_reg``: the warped support mask smoothed by a 3D Gaussian, / max.
* :func:`prototypes` -- the support features inside the support mask.
* :func:`semantic_prior` -- ``P_sim`` and the normalised assignment entropy ``H`` per query
  feature voxel, streamed over voxel chunks and prototype blocks with running log-sum-exp
  statistics, so that its memory is bounded by ``memory_budget`` whatever ``N_p`` and the number
  of voxels (:func:`semantic_prior_dense` is the literal reference that materialises everything).
* :func:`logit` -- the clamped logit used by the fusion strategies.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from spasem.core.backends import Features

#: truncation of the Gaussian kernel of :func:`spatial_prior`, in sigmas (the issue asks >= 3)
DEFAULT_TRUNCATE = 4.0

#: default memory for the block temporaries of :func:`semantic_prior` (bytes). On CPU, blocks
#: of a few MiB are ~10% faster single-threaded, but with several threads on busy cores the
#: per-operation thread synchronisation of many small blocks costs 2-4x (measured on 2 cores)
DEFAULT_MEMORY_BUDGET = {"cpu": 64 << 20, "cuda": 1 << 30}


def default_memory_budget(device: torch.device) -> int:
    """Default ``memory_budget`` of :func:`semantic_prior` on ``device`` (bytes): 64 MiB on
    CPU, 1 GiB on CUDA."""
    return DEFAULT_MEMORY_BUDGET.get(device.type, DEFAULT_MEMORY_BUDGET["cpu"])


#: fewest voxels per block when prototypes must be split (matmuls with fewer rows are slow)
_MIN_BLOCK_VOXELS = 256

#: [voxels x prototypes] and [voxels x channels] float temporaries alive at once in one block
_BLOCK_TEMPORARIES = 3
_QUERY_TEMPORARIES = 3


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``log(p / (1 - p))`` of ``p`` clamped to ``[eps, 1 - eps]``: finite for any ``p`` (NaN stays NaN).

    With the default ``eps`` the result lies in about ``[-13.8, 13.8]``.
    """
    if not 0.0 < eps < 0.5:
        raise ValueError(f"logit: eps must be in (0, 0.5), got {eps}")
    p = p.clamp(eps, 1.0 - eps)
    return torch.log(p) - torch.log1p(-p)


# ------------------------------------------------------------------------------------------
# spatial prior
# ------------------------------------------------------------------------------------------
def gaussian_kernel1d(sigma: float, truncate: float = DEFAULT_TRUNCATE) -> torch.Tensor:
    """Sampled 1D Gaussian ``exp(-x^2 / 2 sigma^2)`` at integer ``x`` in ``[-r, r]``,
    ``r = max(1, ceil(truncate * sigma))``, normalised to sum 1 (float64, CPU)."""
    if not sigma > 0:
        raise ValueError(f"gaussian kernel: sigma must be > 0, got {sigma}")
    radius = max(1, int(math.ceil(truncate * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_smooth(volume: torch.Tensor, sigma: float, truncate: float = DEFAULT_TRUNCATE) -> torch.Tensor:
    """Separable 3D Gaussian smoothing of a ``[D, H, W]`` volume, zero padding outside it.

    :param sigma: standard deviation in voxels (the same along the three axes); ``<= 0``
        returns a float copy.
    :param truncate: kernel radius ``ceil(truncate * sigma)`` voxels, ``>= 3``.
    :returns: float32 (float64 for float64 input) ``[D, H, W]`` on the input's device.

    Each axis is a sum of ``2r + 1`` shifted copies of the zero-padded volume (exactly a
    correlation with the symmetric kernel): 1.4-3.7x faster than ``conv3d`` on 2 CPU cores. Taps
    farther than the axis length only ever meet padding zeros and are skipped.
    """
    if volume.ndim != 3:
        raise ValueError(f"gaussian_smooth: expected a [D, H, W] volume, got shape {tuple(volume.shape)}")
    if truncate < 3:
        raise ValueError(f"gaussian_smooth: truncate must be >= 3 sigma, got {truncate}")
    dtype = torch.float64 if volume.dtype == torch.float64 else torch.float32
    out = volume.to(dtype).clone()
    if sigma <= 0:
        return out
    kernel = gaussian_kernel1d(sigma, truncate).tolist()
    radius = (len(kernel) - 1) // 2
    for axis in range(3):
        n = out.shape[axis]
        reach = min(radius, n - 1)  # taps beyond n - 1 voxels only see padding
        shape = list(out.shape)
        shape[axis] = n + 2 * reach
        padded = out.new_zeros(shape)
        padded.narrow(axis, reach, n).copy_(out)
        acc = padded.narrow(axis, reach, n) * kernel[radius]
        for t in range(1, reach + 1):  # symmetric kernel: both sides at once
            acc.add_(padded.narrow(axis, reach - t, n) + padded.narrow(axis, reach + t, n), alpha=kernel[radius + t])
        out = acc
    return out


def spatial_prior(warped_mask: torch.Tensor, sigma: float = 2.0, *, truncate: float = DEFAULT_TRUNCATE) -> torch.Tensor:
    """``P_reg``: the support mask warped onto the query, smoothed and divided by its maximum.

    :param warped_mask: ``[D, H, W]`` in [0, 1] on the query's working grid (a binary mask, or
        the mean of k warped binary masks).
    :param sigma: Gaussian sigma in voxels of that grid (2 in the paper).
    :param truncate: kernel radius in sigmas (``>= 3``; default 4).
    :returns: float32 ``[D, H, W]`` in [0, 1], max exactly 1 when the mask has any positive
        voxel, all zeros for an all-zero mask (never NaN). Zero padding: a mask touching the
        volume's border is not extended beyond it.
    """
    if warped_mask.ndim != 3:
        raise ValueError(f"spatial_prior: expected a [D, H, W] mask, got shape {tuple(warped_mask.shape)}")
    smoothed = gaussian_smooth(warped_mask.to(torch.float32), sigma, truncate)
    if not torch.isfinite(smoothed).all():
        raise ValueError("spatial_prior: the warped mask contains NaN or infinite values")
    top = smoothed.max() if smoothed.numel() else smoothed.new_zeros(())
    if top <= 0:
        return torch.zeros_like(smoothed)
    return (smoothed / top).clamp_(0.0, 1.0)


# ------------------------------------------------------------------------------------------
# prototypes
# ------------------------------------------------------------------------------------------
def mask_fraction_on_features(support_mask: torch.Tensor, feature_shape, features: "Features | None" = None) -> torch.Tensor:
    """Fraction of each feature cell covered by the mask, ``[d, h, w]`` in [0, 1].

    With ``features`` (a :class:`~spasem.core.backends.Features` with its grids), each window
    voxel belongs to the feature cell whose centre is nearest in physical space (the cell
    footprint of :meth:`Grid.scaled`: voxels ``[s*i, s*i + s)`` for stride ``s``); the
    fraction is mask voxels / window voxels of that cell. Without it, the window is divided
    into ``d x h x w`` equal bins (PyTorch adaptive average pooling: bin ``i`` covers voxels
    ``floor(i*D/d) .. ceil((i+1)*D/d) - 1``), which is the same footprint whenever ``D`` is a
    multiple of ``d``.
    """
    import torch.nn.functional as F

    mask = support_mask.to(torch.float32)
    if features is None:
        return F.adaptive_avg_pool3d(mask[None, None], tuple(feature_shape))[0, 0]
    import numpy as np

    fgrid, wgrid = features.grid, features.window
    if tuple(mask.shape) != wgrid.shape:
        raise ValueError(f"prototypes: mask shape {tuple(mask.shape)} does not match the features' window grid {wgrid.shape}")
    # window voxel index -> feature voxel index: idx_f = M idx_w + t
    m = np.linalg.inv(fgrid.direction * fgrid.spacing[None, :]) @ (wgrid.direction * wgrid.spacing[None, :])
    t = fgrid.physical_to_index(wgrid.origin)
    device = mask.device
    axes = [torch.arange(n, dtype=torch.float64, device=device) for n in wgrid.shape]
    idx_w = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    idx_f = torch.round(idx_w @ torch.as_tensor(m.T, device=device) + torch.as_tensor(t, device=device)).long()
    sizes = torch.as_tensor(fgrid.shape, device=device)
    inside = ((idx_f >= 0) & (idx_f < sizes)).all(dim=1)
    flat = (idx_f[:, 0] * sizes[1] + idx_f[:, 1]) * sizes[2] + idx_f[:, 2]
    flat = flat[inside]
    n_cells = int(np.prod(fgrid.shape))
    count = torch.bincount(flat, minlength=n_cells).to(torch.float32)
    covered = torch.bincount(flat, weights=mask.reshape(-1)[inside].to(torch.float64), minlength=n_cells).to(torch.float32)
    return (covered / count.clamp_min(1)).reshape(fgrid.shape)


def prototypes(
    support_features: "torch.Tensor | Features",
    support_mask: torch.Tensor,
    *,
    min_fraction: float = 0.5,
) -> torch.Tensor:
    """The support features at the feature voxels inside the support mask.

    :param support_features: ``[C, d, h, w]`` features of one support window, or the
        :class:`~spasem.core.backends.Features` object itself (then the mask is mapped with
        the exact cell footprints of its grids).
    :param support_mask: ``[D, H, W]`` mask on the window grid the features were computed from
        (binary, or fractional in [0, 1]).
    :param min_fraction: a feature voxel is a prototype when at least this fraction of its cell
        lies in the mask (area averaging, :func:`mask_fraction_on_features`). When no cell
        reaches it (a structure smaller than a feature cell), the cell(s) with the largest
        fraction are used, so a non-empty mask always gives >= 1 prototype.
    :returns: ``[N_p, C]`` in the order of the feature voxels (C order over d, h, w);
        ``[0, C]`` for an all-zero mask.
    """
    data = support_features if isinstance(support_features, torch.Tensor) else support_features.data
    geometry = None if isinstance(support_features, torch.Tensor) else support_features
    if data.ndim != 4:
        raise ValueError(f"prototypes: expected features [C, d, h, w], got shape {tuple(data.shape)}")
    if support_mask.ndim != 3:
        raise ValueError(f"prototypes: expected a [D, H, W] mask, got shape {tuple(support_mask.shape)}")
    if not 0.0 < min_fraction <= 1.0:
        raise ValueError(f"prototypes: min_fraction must be in (0, 1], got {min_fraction}")
    channels = data.shape[0]
    fraction = mask_fraction_on_features(support_mask.to(data.device), data.shape[1:], geometry)
    keep = fraction >= min_fraction
    top = fraction.max() if fraction.numel() else fraction.new_zeros(())
    if not keep.any() and top > 0:
        keep = fraction >= top
    return data.reshape(channels, -1)[:, keep.reshape(-1)].T.contiguous()


# ------------------------------------------------------------------------------------------
# semantic prior
# ------------------------------------------------------------------------------------------
def _check_semantic_inputs(query_features: torch.Tensor, prototypes: torch.Tensor, tau_s: float, tau_e: float) -> None:
    if query_features.ndim != 4:
        raise ValueError(f"semantic_prior: expected query features [C, d, h, w], got shape {tuple(query_features.shape)}")
    if prototypes.ndim != 2:
        raise ValueError(f"semantic_prior: expected prototypes [N_p, C], got shape {tuple(prototypes.shape)}")
    if prototypes.shape[0] == 0:
        raise ValueError("semantic_prior needs at least one prototype, got N_p = 0")
    if prototypes.shape[1] != query_features.shape[0]:
        raise ValueError(
            f"semantic_prior: prototypes have {prototypes.shape[1]} channels, query features {query_features.shape[0]}"
        )
    if not (tau_s > 0 and tau_e > 0):
        raise ValueError(f"semantic_prior: temperatures must be > 0, got tau_s={tau_s}, tau_e={tau_e}")


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` [n, C] scaled to unit L2 norm (zero rows stay zero). Pre-scaled by the
    largest magnitude, so that no finite input overflows or underflows in the norm."""
    scale = x.abs().amax(dim=1, keepdim=True)
    x = x / torch.where(scale > 0, scale, torch.ones_like(scale))  # a new tensor: divided in place below
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x.div_(torch.where(norm > 0, norm, torch.ones_like(norm)))


def semantic_block_sizes(
    num_voxels: int, num_prototypes: int, memory_budget: int, element_size: int = 4, channels: int = 0
) -> tuple[int, int]:
    """Voxels and prototypes per block of :func:`semantic_prior` so that one block's
    temporaries -- 3 ``[voxels x prototypes]`` arrays and 3 ``[voxels x channels]`` copies of
    the normalised query chunk -- fit in ``memory_budget`` bytes.

    All prototypes in one block when that leaves >= 256 voxels per block (matmuls with fewer
    rows run slower); otherwise blocks of 256 voxels (fewer for a tiny budget) and as many
    prototypes as fit. Never less than 1 x 1.
    """
    elements = max(1, memory_budget // element_size)
    min_voxels = min(_MIN_BLOCK_VOXELS, num_voxels)
    per_voxel_all = _BLOCK_TEMPORARIES * num_prototypes + _QUERY_TEMPORARIES * channels
    if per_voxel_all * min_voxels <= elements:
        return max(1, min(num_voxels, elements // per_voxel_all)), num_prototypes
    voxels = max(1, min(min_voxels, elements // (_BLOCK_TEMPORARIES + _QUERY_TEMPORARIES * channels)))
    spare = elements // voxels - _QUERY_TEMPORARIES * channels
    return voxels, max(1, min(num_prototypes, spare // _BLOCK_TEMPORARIES))


def semantic_prior(
    query_features: torch.Tensor,
    prototypes: torch.Tensor,
    tau_s: float = 0.1,
    tau_e: float = 0.07,
    *,
    memory_budget: int | None = None,
    block_voxels: int | None = None,
    block_prototypes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``P_sim`` and the normalised assignment entropy ``H`` per query feature voxel.

    With ``sim_j`` the cosine similarity of a voxel's feature to prototype ``j``:
    ``S = sum_j softmax_j(sim / tau_s) sim_j``, ``P_sim = clamp((S + 1) / 2, 0, 1)``,
    ``H = -sum_j w_j log w_j / log N_p`` with ``w = softmax(sim / tau_e)`` (``H = 0`` when
    ``N_p = 1``). A voxel with an all-zero feature has ``sim = 0`` everywhere: ``P_sim = 0.5``, ``H = 1``.

    :param query_features: ``[C, d, h, w]`` (L2-normalised here along C).
    :param prototypes: ``[N_p, C]``, ``N_p >= 1`` (L2-normalised here); k supports: concatenated.
    :param tau_s: temperature of the similarity softmax (0.1 in the paper).
    :param tau_e: temperature of the assignment softmax (0.07 in the paper).
    :param memory_budget: bytes for one block's temporaries (default
        :func:`default_memory_budget`: 64 MiB on CPU, 1 GiB on CUDA).
    :param block_voxels: / :param block_prototypes: explicit block sizes (override the budget).
    :returns: ``(P_sim, H)``, each ``[d, h, w]`` in [0, 1], float32 (float64 if an input is
        float64), on the inputs' device.

    Memory: besides inputs and outputs, about ``memory_budget`` plus a normalised ``[C, N_p]``
    copy of the prototypes; the ``[N_p x voxels]`` similarity matrix is never formed (blocks:
    :func:`semantic_block_sizes`). Voxels are processed in chunks; for
    each chunk, prototypes in blocks: one matmul gives ``x = sim / tau_e`` for the block, and
    per voxel the running maximum ``m`` of ``x`` and four running sums are updated:
    ``Z_e = sum exp(x - m)``, ``A_e = sum exp(x - m) (x - m)``, and ``Z_s``, ``A_s`` the same
    with ``r (x - m)``, ``r = tau_e / tau_s``, for the ``tau_s`` softmax. When ``m`` grows, the
    sums are moved to the new maximum (``Z *= exp(m_old - m_new)``,
    ``A = exp(m_old - m_new) (A + (m_old - m_new) Z)``, with ``r`` for the ``s`` sums). Finally
    ``S = tau_s (r m + A_s / Z_s)`` and ``H log N_p = log Z_e - A_e / Z_e``. Every exponent is
    <= 0, so any temperature works without overflow, and both terms of ``H`` are >= 0 (no
    cancellation).
    """
    _check_semantic_inputs(query_features, prototypes, tau_s, tau_e)
    device = query_features.device
    dtype = _compute_dtype(query_features, prototypes)
    channels = query_features.shape[0]
    spatial = tuple(query_features.shape[1:])
    num_voxels = math.prod(spatial)
    num_prototypes = prototypes.shape[0]
    flat = query_features.reshape(channels, num_voxels)
    protos_t = _unit_rows(prototypes.to(device=device, dtype=dtype)).T.contiguous()  # [C, N_p]

    if memory_budget is None:
        memory_budget = default_memory_budget(device)
    auto_voxels, auto_prototypes = semantic_block_sizes(
        num_voxels, num_prototypes, memory_budget, torch.finfo(dtype).bits // 8, channels
    )
    block_v = max(1, min(num_voxels, block_voxels or auto_voxels))
    block_p = max(1, min(num_prototypes, block_prototypes or auto_prototypes))

    ratio = tau_e / tau_s  # x_s = ratio * x_e
    p_sim = torch.empty(num_voxels, dtype=dtype, device=device)
    entropy = torch.zeros(num_voxels, dtype=dtype, device=device)
    log_n = math.log(num_prototypes)
    x_buf = torch.empty(block_v * block_p, dtype=dtype, device=device)
    e_buf = torch.empty(block_v * block_p, dtype=dtype, device=device)

    for v0 in range(0, num_voxels, block_v):
        v1 = min(num_voxels, v0 + block_v)
        nv = v1 - v0
        # [V_b, C] unit rows, divided by tau_e so that the matmul yields x = sim / tau_e
        q = _unit_rows(flat[:, v0:v1].T.to(dtype)).mul_(1.0 / tau_e)
        m = z_e = a_e = z_s = a_s = None  # running statistics of this chunk, each [V_b]
        for p0 in range(0, num_prototypes, block_p):
            p1 = min(num_prototypes, p0 + block_p)
            x = x_buf[: nv * (p1 - p0)].view(nv, p1 - p0)
            e = e_buf[: nv * (p1 - p0)].view(nv, p1 - p0)
            torch.mm(q, protos_t[:, p0:p1], out=x)
            m_new = x.amax(dim=1) if m is None else torch.maximum(m, x.amax(dim=1))
            x.sub_(m_new[:, None])  # x - m <= 0: exp cannot overflow
            torch.exp(x, out=e)
            block_z_e, block_a_e = e.sum(dim=1), torch.linalg.vecdot(e, x, dim=1)
            torch.mul(x, ratio, out=e).exp_()
            block_z_s, block_a_s = e.sum(dim=1), torch.linalg.vecdot(e, x, dim=1).mul_(ratio)
            if m is None:
                z_e, a_e, z_s, a_s = block_z_e, block_a_e, block_z_s, block_a_s
            else:  # move the sums to the new maximum, then add the block's
                delta = m - m_new  # <= 0
                scale_e, scale_s = delta.exp(), (delta * ratio).exp()
                a_e = scale_e * (a_e + delta * z_e) + block_a_e
                z_e = scale_e * z_e + block_z_e
                a_s = scale_s * (a_s + (ratio * delta) * z_s) + block_a_s
                z_s = scale_s * z_s + block_z_s
            m = m_new
        # S = tau_s E_{w_s}[x_s] with x_s = ratio x;  H log N = log Z_e - E_{w_e}[x - m]
        p_sim[v0:v1] = (((m * ratio + a_s / z_s) * tau_s + 1.0) * 0.5).clamp_(0.0, 1.0)
        if num_prototypes > 1:
            entropy[v0:v1] = ((torch.log(z_e) - a_e / z_e) / log_n).clamp_(0.0, 1.0)
    return p_sim.reshape(spatial), entropy.reshape(spatial)


def semantic_prior_dense(
    query_features: torch.Tensor,
    prototypes: torch.Tensor,
    tau_s: float = 0.1,
    tau_e: float = 0.07,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference implementation of :func:`semantic_prior` that forms the whole ``[N_p x voxels]``
    similarity matrix (and softmaxes of it) at once: only for small inputs, tests and benchmarks.
    Same arguments, result and dtype rules."""
    _check_semantic_inputs(query_features, prototypes, tau_s, tau_e)
    dtype = _compute_dtype(query_features, prototypes)
    channels = query_features.shape[0]
    spatial = tuple(query_features.shape[1:])
    q = _unit_rows(query_features.reshape(channels, -1).T.to(dtype))  # [V, C]
    p = _unit_rows(prototypes.to(device=q.device, dtype=dtype))  # [N_p, C]
    sim = p @ q.T  # [N_p, V]
    s = (torch.softmax(sim / tau_s, dim=0) * sim).sum(dim=0)
    p_sim = ((s + 1.0) / 2.0).clamp(0.0, 1.0)
    if p.shape[0] == 1:
        entropy = torch.zeros_like(p_sim)
    else:
        log_w = torch.log_softmax(sim / tau_e, dim=0)
        entropy = (-(log_w.exp() * log_w).sum(dim=0) / math.log(p.shape[0])).clamp(0.0, 1.0)
    return p_sim.reshape(spatial), entropy.reshape(spatial)
