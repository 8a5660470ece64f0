"""The paper's entropy gate and its three ablations.

* ``entropy_gate``: ``W_sim = 1 - H``, ``W_reg = P_reg (P_sim + eps)``,
  ``L = W_reg logit(P_reg) + W_sim logit(P_sim)``;
* ``mean``: ``(logit(P_reg) + logit(P_sim)) / 2``;
* ``spatial_only``: ``logit(P_reg)``;  ``semantic_only``: ``logit(P_sim)``.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from spasem.core.backends import Fusion
from spasem.core.priors import logit
from spasem.hookspecs import hookimpl


class _LogitConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    logit_eps: float = Field(1e-6, gt=0, lt=0.5, description="probabilities are clamped to [eps, 1-eps] before the logit")


class EntropyGateFusion(Fusion):
    """Uncertainty-aware fusion of the paper (entropy-gated semantic term)."""

    name = "entropy_gate"
    description = "the paper's fusion: W_reg*logit(P_reg) + (1-H)*logit(P_sim), W_reg = P_reg*(P_sim+eps)"

    class Config(_LogitConfig):
        eps: float = Field(1e-6, ge=0, description="added to P_sim in W_reg = P_reg * (P_sim + eps)")

    def fuse(self, p_reg: torch.Tensor, p_sim: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        w_sim = 1.0 - entropy
        w_reg = p_reg * (p_sim + self.config.eps)
        return w_reg * logit(p_reg, self.config.logit_eps) + w_sim * logit(p_sim, self.config.logit_eps)


class MeanFusion(Fusion):
    """Ablation: the mean of both logits."""

    name = "mean"
    description = "ablation: (logit(P_reg) + logit(P_sim)) / 2"
    Config = _LogitConfig

    def fuse(self, p_reg: torch.Tensor, p_sim: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        return 0.5 * (logit(p_reg, self.config.logit_eps) + logit(p_sim, self.config.logit_eps))


class SpatialOnlyFusion(Fusion):
    """Ablation: the spatial prior alone."""

    name = "spatial_only"
    description = "ablation: logit(P_reg) (registration only)"
    Config = _LogitConfig

    def fuse(self, p_reg: torch.Tensor, p_sim: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        return logit(p_reg, self.config.logit_eps)


class SemanticOnlyFusion(Fusion):
    """Ablation: the semantic prior alone."""

    name = "semantic_only"
    description = "ablation: logit(P_sim) (prototype similarity only)"
    Config = _LogitConfig

    def fuse(self, p_reg: torch.Tensor, p_sim: torch.Tensor, entropy: torch.Tensor) -> torch.Tensor:
        return logit(p_sim, self.config.logit_eps)


@hookimpl
def spasem_register_fusions(register):
    for cls in (EntropyGateFusion, MeanFusion, SpatialOnlyFusion, SemanticOnlyFusion):
        register(cls)
