"""AdaBN and its relatives: re-estimate BatchNorm statistics on the test stream.

Every BatchNorm layer becomes an ``AdaptiveBN`` in the configured mode; weights and affine parameters stay as
trained. ``batch`` is Tent's "norm" baseline (prediction-time BN); ``prior`` blends with the source statistics
(Schneider et al. 2020, pseudo-count ``prior_n``); ``alpha`` is the reference benchmark's BN-alpha,
(1 - alpha) source + alpha batch statistics; ``ema``, ``cumulative`` and ``cumulative_prior`` keep statistics
across the batches of a domain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.core.base import AdaptedModel, StepOutput
from tta.core.requirements import Requirements
from tta.core.validate import check_range
from tta.norm.adaptive_bn import AdaptiveBN
from tta.norm.convert import replace_batchnorms
from tta.registry import register


@dataclass(frozen=True)
class AdaBNConfig:
    """Settings of ``adabn``: ``prior_n`` is the source pseudo-count of the prior modes, ``alpha`` the batch weight
    of the ``alpha`` mode, ``stats_rate`` the EMA rate of the ``ema`` mode (r <- (1 - rate) r + rate b)."""

    renamed: ClassVar[dict[str, str]] = {"stats_momentum": "stats_rate"}  # old spelling: new one

    mode: Literal["batch", "prior", "alpha", "ema", "cumulative", "cumulative_prior"] = "batch"
    prior_n: float = 16.0
    alpha: float = 0.1
    stats_rate: float = 0.1
    exact_prior: bool = False

    def __post_init__(self) -> None:
        check_range("prior_n", self.prior_n, low=0.0, allow_inf=True)
        check_range("alpha", self.alpha, low=0.0, high=1.0)
        check_range("stats_rate", self.stats_rate, low=0.0, high=1.0, low_open=True)


@register("adabn")
class AdaBN(AdaptedModel):
    """BatchNorm statistics re-estimation (batch, source prior, BN-alpha, EMA, cumulative); no parameter trains."""

    Config = AdaBNConfig
    requires = Requirements(norm_layers=(_BatchNorm,), running_stats=True)
    presets: ClassVar[dict[str, dict[str, Any]]] = {"bn-alpha": {"mode": "alpha", "alpha": 0.1}}

    def configure(self, model: nn.Module) -> nn.Module:
        model = super().configure(model)
        cfg = self.config
        replace_batchnorms(model, lambda bn: AdaptiveBN.from_bn(
            bn, mode=cfg.mode, prior_n=cfg.prior_n, momentum=cfg.stats_rate, exact_prior=cfg.exact_prior,
            alpha=cfg.alpha))
        return model

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        return StepOutput(self.model(x))
