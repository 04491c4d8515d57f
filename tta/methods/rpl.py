"""RPL: robust pseudo-labelling with the generalised cross-entropy (Rusak et al., TMLR 2022).

As the reference benchmark runs it: BatchNorm layers normalise with batch statistics, the affine parameters of
BatchNorm/LayerNorm/GroupNorm train (Adam 1e-3 on CIFAR-10-C), and each batch takes one step on the mean
generalised cross-entropy ``(1 - p_y^q) / q`` of every prediction against its own argmax ``y`` (``q`` 0.8): a
pseudo-label loss that, unlike the cross-entropy, gives confidently wrong labels a bounded gradient. The returned
logits are those computed before the update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from tta.core.base import AdaptedModel, StepOutput
from tta.core.params import OptimizerConfig, check_norm_affine, norm_affine_params
from tta.core.reliable import eval_with_batch_statistics
from tta.core.validate import check_range
from tta.registry import register


@dataclass(frozen=True)
class RPLConfig(OptimizerConfig):
    """Settings of ``rpl`` (defaults: the reference benchmark's CIFAR-10-C configuration, Adam 1e-3, q 0.8)."""

    q: float = 0.8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("q", self.q, low=0.0, high=1.0, low_open=True)


def generalized_cross_entropy(logits: torch.Tensor, q: float) -> torch.Tensor:
    """Per-sample ``(1 - p_y^q) / q`` with ``y`` the argmax of ``logits`` (Zhang & Sabuncu 2018)."""
    probs = logits.softmax(1)
    p_label = probs.gather(1, probs.argmax(1, keepdim=True)).squeeze(1)
    return (1 - p_label ** q) / q


@register("rpl")
class RPL(AdaptedModel):
    """Generalised cross-entropy against the model's own hard pseudo-labels, on norm affine parameters."""

    Config = RPLConfig
    update = "gradient"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The reference benchmark's ImageNet-C settings (ResNet-50, batch 64).
        "imagenet": {"optimizer": "sgd", "lr": 5e-4, "momentum": 0.9, "nesterov": True}}

    def check_model(self, model: nn.Module) -> None:
        check_norm_affine(model, self.name)

    def configure(self, model: nn.Module) -> nn.Module:
        return eval_with_batch_statistics(model, norm_affine_params(model))

    def params(self) -> list[nn.Parameter]:
        return norm_affine_params(self.model)

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        logits = self.model(x)
        gce = generalized_cross_entropy(logits, self.config.q)
        return StepOutput(logits.detach(), gce.mean(), diagnostics={"gce": gce.detach().mean()})
