"""``sam-med3d``: SAM-Med3D's prompt encoder + mask decoder, prompted with the fused logits.

Per query window (128^3 at 1.5 mm): the fused logits, clipped to ``[-prompt_clip, prompt_clip]``
and averaged over 4^3 blocks, become the dense mask prompt ``[1, 1, 32, 32, 32]`` (the size
the prompt encoder expects: 4x the 8^3 embedding grid); no points, no boxes (mask-only
prompting, the way SAM-Med3D is fed its own previous low-resolution logits). The mask decoder
runs on the query's image embedding (from the ``sam-med3d`` encoder); its 32^3 logits are
upsampled trilinearly (``align_corners=False``, as the official inference) to the window and
returned as logits; the engine merges windows and thresholds at ``threshold`` (0, i.e.
sigmoid > 0.5).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from spasem.core.backends import Decoder, Features
from spasem.core.volume import Volume
from spasem.errors import ConfigError
from spasem.hookspecs import hookimpl
from spasem.plugins.encoders.sam_med3d import SamMed3DOptions, SharedSamMed3DModel

EMBEDDING_CHANNELS = 384
EMBEDDING_GRID = (8, 8, 8)


class SamMed3DDecoder(SharedSamMed3DModel, Decoder):
    """SAM-Med3D mask decoder with the fused logits as dense mask prompt."""

    name = "sam-med3d"
    description = "SAM-Med3D prompt encoder + mask decoder, fused logits as dense mask prompt (weights: sam-med3d-turbo)"

    class Config(SamMed3DOptions):
        prompt_clip: float | None = Field(
            20.0, gt=0, description="clip the fused logits to [-clip, clip] before prompting (None: no clipping)"
        )

    def decode(self, fused_logits: Volume, query_features: Features, query_image: Volume) -> Volume:
        from spasem.models.sam_med3d import autocast_context, decode_dense_prompt, window_prompt

        data = query_features.data
        if data.shape[0] != EMBEDDING_CHANNELS or tuple(data.shape[1:]) != EMBEDDING_GRID:
            raise ConfigError(
                f"decoder 'sam-med3d' needs the 'sam-med3d' encoder's image embedding ({EMBEDDING_CHANNELS} channels "
                f"on an 8x8x8 grid); got {data.shape[0]} channels on {'x'.join(map(str, data.shape[1:]))}: "
                "use --encoder sam-med3d (or the 'paper' preset)"
            )
        logits = torch.as_tensor(np.asarray(fused_logits.array, dtype=np.float32), device=self.device)
        prompt = window_prompt(logits, self.config.prompt_clip)
        embedding = data.to(self.device, torch.float32)[None]
        with torch.no_grad(), autocast_context(self.device, self.context.mixed_precision):
            low_res = decode_dense_prompt(self.model, embedding, prompt)
        upsampled = F.interpolate(low_res.to(torch.float32), size=fused_logits.shape, mode="trilinear", align_corners=False)
        return Volume(upsampled[0, 0].cpu().numpy(), fused_logits.grid, name="sam-med3d logits")


@hookimpl
def spasem_register_decoders(register):
    register(SamMed3DDecoder)
