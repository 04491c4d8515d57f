"""TRIBE: tri-net self-training with balanced normalisation (Su, Xu and Jia, AAAI 2024).

For streams whose labels are correlated in time and imbalanced overall. Every BatchNorm becomes a balanced BatchNorm
(``tta.norm.balanced_bn``: per-class statistics combined with equal class weights, rate ``eta``, sharing ``gamma``)
whose affine parameters train (Adam 1e-3 on CIFAR-10-C). Three networks, as the authors' code runs them:

- the student, whose statistics follow strong augmentations of the stream;
- the teacher, which shares the student's parameters but keeps its own statistics, following the stream's images;
- the anchor, the source model with frozen parameters, whose statistics follow the stream's images too.

Per batch: the teacher (eval mode) predicts the batch: its prediction is returned and its labels are the pseudo-labels
every balanced BatchNorm updates its classes with. Then the teacher (train mode) predicts the images and the student
a strong augmentation of them (``tta.core.augment.tta_augment``); on the images whose teacher prediction has an
entropy below ``h0 * ln(C)``, one step on the cross-entropy of the student against the teacher's labels plus
``lambda_anchor`` times the mean squared difference between the teacher's logits and the anchor's (gradients reach
the shared parameters through both). A batch with no confident image takes an Adam step with zero gradient, as the
authors' code does.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.core.augment import tta_augment
from tta.core.base import AdaptedModel, StepOutput
from tta.core.losses import entropy
from tta.core.params import OptimizerConfig, train_only
from tta.core.requirements import Requirements
from tta.core.validate import check_range
from tta.errors import ModelError
from tta.norm.balanced_bn import BalancedBN, class_labels
from tta.norm.convert import replace_batchnorms
from tta.registry import register


@dataclass(frozen=True)
class TRIBEConfig(OptimizerConfig):
    """Settings of ``tribe`` (defaults: the authors' CIFAR-10-C configuration, Adam 1e-3)."""

    eta: float = 0.01
    gamma: float = 0.0
    h0: float = 0.05
    lambda_anchor: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("eta", self.eta, low=0.0, high=1.0, low_open=True)
        check_range("gamma", self.gamma, low=0.0, high=1.0)
        check_range("h0", self.h0, low=0.0)
        check_range("lambda_anchor", self.lambda_anchor, low=0.0)


@register("tribe")
class TRIBE(AdaptedModel):
    """Balanced BatchNorm and tri-net (student, teacher, anchor) self-training for imbalanced, correlated streams."""

    Config = TRIBEConfig
    update = "gradient"
    requires = Requirements(norm_layers=(_BatchNorm,), running_stats=True, classifier=True)
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The authors' ImageNet-C settings (ResNet-50, batch 64, 1,000 classes).
        "imagenet": {"lr": 5e-4, "eta": 0.5, "gamma": 0.5, "h0": 0.4}}

    def check_model(self, model: nn.Module) -> None:
        if not any(isinstance(m, _BatchNorm) and (m.weight is not None or m.bias is not None)
                   for m in model.modules()):
            raise ModelError("tribe trains the affine parameters of BatchNorm layers, and this model's BatchNorm "
                             "layers have none (affine=False); use a model with affine BatchNorm layers, or a method "
                             "that fits this model (see `tta methods`)")

    def configure(self, model: nn.Module) -> nn.Module:
        cfg, classes = self.config, self.num_classes
        assert classes is not None  # a classifier is required
        replace_batchnorms(model, lambda bn: BalancedBN(bn, classes, cfg.eta, cfg.gamma))
        train_only(model, _balanced_params(model))
        return model

    def params(self) -> list[nn.Parameter]:
        return _balanced_params(self.model)

    def setup(self) -> None:
        self.anchor = copy.deepcopy(self.model).requires_grad_(False)
        self.teacher = copy.deepcopy(self.model)
        for mine, theirs in zip(self.teacher.modules(), self.model.modules(), strict=True):
            for name, p in theirs.named_parameters(recurse=False):
                setattr(mine, name, p)  # the teacher's parameters are the student's; its statistics are its own

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        cfg = self.config
        assert self.num_classes is not None
        self.teacher.eval()
        with torch.no_grad():
            logits = self.teacher(x)
        labels = logits.argmax(1)
        strong = tta_augment(x)
        for net in (self.teacher, self.model, self.anchor):
            net.train()
        with class_labels(self.teacher, labels):
            teacher = self.teacher(x)
        with class_labels(self.model, labels):
            student = self.model(strong)
        with torch.no_grad(), class_labels(self.anchor, labels):
            anchor = self.anchor(x)
        for net in (self.teacher, self.model, self.anchor):
            net.eval()
        confident = entropy(teacher) < cfg.h0 * math.log(self.num_classes)
        n = confident.sum()
        denominator = n.clamp(min=1).to(teacher.dtype)
        supervised = (F.cross_entropy(student, teacher.argmax(1), reduction="none") * confident).sum() / denominator
        anchored = (F.mse_loss(teacher, anchor, reduction="none").mean(1) * confident).sum() / denominator
        loss = supervised + cfg.lambda_anchor * anchored
        diagnostics = {"confident": n, "supervised": supervised.detach(), "anchor": anchored.detach()}
        return StepOutput(logits, loss, None, diagnostics)

    def predict(self, x: torch.Tensor, domain: torch.Tensor | None) -> torch.Tensor:
        self.teacher.eval()
        return self.teacher(x)


def _balanced_params(model: nn.Module) -> list[nn.Parameter]:
    """Affine parameters of the balanced BatchNorm layers (what TRIBE trains)."""
    return [p for m in model.modules() if isinstance(m, BalancedBN) for p in (m.weight, m.bias) if p is not None]


__all__ = ["TRIBE", "TRIBEConfig"]
