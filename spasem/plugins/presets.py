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

#: the method of the paper: foundation-model registration (multiGradICON across modalities,
#: uniGradICON within one), SAM-Med3D features, entropy-gated fusion, SAM-Med3D decoding
PAPER = {
    "registration": {"name": "gradicon", "options": {"model": "auto"}},
    "encoder": {"name": "sam-med3d"},
    "fusion": {"name": "entropy_gate"},
    "decoder": {"name": "sam-med3d"},
    "window": {"size": [128, 128, 128], "spacing_mm": 1.5},
    "priors": PAPER_PRIORS,
}


@hookimpl
def spasem_register_presets(register):
    register("basic", BASIC, "weight-free baseline: centre alignment + multi-scale intensity features (same modality)")
    register("classical", CLASSICAL,
             "weight-free, cross-modal (the default): SimpleITK MI registration, MIND + query intensity features, "
             "query-adaptive contrastive semantic prior, entropy gate, largest component")
    register("paper", PAPER, "the paper's method: multi/uniGradICON + SAM-Med3D features + entropy gate + SAM-Med3D "
             "decoder (needs weights: `spasem weights fetch all`)")
