"""Tent: test-time entropy minimisation on the affine parameters of norm layers (Wang et al., ICLR 2021).

As the official code: BatchNorm layers always use batch statistics (running statistics dropped), only the affine
parameters of BatchNorm/LayerNorm/GroupNorm train, one Adam step per batch on the mean softmax entropy, and the
returned logits are those computed before the update. ``model_mode: eval`` keeps the rest of the model (dropout) in
eval mode while BatchNorm still normalises with batch statistics. ``norm: unmix-tns`` first replaces the BatchNorm
layers by UnMix-TNS layers (``tta.norm.unmix_tns``), whose affine parameters then train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from tta.core.base import AdaptedModel, StepOutput
from tta.core.losses import entropy_objective
from tta.core.params import (
    IMAGENET_SGD,
    VIT_SGD,
    OptimizerConfig,
    check_norm_affine,
    force_batch_statistics,
    norm_affine_params,
    train_only,
)
from tta.norm.unmix_tns import NormChoice, apply_norm
from tta.registry import register


@dataclass(frozen=True)
class TentConfig(NormChoice, OptimizerConfig):
    """Settings of ``tent``: the optimiser's, the normalisation layers (``norm``) and the mode the rest of the
    model runs in."""

    model_mode: Literal["train", "eval"] = "train"


@register("tent")
class Tent(AdaptedModel):
    """Entropy minimisation on norm affine parameters, batch statistics forced in every BatchNorm."""

    Config = TentConfig
    update = "gradient"
    presets: ClassVar[dict[str, dict[str, Any]]] = {"imagenet": IMAGENET_SGD, "vit": VIT_SGD}

    def check_model(self, model: nn.Module) -> None:
        check_norm_affine(model, self.name)

    def configure(self, model: nn.Module) -> nn.Module:
        model = apply_norm(model, self.config, self.name)
        model.train(self.config.model_mode == "train")
        force_batch_statistics(model)
        train_only(model, norm_affine_params(model))
        return model

    def params(self) -> list[nn.Parameter]:
        return norm_affine_params(self.model)

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        return entropy_objective(self.model(x))
