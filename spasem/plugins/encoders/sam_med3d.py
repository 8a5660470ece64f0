"""``sam-med3d``: the frozen SAM-Med3D(-turbo) image encoder (official pip distribution ``medim``).

Input: a raw-intensity window from the engine (canonical RAS, 1.5 mm, 128^3). Normalisation is
SAM-Med3D's own (``utils/infer_utils.py``): z-score with the mean and unbiased standard
deviation of the window's voxels > 0 (all voxels when none is). Output: the image embedding
``[384, 8, 8, 8]`` (one feature per 16^3 voxels) on ``window.scaled(16)``.

The weights (``sam-med3d-turbo`` by default) are resolved by :mod:`spasem.weights`; the encoder
and the ``sam-med3d`` decoder share one loaded model. ``fast_attention`` (default on) computes
the windowed attention blocks for the real tokens only, with results identical to the module's
(see :mod:`spasem.models.sam_med3d`).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from spasem.core.backends import Encoder, Features
from spasem.core.volume import Volume
from spasem.core.windows import zscore
from spasem.errors import ConfigError
from spasem.hookspecs import hookimpl

WINDOW = 128
PATCH = 16


class SamMed3DOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    checkpoint: str | None = Field(
        None, description="local SAM-Med3D checkpoint (.pth) instead of the cached sam_med3d_turbo.pth"
    )


def normalise_window(values: np.ndarray) -> np.ndarray:
    """SAM-Med3D's input normalisation: z-score of the whole window with the mean and unbiased
    standard deviation of its voxels > 0 (all voxels when none is > 0)."""
    values = np.asarray(values, dtype=np.float32)
    return zscore(values, values > 0)


def load_shared_model(backend, checkpoint: str | None):
    """The SAM-Med3D model for a backend: weights resolved (downloaded if allowed), loaded once
    per process and device."""
    from spasem import weights
    from spasem.models.sam_med3d import WEIGHTS_NAME, cached_model, is_cached

    path = weights.resolve(WEIGHTS_NAME, checkpoint, progress=backend.context.progress.enabled)
    if is_cached(path, backend.device):
        return cached_model(path, backend.device)
    with backend.context.progress.stage(f"loading SAM-Med3D ({path.name})"):
        return cached_model(path, backend.device)


class SharedSamMed3DModel:
    """Mixin for the SAM-Med3D encoder and decoder: the model is loaded on first use and shared
    by every backend on the same checkpoint and device."""

    def __init__(self, config=None, context=None):
        super().__init__(config, context)
        self._model = None

    @property
    def model(self):
        if self._model is None:
            self._model = load_shared_model(self, self.config.checkpoint)
        return self._model


class SamMed3DEncoder(SharedSamMed3DModel, Encoder):
    """Frozen SAM-Med3D ViT-B image encoder: 128^3 window -> 384 x 8^3 embedding."""

    name = "sam-med3d"
    description = "SAM-Med3D(-turbo) ViT image encoder: 128^3 window at 1.5 mm -> 384 x 8^3 (weights: sam-med3d-turbo)"

    class Config(SamMed3DOptions):
        fast_attention: bool = Field(
            True, description="compute windowed attention for the real tokens only (same result, ~4x faster on CPU)"
        )

    def encode(self, image: Volume) -> Features:
        from spasem.models.sam_med3d import autocast_context, encoder_forward

        if image.shape != (WINDOW, WINDOW, WINDOW):
            raise ConfigError(
                f"encoder 'sam-med3d' needs {WINDOW}^3 windows (its positional embedding is fixed); got "
                f"{'x'.join(map(str, image.shape))}: set window.size={WINDOW}"
            )
        normalised = normalise_window(image.array)
        x = torch.from_numpy(np.ascontiguousarray(normalised))[None, None].to(self.device)
        with torch.no_grad(), autocast_context(self.device, self.context.mixed_precision):
            embedding = encoder_forward(self.model.image_encoder, x, fast=self.config.fast_attention)
        return Features(embedding[0].to(torch.float32), image.grid.scaled(PATCH), image.grid)


@hookimpl
def spasem_register_encoders(register):
    register(SamMed3DEncoder)
