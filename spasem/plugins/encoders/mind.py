"""``mind``: a weight-free, modality-independent descriptor (MIND-SSC) computed in torch.

MIND-SSC (Heinrich et al., MICCAI 2013, "self-similarity context"): for every voxel ``x`` and each
of the 12 pairs ``(a, b)`` of its 6-neighbourhood at distance ``d`` whose offsets are orthogonal,

    D_ab(x) = G_sigma * (I(x + a) - I(x + b))^2        (patch distance, Gaussian patch of sigma voxels)
    V(x)    = mean_ab D_ab(x)                            (local noise/contrast estimate, clamped)
    MIND_ab(x) = exp(-D_ab(x) / V(x))

The descriptor depends on which neighbours look alike, not on the intensities themselves, so a CT
and an MR of the same anatomy give similar descriptors. It is computed at several neighbour
distances (``dilations``, window voxels) and concatenated.

Options beyond MIND:

* ``standardize``: subtract each MIND channel's mean over the window and divide by its standard
  deviation, so cosine similarities are centred (raw MIND values are all positive, which makes
  every cosine similarity close to 1);
* ``intensity_bins`` > 0 adds, per smoothing sigma in ``intensity_scales``, a soft histogram
  embedding of the window's robustly normalised intensity (``(x - median) / IQR``):
  ``phi_k(t) = exp(-(t - c_k)^2 / (2 w^2))`` for ``intensity_bins`` centres ``c_k`` evenly spread
  over ``intensity_range`` (``w`` = their spacing). The cosine similarity of two embeddings is then
  a Gaussian kernel of their intensity difference, which the cosine of raw intensities is not.
  These channels are **modality-specific**: meaningful between voxels of one scan (query-adaptive
  prototypes, ``priors.query_prototypes``) or of one modality, not across modalities.

Each block (the MIND channels, each intensity embedding) is scaled to unit L2 norm per voxel and
weighted (``mind_weight``, ``intensity_weight``), so the cosine similarity of two feature vectors
is the weighted mean of the blocks' cosine similarities.

The window is first block-averaged by ``resolution`` (2: 3 mm voxels for the 1.5 mm windows; MIND
costs 12 patch distances per dilation, so this divides its cost by 8), the descriptor computed
there, then averaged over ``stride``^3 blocks: the feature grid is
``image.grid.scaled(resolution * stride)``. Dilations and sigmas are in voxels of that coarser grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from spasem.core.backends import Encoder, Features
from spasem.core.priors import gaussian_smooth
from spasem.core.volume import Volume
from spasem.errors import ConfigError
from spasem.hookspecs import hookimpl

#: the 6-neighbourhood as unit offsets (i, j, k)
_SIX = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))
#: the 12 pairs of orthogonal 6-neighbours (the edges of the octahedron they span)
SSC_PAIRS: tuple[tuple[int, int], ...] = tuple(
    (a, b) for a in range(6) for b in range(a + 1, 6) if sum(x * y for x, y in zip(_SIX[a], _SIX[b])) == 0
)


def _shift(x: torch.Tensor, offset: tuple[int, int, int]) -> torch.Tensor:
    """``y[p] = x[p + offset]`` with edge replication, ``x`` ``[D, H, W]``."""
    pad = max(abs(o) for o in offset)
    if pad == 0:
        return x
    padded = F.pad(x[None, None], (pad,) * 6, mode="replicate")[0, 0]
    d, h, w = x.shape
    i, j, k = (pad + o for o in offset)
    return padded[i : i + d, j : j + h, k : k + w]


def mind_ssc(image: torch.Tensor, dilation: int = 2, sigma: float = 0.8, eps: float = 1e-6) -> torch.Tensor:
    """MIND-SSC descriptor ``[12, D, H, W]`` of a 3D image ``[D, H, W]`` (float).

    :param dilation: distance of the 6 neighbours (voxels).
    :param sigma: Gaussian patch size (voxels) of the patch distances.
    :returns: values in (0, 1], each voxel's largest channel equal to 1.
    """
    x = image.to(torch.float32)
    neighbours = [_shift(x, tuple(dilation * o for o in off)) for off in _SIX]  # type: ignore[misc]
    distances = torch.stack([gaussian_smooth((neighbours[a] - neighbours[b]) ** 2, sigma) for a, b in SSC_PAIRS])
    distances = distances - distances.min(dim=0, keepdim=True).values
    variance = distances.mean(dim=0, keepdim=True)
    mean_var = variance.mean()
    variance = variance.clamp(min=float(mean_var) * 1e-3 + eps, max=float(mean_var) * 1e3 + eps)
    return torch.exp(-distances / variance)


def block_average(data: torch.Tensor, stride: int) -> torch.Tensor:
    """Average ``[C, D, H, W]`` over ``stride``^3 blocks (partial blocks at the far edges)."""
    if stride <= 1:
        return data
    return F.avg_pool3d(data[None], kernel_size=stride, stride=stride, ceil_mode=True)[0]


def robust_normalise(image: torch.Tensor, fill: float | None = None) -> torch.Tensor:
    """``(x - median) / IQR`` over the voxels above ``fill`` (all voxels if too few)."""
    x = image.to(torch.float32)
    sel = x[x > fill] if fill is not None else x.reshape(-1)
    if sel.numel() < 64:
        sel = x.reshape(-1)
    if sel.numel() > 1_000_000:
        sel = sel[torch.linspace(0, sel.numel() - 1, 1_000_000, device=sel.device).long()]
    q = torch.quantile(sel, torch.tensor([0.25, 0.5, 0.75], device=sel.device))
    iqr = float(q[2] - q[0])
    return (x - q[1]) / (iqr if iqr > 1e-6 else 1.0)


class MindEncoder(Encoder):
    """MIND-SSC at several neighbour distances (weight-free, modality-independent)."""

    name = "mind"
    description = "weight-free MIND-SSC self-similarity descriptor (modality-independent), torch"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        dilations: tuple[int, ...] = Field((1, 2), description="neighbour distances (voxels of the block-averaged window), one 12-channel block each")
        sigma: float = Field(0.8, gt=0, description="Gaussian patch sigma (voxels of the block-averaged window)")
        presmooth: float = Field(0.5, ge=0, description="Gaussian sigma applied to the block-averaged image first (voxels; 0 = off)")
        resolution: int = Field(2, ge=1, le=8, description="compute on the window block-averaged by this factor (2: 3 mm voxels for 1.5 mm windows)")
        stride: int = Field(1, ge=1, le=16, description="then average features over stride^3 blocks; feature voxel = (resolution * stride)^3 window voxels")
        standardize: bool = Field(True, description="centre and scale each MIND channel over the window")
        mind_weight: float = Field(1.0, ge=0, description="weight of the MIND block (0 = no MIND channels)")
        intensity_bins: int = Field(0, ge=0, le=256, description="soft-histogram bins of the intensity embedding (0 = none)")
        intensity_range: tuple[float, float] = Field((-3.0, 5.0), description="range of the bin centres (robust units)")
        intensity_scales: tuple[float, ...] = Field((1.0,), description="Gaussian sigmas (voxels) of the embedded intensities")
        intensity_weight: float = Field(1.0, ge=0, description="weight of each intensity embedding block")

    def encode(self, image: Volume) -> Features:
        cfg = self.config
        raw = torch.as_tensor(image.array, dtype=torch.float32, device=self.device)
        fill = float(raw.min())
        x = robust_normalise(raw, fill)
        r = cfg.resolution
        if r > 1:
            x = F.avg_pool3d(x[None, None], kernel_size=r, stride=r, ceil_mode=True)[0, 0]
        if cfg.presmooth > 0:
            x = gaussian_smooth(x, cfg.presmooth)
        s = cfg.stride
        blocks = []
        if cfg.mind_weight > 0 and cfg.dilations:
            mind = torch.cat([mind_ssc(x, d, cfg.sigma) for d in cfg.dilations])
            mind = block_average(mind, s)
            if cfg.standardize:
                flat = mind.reshape(mind.shape[0], -1)
                mind = ((flat - flat.mean(dim=1, keepdim=True)) / flat.std(dim=1, keepdim=True).clamp_min(1e-6)).reshape(mind.shape)
            blocks.append(cfg.mind_weight * F.normalize(mind, dim=0))
        if cfg.intensity_bins > 0 and cfg.intensity_weight > 0:
            centres = torch.linspace(*cfg.intensity_range, cfg.intensity_bins, device=x.device)
            width = float(centres[1] - centres[0]) if cfg.intensity_bins > 1 else 1.0
            for sigma in cfg.intensity_scales:
                t = (gaussian_smooth(x, sigma) if sigma > 0 else x).clamp(*cfg.intensity_range)
                embedding = torch.exp(-0.5 * ((t[None] - centres[:, None, None, None]) / width) ** 2)
                blocks.append(cfg.intensity_weight * F.normalize(block_average(embedding, s) + 1e-6, dim=0))
        if not blocks:
            raise ConfigError("encoder 'mind': no channels (mind_weight is 0 or dilations empty, and no intensity_bins)")
        data = torch.cat(blocks)
        return Features(data.contiguous(), image.grid.scaled(r * s), image.grid)


@hookimpl
def spasem_register_encoders(register):
    register(MindEncoder)
