"""Built-in presets (``spasem run --preset NAME``)."""

from __future__ import annotations

from spasem.hookspecs import hookimpl

BASIC = {
    "registration": {"name": "centers"},
    "encoder": {"name": "intensity"},
    "fusion": {"name": "entropy_gate"},
    "decoder": {"name": "threshold"},
}


@hookimpl
def spasem_register_presets(register):
    register("basic", BASIC, "weight-free baseline: centre alignment + multi-scale intensity features (same modality)")
