"""The paper's entropy gate and its three ablations (point-wise, any shape, any device).

* ``entropy_gate``: ``W_sim = 1 - H``, ``W_reg = P_reg (P_sim + eps)``,
  ``L = W_reg logit(P_reg) + W_sim logit(P_sim)``;
* ``mean``: ``(logit(P_reg) + logit(P_sim)) / 2``;
* ``spatial_only``: ``logit(P_reg)``;  ``semantic_only``: ``logit(P_sim)``.

Every logit clamps its probability to ``[logit_eps, 1 - logit_eps]`` (:func:`spasem.core.priors.logit`),
so the output is finite for inputs in [0, 1]. The priors' own parameters (sigma, tau_s, tau_e)
are fields of ``PriorsConfig`` (``priors.sigma`` etc.), since they act before fusion.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from spasem.core.backends import Fusion
from spasem.core.priors import logit
from spasem.hookspecs import hookimpl


def _check_same_shape(p_reg: torch.Tensor, p_sim: torch.Tensor, entropy: torch.Tensor, name: str) -> None:
    if not (p_reg.shape == p_sim.shape == entropy.shape):
        raise ValueError(
            f"fusion '{name}': p_reg, p_sim and entropy must have one shape, got "
            f"{tuple(p_reg.shape)}, {tuple(p_sim.shape)}, {tuple(entropy.shape)}"
        )


class _LogitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    logit_eps: float = Field(1e-6, gt=0, lt=0.5, description="probabilities are clamped to [eps, 1-eps] before the logit")


class EntropyGateFusion(Fusion):
    """Uncertainty-aware fusion of the paper (entropy-gated semantic term).

    Where ``H = 1`` (prototype assignment uniform) the semantic term vanishes and
    ``L = W_reg logit(P_reg)``. ``L`` is non-decreasing in ``P_sim`` (other inputs fixed)
    exactly where ``P_reg logit(P_reg) >= 0``, i.e. ``P_reg = 0`` or ``P_reg >= 0.5``: then both
    ``dL/dP_sim = P_reg logit(P_reg) + (1 - H) / (P_sim (1 - P_sim))`` terms are >= 0. For
    ``0 < P_reg < 0.5`` the first term is negative: ``L`` decreases in ``P_sim`` where the logit of
    ``P_sim`` is clamped (``P_sim < logit_eps`` or ``> 1 - logit_eps``), and also around
    ``P_sim = 0.5`` when ``4 (1 - H) < -P_reg logit(P_reg)`` (e.g. ``H = 1``).
    """

    name = "entropy_gate"
    description = "the paper's fusion: W_reg*logit(P_reg) + (1-H)*logit(P_sim), W_reg = P_reg*(P_sim+eps)"

    class Config(_LogitConfig):
        eps: float = Field(1e-6, ge=0, description="added to P_sim in W_reg = P_reg * (P_sim + eps)")

    def fuse(self, p_reg: torch.Tensor, p_sim: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        _check_same_shape(p_reg, p_sim, entropy, self.name)
        w_sim = 1.0 - entropy
        w_reg = p_reg * (p_sim + self.config.eps)
        return w_reg * logit(p_reg, self.config.logit_eps) + w_sim * logit(p_sim, self.config.logit_eps)


class MeanFusion(Fusion):
    """Ablation: the mean of both logits."""

    name = "mean"
    description = "ablation: (logit(P_reg) + logit(P_sim)) / 2"
    Config = _LogitConfig

    def fuse(self, p_reg: torch.Tensor, p_sim: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        _check_same_shape(p_reg, p_sim, entropy, self.name)
        return 0.5 * (logit(p_reg, self.config.logit_eps) + logit(p_sim, self.config.logit_eps))


class SpatialOnlyFusion(Fusion):
    """Ablation: the spatial prior alone."""

    name = "spatial_only"
    description = "ablation: logit(P_reg) (registration only)"
    Config = _LogitConfig

    def fuse(self, p_reg: torch.Tensor, p_sim: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        _check_same_shape(p_reg, p_sim, entropy, self.name)
        return logit(p_reg, self.config.logit_eps)


class SemanticOnlyFusion(Fusion):
    """Ablation: the semantic prior alone."""

    name = "semantic_only"
    description = "ablation: logit(P_sim) (prototype similarity only)"
    Config = _LogitConfig

    def fuse(self, p_reg: torch.Tensor, p_sim: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        _check_same_shape(p_reg, p_sim, entropy, self.name)
        return logit(p_sim, self.config.logit_eps)


@hookimpl
def spasem_register_fusions(register):
    for cls in (EntropyGateFusion, MeanFusion, SpatialOnlyFusion, SemanticOnlyFusion):
        register(cls)
