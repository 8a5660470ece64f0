"""``intensity``: a weight-free multi-scale intensity descriptor.

Channels: the z-scored window smoothed at several Gaussian scales, and gradient magnitudes at
the same scales; averaged over ``stride``^3 blocks. Useful within one modality only (it compares
intensities); the ``mind`` encoder is the cross-modal weight-free choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from spasem.core.backends import Encoder, Features
from spasem.core.priors import gaussian_smooth
from spasem.core.volume import Volume
from spasem.core.windows import zscore
from spasem.hookspecs import hookimpl


class IntensityEncoder(Encoder):
    """Multi-scale smoothed intensities and gradient magnitudes (weight-free, single-modality)."""

    name = "intensity"
    description = "multi-scale smoothed intensity + gradient magnitude (weight-free; same-modality only)"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        scales: tuple[float, ...] = Field((1.0, 2.0, 4.0), description="Gaussian sigmas in window voxels")
        stride: int = Field(2, ge=1, le=16, description="feature voxel = stride^3 window voxels")

    def encode(self, image: Volume) -> Features:
        x = torch.as_tensor(zscore(image.array.astype("float32")), device=self.device)
        channels = []
        for sigma in self.config.scales:
            smooth = gaussian_smooth(x, sigma)
            gi, gj, gk = torch.gradient(smooth)
            channels.append(smooth)
            channels.append(torch.sqrt(gi**2 + gj**2 + gk**2))
        data = torch.stack(channels)
        s = self.config.stride
        if s > 1:
            data = F.avg_pool3d(data[None], kernel_size=s, stride=s, ceil_mode=True)[0]
        return Features(data, image.grid.scaled(s), image.grid)


@hookimpl
def spasem_register_encoders(register):
    register(IntensityEncoder)
