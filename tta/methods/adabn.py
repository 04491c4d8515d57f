"""AdaBN and its relatives: re-estimate BatchNorm statistics on the test stream (METHODS.md section 1).

Every BatchNorm layer becomes an ``AdaptiveBN`` in the configured mode; weights and affine parameters stay as
trained. ``batch`` is Tent's "norm" baseline (prediction-time BN); ``prior`` blends with the source statistics;
``ema``, ``cumulative`` and ``cumulative_prior`` keep statistics across the batches of a domain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tta.errors import ModelError
from tta.methods.base import AdaptedModel
from tta.norm.adaptive_bn import AdaptiveBN
from tta.norm.convert import batchnorms, replace_batchnorms
from tta.registry import register


@dataclass(frozen=True)
class AdaBNConfig:
    """Settings of ``adabn``; ``prior_n`` is the source pseudo-count N used by the prior modes."""

    mode: Literal["batch", "prior", "ema", "cumulative", "cumulative_prior"] = "batch"
    prior_n: float = 16.0
    momentum: float = 0.1
    exact_prior: bool = False

    def __post_init__(self) -> None:
        if self.prior_n < 0:
            raise ValueError(f"prior_n must be >= 0 (0 = full adaptation, inf = source), got {self.prior_n}")
        if not 0.0 < self.momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {self.momentum}")


def require_batchnorm(model: nn.Module, method: str) -> None:
    """``ModelError`` unless ``model`` has at least one BatchNorm layer with running statistics."""
    bns = batchnorms(model)
    if not bns:
        raise ModelError(f"{method} adapts BatchNorm statistics but the model has no BatchNorm layers; "
                         "use a BN network or a method that adapts LayerNorm/GroupNorm, such as tent")
    if any(bn.running_mean is None for bn in bns):
        raise ModelError(f"{method} needs the source running statistics, but some BatchNorm layers were built "
                         "with track_running_stats=False; load the pretrained model with its running statistics")


@register("adabn")
class AdaBN(AdaptedModel):
    """BatchNorm statistics re-estimation; no parameter is trained."""

    Config = AdaBNConfig

    def check_model(self, model: nn.Module) -> None:
        require_batchnorm(model, "adabn")

    def configure(self, model: nn.Module) -> nn.Module:
        model = super().configure(model)
        cfg = self.config
        replace_batchnorms(model, lambda bn: AdaptiveBN.from_bn(
            bn, mode=cfg.mode, prior_n=cfg.prior_n, momentum=cfg.momentum, exact_prior=cfg.exact_prior))
        return model

    def adapt(self, x: torch.Tensor, domain: torch.Tensor | None) -> torch.Tensor:
        return self.model(x)
