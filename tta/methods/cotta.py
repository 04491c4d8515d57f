"""CoTTA: continual test-time adaptation with a mean teacher and stochastic restore (Wang et al., CVPR 2022).

As the reference benchmark configures it: every weight and bias of the student trains (Adam 1e-3 on CIFAR-10-C),
BatchNorm layers normalise with batch statistics; an EMA teacher (momentum 0.999) and a frozen anchor (the source)
are copies of the student. When the anchor's mean confidence on the batch is below ``aug_threshold``, the teacher's
prediction is its average logits over ``n_augmentations`` random augmentations of the batch, else its plain
prediction; the student minimises its cross-entropy against that (``loss: symmetric`` averages both directions, the
reference's choice outside CIFAR). After each update the teacher moves towards the student and every element of
every weight and bias returns to its source value with probability ``restore_prob``. The prediction returned is the
teacher's, computed before the update.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from tta.core.augment import tta_augment
from tta.core.base import AdaptedModel, StepOutput
from tta.core.losses import soft_cross_entropy, symmetric_cross_entropy
from tta.core.params import OptimizerConfig, ema_update
from tta.core.reliable import eval_with_batch_statistics
from tta.core.teacher import stochastic_restore, weight_and_bias
from tta.core.validate import check_range
from tta.registry import register


@dataclass(frozen=True)
class CoTTAConfig(OptimizerConfig):
    """Settings of ``cotta`` (defaults: the reference benchmark's CIFAR-10-C configuration)."""

    teacher_momentum: float = 0.999
    restore_prob: float = 0.01
    aug_threshold: float = 0.92
    n_augmentations: int = 32
    loss: Literal["ce", "symmetric"] = "ce"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("teacher_momentum", self.teacher_momentum, low=0.0, high=1.0)
        check_range("restore_prob", self.restore_prob, low=0.0, high=1.0)
        check_range("aug_threshold", self.aug_threshold, low=0.0, high=1.0)
        n = self.n_augmentations
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1024:
            raise ValueError(f"n_augmentations must be an integer in [1, 1024], got {n}")
        if self.loss not in ("ce", "symmetric"):
            raise ValueError(f"loss must be 'ce' or 'symmetric', got {self.loss!r}")


@register("cotta")
class CoTTA(AdaptedModel):
    """Mean teacher with augmentation-averaged targets and stochastic restore of the weights to the source."""

    Config = CoTTAConfig
    update = "gradient"
    presets: ClassVar[dict[str, dict[str, Any]]] = {"imagenet": {
        "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True, "restore_prob": 0.001,
        "aug_threshold": 0.1, "loss": "symmetric"},
        # FOA's official code running CoTTA on ViT-B/16 (batch 64): the ImageNet settings at lr 0.005, no Nesterov.
        "vit": {"optimizer": "sgd", "lr": 0.005, "momentum": 0.9, "nesterov": False, "restore_prob": 0.001,
                "aug_threshold": 0.1, "loss": "symmetric"}}

    def configure(self, model: nn.Module) -> nn.Module:
        return eval_with_batch_statistics(model, weight_and_bias(model))

    def setup(self) -> None:
        self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        self.anchor = copy.deepcopy(self.model).requires_grad_(False)

    def params(self) -> list[nn.Parameter]:
        return weight_and_bias(self.model)

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        logits = self.model(x)
        with torch.no_grad():
            anchor_conf = self.anchor(x).softmax(1).amax(1).mean()
            augmented = bool(anchor_conf < self.config.aug_threshold)
            if augmented:
                target = torch.stack([self.teacher(tta_augment(x)) for _ in range(self.config.n_augmentations)])
                target = target.mean(0)
            else:
                target = self.teacher(x)
        criterion = symmetric_cross_entropy if self.config.loss == "symmetric" else soft_cross_entropy
        loss = criterion(logits, target).mean()
        return StepOutput(target, loss, x.shape[0],
                          {"anchor_confidence": anchor_conf, "augmented": torch.tensor(augmented)})

    def after_step(self, x: torch.Tensor, domain: torch.Tensor | None, out: StepOutput) -> StepOutput:
        ema_update(self.teacher, self.model, self.config.teacher_momentum)
        stochastic_restore(self.params(), weight_and_bias(self.anchor), self.config.restore_prob)
        return out

    def predict(self, x: torch.Tensor, domain: torch.Tensor | None) -> torch.Tensor:
        return self.teacher(x)
