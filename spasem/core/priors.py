"""The spatial and semantic priors (the method's context priors) as plain tensor functions.

Shapes: volumes are ``[D, H, W]`` (= ``[i, j, k]`` of a window grid), feature maps ``[C, d, h, w]``,
prototypes ``[N_p, C]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def logit(p: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``log(p / (1 - p))`` with ``p`` clamped to ``[eps, 1 - eps]`` (finite for any p in [0, 1])."""
    p = p.clamp(eps, 1.0 - eps)
    return torch.log(p) - torch.log1p(-p)


def _gaussian_kernel1d(sigma: float, truncate: float = 4.0, dtype=torch.float32, device=None) -> torch.Tensor:
    radius = max(1, int(math.ceil(truncate * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_smooth(volume: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable 3D Gaussian smoothing of ``[D, H, W]`` with zero padding outside the volume;
    ``sigma`` in voxels, kernel truncated at ``truncate * sigma`` (>= 3)."""
    if sigma <= 0:
        return volume.clone()
    x = volume[None, None].to(torch.float32)
    k = _gaussian_kernel1d(sigma, truncate, x.dtype, x.device)
    r = (k.numel() - 1) // 2
    x = F.conv3d(x, k.view(1, 1, -1, 1, 1), padding=(r, 0, 0))
    x = F.conv3d(x, k.view(1, 1, 1, -1, 1), padding=(0, r, 0))
    x = F.conv3d(x, k.view(1, 1, 1, 1, -1), padding=(0, 0, r))
    return x[0, 0]


def spatial_prior(warped_mask: torch.Tensor, sigma: float = 2.0) -> torch.Tensor:
    """``P_reg``: the warped support mask ``[D, H, W]`` smoothed by a 3D Gaussian (``sigma`` in
    voxels of its grid, zero padding, kernel truncated at 4 sigma), divided by its maximum.
    An all-zero mask gives an all-zero prior."""
    smoothed = gaussian_smooth(warped_mask.to(torch.float32), sigma)
    top = smoothed.max()
    if top <= 0:
        return torch.zeros_like(smoothed)
    return (smoothed / top).clamp(0.0, 1.0)


def prototypes(support_features: torch.Tensor, support_mask: torch.Tensor, min_fraction: float = 0.5) -> torch.Tensor:
    """Support features at the feature voxels inside the support mask.

    The mask ``[D, H, W]`` (on the window grid the features were computed from) is brought to
    the feature grid ``[d, h, w]`` by area averaging (fraction of each feature cell inside the
    mask); cells with a fraction >= ``min_fraction`` are prototypes. If none reaches it (a
    structure smaller than a feature cell), the cell(s) with the largest fraction are used.

    :returns: ``[N_p, C]`` (``N_p = 0`` for an empty mask).
    """
    c = support_features.shape[0]
    frac = F.adaptive_avg_pool3d(support_mask[None, None].to(torch.float32), support_features.shape[1:])[0, 0]
    keep = frac >= min_fraction
    if not keep.any() and frac.max() > 0:
        keep = frac >= frac.max() - 1e-6
    return support_features.reshape(c, -1)[:, keep.reshape(-1)].T.contiguous()


def semantic_prior(
    query_features: torch.Tensor,
    prototypes: torch.Tensor,
    tau_s: float = 0.1,
    tau_e: float = 0.07,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``P_sim`` and normalised entropy ``H`` per query feature voxel.

    :param query_features: ``[C, d, h, w]`` (L2-normalised here along C).
    :param prototypes: ``[N_p, C]`` (L2-normalised here), ``N_p >= 1``.
    :returns: ``(P_sim, H)``, each ``[d, h, w]`` in [0, 1]. ``S = sum_j softmax_j(sim/tau_s) sim_j``,
        ``P_sim = clamp((S + 1) / 2, 0, 1)``; ``H = -sum_j w_j log w_j / log N_p`` with
        ``w = softmax(sim / tau_e)`` (0 when ``N_p = 1``).
    """
    c = query_features.shape[0]
    spatial = query_features.shape[1:]
    if prototypes.shape[0] == 0:
        raise ValueError("semantic_prior needs at least one prototype")
    q = F.normalize(query_features.reshape(c, -1).to(torch.float32), dim=0)
    p = F.normalize(prototypes.to(torch.float32), dim=1)
    n_p = p.shape[0]
    p_sim = torch.empty(q.shape[1], dtype=torch.float32, device=q.device)
    entropy = torch.zeros(q.shape[1], dtype=torch.float32, device=q.device)
    chunk = max(1, (1 << 24) // n_p)  # bounded [N_p x chunk] similarity block
    for start in range(0, q.shape[1], chunk):
        sim = p @ q[:, start : start + chunk]  # [N_p, V_chunk]
        weights_s = torch.softmax(sim / tau_s, dim=0)
        s = (weights_s * sim).sum(dim=0)
        p_sim[start : start + chunk] = ((s + 1.0) / 2.0).clamp(0.0, 1.0)
        if n_p > 1:
            log_w = torch.log_softmax(sim / tau_e, dim=0)
            entropy[start : start + chunk] = (-(log_w.exp() * log_w).sum(dim=0) / math.log(n_p)).clamp(0.0, 1.0)
    return p_sim.reshape(spatial), entropy.reshape(spatial)
