"""spasem: training-free, one-shot, cross-modal 3D medical image segmentation.

Public API::

    import spasem
    support = spasem.load("ct.nii.gz"); mask = spasem.load("liver.nii.gz", is_label=True)
    query = spasem.load("mr.nii.gz")
    result = spasem.segment([(support, mask)], query, {"fusion": "entropy_gate"})
    spasem.save(result.mask, "pred.nii.gz")
"""

from __future__ import annotations

__version__ = "0.1.0"

from spasem.core.config import PipelineConfig, build_config
from spasem.core.io import load, save
from spasem.core.pipeline import SegmentationResult, Support, segment
from spasem.core.volume import Grid, Volume
from spasem.errors import SpasemError
from spasem.hookspecs import hookimpl


def get_registration(name: str, **options):
    """Instantiate registration backend ``name`` with ``options``."""
    from spasem.core.registry import get_registry

    return get_registry().create("registration", name, options)


def get_encoder(name: str, **options):
    """Instantiate encoder ``name`` with ``options``."""
    from spasem.core.registry import get_registry

    return get_registry().create("encoder", name, options)


def get_fusion(name: str, **options):
    """Instantiate fusion strategy ``name`` with ``options``."""
    from spasem.core.registry import get_registry

    return get_registry().create("fusion", name, options)


def get_decoder(name: str, **options):
    """Instantiate decoder ``name`` with ``options``."""
    from spasem.core.registry import get_registry

    return get_registry().create("decoder", name, options)


__all__ = [
    "Grid",
    "PipelineConfig",
    "SegmentationResult",
    "SpasemError",
    "Support",
    "Volume",
    "__version__",
    "build_config",
    "get_decoder",
    "get_encoder",
    "get_fusion",
    "get_registration",
    "hookimpl",
    "load",
    "save",
    "segment",
]
