"""SHOT-IM: SHOT's information maximisation without source data (Liang et al., ICML 2020), online.

The classifier head (the last linear layer) stays frozen, as SHOT's hypothesis transfer; the feature extractor
adapts by one gradient step per batch on the information maximisation loss

    L = mean_i H(p_i) - diversity_weight * H(mean_i p_i),   H(p) = -sum_c p_c log(p_c + epsilon),

the mean entropy of the predictions (confident predictions) minus the entropy of the batch's mean prediction
(diverse predictions: the term is largest when the mean prediction is uniform over the classes, and stops the
collapse onto one class that entropy minimisation alone invites). The returned logits are those computed before
the update. BatchNorm layers always normalise with the statistics of the current batch; the rest of the model runs
in eval mode (dropout off).

Defaults are those of the online SHOT-IM that test-time adaptation benchmarks run (MotasemAlfarra/
Online_Test_Time_Adaptation, after fiveai/LAME): SGD, lr 0.01, momentum 0.9, ``epsilon`` 1e-5, the norm layers'
affine parameters adapted (``params: norm``; that code builds its optimiser on the BatchNorm affine parameters
whichever way it configures the model). ``params: features`` adapts every parameter but the head's, as the
original offline SHOT does. Neither code has a separate CIFAR-10-C configuration, so there is no preset.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tta.core.base import AdaptedModel, StepOutput
from tta.core.params import OptimizerConfig, check_norm_affine, force_batch_statistics, norm_affine_params, train_only
from tta.core.validate import check_range
from tta.errors import ModelError
from tta.registry import register


@dataclass(frozen=True)
class ShotIMConfig(OptimizerConfig):
    """Settings of ``shot-im``: the optimiser's (SGD 0.01, momentum 0.9), which parameters adapt (``norm``: the
    norm layers' affine; ``features``: everything but the classifier head), the weight of the diversity term and
    the ``epsilon`` inside the logarithms."""

    optimizer: Literal["adam", "adamw", "sgd"] = "sgd"
    lr: float = 0.01
    params: Literal["norm", "features"] = "norm"
    diversity_weight: float = 1.0
    epsilon: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("diversity_weight", self.diversity_weight, low=0.0)
        check_range("epsilon", self.epsilon, low=0.0, high=1.0)


def information_maximization(logits: torch.Tensor, epsilon: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """SHOT's two terms for a batch of ``logits``: the mean entropy of the predictions and the entropy of the mean
    prediction (the diversity, at most ln C, reached when the mean prediction is uniform)."""
    probs = logits.softmax(1)
    mean = probs.mean(0)
    conditional = -(probs * torch.log(probs + epsilon)).sum(1).mean(0)
    diversity = -(mean * torch.log(mean + epsilon)).sum()
    return conditional, diversity


def _head(model: nn.Module) -> nn.Linear | None:
    """The classifier head: the last linear layer in module order."""
    return next((m for m in reversed(list(model.modules())) if isinstance(m, nn.Linear)), None)


def feature_params(model: nn.Module) -> list[nn.Parameter]:
    """Every floating-point parameter of ``model`` except those of its classifier head, in module order."""
    head = _head(model)
    frozen = set() if head is None else {id(p) for p in head.parameters()}
    return [p for p in model.parameters() if id(p) not in frozen and p.is_floating_point()]


@register("shot-im")
class ShotIM(AdaptedModel):
    """Information maximisation (confident and diverse predictions) with the classifier head frozen."""

    Config = ShotIMConfig
    update = "gradient"

    def check_model(self, model: nn.Module) -> None:
        if self.config.params == "norm":
            check_norm_affine(model, self.name)
        elif _head(model) is None:
            raise ModelError("shot-im with params=features freezes the classifier head, the model's last nn.Linear, "
                             "and this model has none; use a model that ends in a linear classifier or params=norm")

    def configure(self, model: nn.Module) -> nn.Module:
        model.eval()
        force_batch_statistics(model)
        train_only(model, self._select(model))
        return model

    def _select(self, model: nn.Module) -> list[nn.Parameter]:
        return norm_affine_params(model) if self.config.params == "norm" else feature_params(model)

    def params(self) -> list[nn.Parameter]:
        return self._select(self.model)

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        logits = self.model(x)
        conditional, diversity = information_maximization(logits, self.config.epsilon)
        loss = conditional - self.config.diversity_weight * diversity
        return StepOutput(logits.detach(), loss, diagnostics={
            "entropy": conditional.detach(), "diversity": diversity.detach()})
