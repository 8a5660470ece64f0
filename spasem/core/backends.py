"""The four kinds of backend, their shared base, and the typed objects that flow between them.

Each kind is a small abstract class with one main method and a nested pydantic ``Config``
(``extra="forbid"``) holding its options. A backend is instantiated by the engine with a
validated config and a :class:`RunContext`.

========================  ===========================================================  =====================
kind                      main method                                                  result
========================  ===========================================================  =====================
:class:`RegistrationBackend`  ``register(support, query)``                             :class:`Transform`
:class:`Encoder`          ``encode(image)`` (image on a window grid)                   :class:`Features`
:class:`Fusion`           ``fuse(p_reg, p_sim, entropy)`` (tensors on one grid)        fused logits tensor
:class:`Decoder`          ``decode(fused_logits, query_features, query_image)``        :class:`Volume` logits
========================  ===========================================================  =====================
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from spasem.core.progress import Progress
from spasem.core.volume import Grid, Volume
from spasem.errors import ConfigError


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """Render a pydantic error as ``field: message`` lines (one per problem)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(part) for part in err.get("loc", ()) if part != "__root__")
        where = f"{prefix}{loc}" if loc else prefix.rstrip(".") or "value"
        msg = err.get("msg", "invalid value")
        if err.get("type") == "extra_forbidden":
            msg = "unknown option"
        lines.append(f"{where}: {msg}")
    return "; ".join(lines)


