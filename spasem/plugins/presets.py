"""Built-in presets (``spasem run --preset NAME``)."""

from __future__ import annotations

from spasem.core.config import CLASSICAL, PAPER_PRIORS
from spasem.hookspecs import hookimpl

BASIC = {
    "registration": {"name": "centers"},
    "encoder": {"name": "intensity"},
    "fusion": {"name": "entropy_gate"},
    "decoder": {"name": "threshold"},
    "priors": PAPER_PRIORS,
}


@hookimpl
def spasem_register_presets(register):
    register("basic", BASIC, "weight-free baseline: centre alignment + multi-scale intensity features (same modality)")
    register("classical", CLASSICAL,
             "weight-free, cross-modal (the default): SimpleITK MI registration, MIND + query intensity features, "
             "query-adaptive contrastive semantic prior, entropy gate, largest component")