@dataclass
class RunContext:
    """What every backend may need besides its own options.

    :param device: torch device to compute on ('cpu', 'cuda', 'cuda:1').
    :param seed: seed for anything random.
    :param progress: where to report progress (stderr unless quiet).
    :param mixed_precision: allow fp16/bf16 autocast on CUDA.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    progress: Progress = field(default_factory=lambda: Progress(enabled=False))
    mixed_precision: bool = False

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)


class Backend(ABC):
    """Base of every backend: a registered ``name``, a one-line ``description``, and a
    nested ``Config`` model for its options."""

    #: the name users select it by (``--encoder NAME``)
    name: ClassVar[str] = ""
    #: one line shown by ``spasem plugins``
    description: ClassVar[str] = ""
    #: the kind of backend ('registration', 'encoder', 'fusion', 'decoder'); set by subclasses
    kind: ClassVar[str] = ""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, config: BaseModel | None = None, context: RunContext | None = None):
        self.config = config if config is not None else self.Config()
        self.context = context if context is not None else RunContext()

    @property
    def device(self) -> torch.device:
        return self.context.device

    @classmethod
    def parse_options(cls, options: Mapping[str, Any] | None) -> BaseModel:
        """Validate ``options`` against ``cls.Config``; :class:`ConfigError` names the option."""
        try:
            return cls.Config.model_validate(dict(options or {}))
        except ValidationError as exc:
            raise ConfigError(
                f"{cls.kind} '{cls.name}': " + format_validation_error(exc)
            ) from None


# ------------------------------------------------------------------------------------------
# objects that cross plugin boundaries
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Features:
    """A feature map and where it lies.

    :param data: float tensor ``[C, d, h, w]`` indexed like the volume arrays (``[c, i, j, k]``).
    :param grid: physical grid of the feature voxels (usually a coarser version of ``window``).
    :param window: grid of the image the features were computed from.
    """

    data: torch.Tensor
    grid: Grid
    window: Grid

    def __post_init__(self) -> None:
        if self.data.ndim != 4:
            raise ValueError(f"features must be [C, d, h, w], got shape {tuple(self.data.shape)}")
        if tuple(self.data.shape[1:]) != self.grid.shape:
            raise ValueError(f"feature shape {tuple(self.data.shape[1:])} does not match its grid {self.grid.shape}")

    @property
    def channels(self) -> int:
        return int(self.data.shape[0])


class Transform(ABC):
    """A spatial transform in physical (LPS, mm) space, from the query's frame to the support's:
    ``T(x_query) = x_support``. Warping a support volume with it puts it on the query."""

    @abstractmethod
    def warp(self, volume: Volume, onto: Grid) -> Volume:
        """Resample ``volume`` (in the support's frame) onto ``onto`` (in the query's frame).

        Labels are warped nearest-neighbour (result ``is_label``); images and probability maps
        linearly, zero outside ``volume``'s field of view.
        """


class SitkTransform(Transform):
    """A :class:`Transform` backed by a ``SimpleITK.Transform`` (query point -> support point)."""

    def __init__(self, transform):
        self.sitk_transform = transform

    def warp(self, volume: Volume, onto: Grid) -> Volume:
        from spasem.core.resample import resample

        return resample(volume, onto, transform=self.sitk_transform)


# ------------------------------------------------------------------------------------------
# the four kinds
# ------------------------------------------------------------------------------------------
class RegistrationBackend(Backend):
    """Aligns a support image to a query image."""

    kind = "registration"

    #: True when :meth:`register` also takes ``support_mask=`` (the support's 0/1 label map on
    #: its image's grid) to refine the alignment around that structure; the engine then passes it.
    #: A backend may make it a property of its configuration: when False, the transform of a
    #: (support, query) pair is the same for every structure and is computed once per pair.
    uses_support_mask: bool = False

    @abstractmethod
    def register(self, support: Volume, query: Volume) -> Transform:
        """Find the transform that maps query points to support points.

        :param support: the annotated image (moving), any grid.
        :param query: the image to segment (fixed), any grid.
        :returns: a :class:`Transform`; ``transform.warp(support_mask, onto=grid)`` must put the
            support's mask on any grid in the query's frame.
        """


class Encoder(Backend):
    """Turns an image window into a feature map (frozen, no training)."""

    kind = "encoder"

    @abstractmethod
    def encode(self, image: Volume) -> Features:
        """Compute features of one window.

        :param image: raw intensities (HU for CT, scanner units for MR) on a window grid
            (canonical RAS orientation, isotropic spacing, usually 128^3 at 1.5 mm); voxels
            outside the scanned field of view hold the scan's minimum. Normalisation (e.g.
            :func:`spasem.core.windows.zscore`) is the encoder's job.
        :returns: :class:`Features` whose ``window`` is ``image.grid``.
        """


class Fusion(Backend):
    """Combines the spatial and the semantic prior into one logit map (point-wise)."""

    kind = "fusion"

    @abstractmethod
    def fuse(self, p_reg: torch.Tensor, p_sim: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        """Fuse the priors voxel by voxel.

        :param p_reg: spatial prior in [0, 1], any shape.
        :param p_sim: semantic prior in [0, 1], same shape.
        :param entropy: normalised prototype-assignment entropy in [0, 1], same shape.
        :returns: fused logits, same shape, finite.
        """


class Decoder(Backend):
    """Turns fused logits (and the query's features) into segmentation logits."""

    kind = "decoder"

    @abstractmethod
    def decode(self, fused_logits: Volume, query_features: Features, query_image: Volume) -> Volume:
        """Decode one window.

        :param fused_logits: float logits on the window grid.
        :param query_features: the encoder's features of this query window.
        :param query_image: the raw query window (same grid as ``fused_logits``).
        :returns: float logits on the window grid (> threshold = inside).
        """

    def postprocess(self, mask: Volume) -> Volume:
        """Clean up the final binary mask (on the query's grid); the default keeps it as is."""
        return mask


KIND_BASES: dict[str, type[Backend]] = {
    "registration": RegistrationBackend,
    "encoder": Encoder,
    "fusion": Fusion,
    "decoder": Decoder,
}


def tensor_to_volume(values: torch.Tensor | np.ndarray, grid: Grid, name: str | None = None) -> Volume:
    """Float map (``grid.shape``) -> float32 :class:`Volume` on ``grid``."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float32).numpy()
    return Volume(np.asarray(values, dtype=np.float32), grid, name=name)


def volume_to_tensor(volume: Volume, device: torch.device | str = "cpu") -> torch.Tensor:
    """A volume's voxels as a float32 tensor ``[i, j, k]`` on ``device``."""
    return torch.as_tensor(np.ascontiguousarray(volume.array, dtype=np.float32), device=device)


class Timer:
    """Accumulates wall-clock seconds per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def time(self, stage: str):
        timer = self

        class _Ctx:
            def __enter__(self_inner):
                self_inner.t0 = time.perf_counter()
                return self_inner

            def __exit__(self_inner, *exc):
                timer.add(stage, time.perf_counter() - self_inner.t0)
                return False

        return _Ctx()


__all__ = [
    "Backend",
    "Decoder",
    "Encoder",
    "Features",
    "Fusion",
    "KIND_BASES",
    "RegistrationBackend",
    "RunContext",
    "SitkTransform",
    "Timer",
    "Transform",
    "format_validation_error",
    "tensor_to_volume",
    "volume_to_tensor",
]
