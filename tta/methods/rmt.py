"""RMT: robust mean teacher, symmetric cross-entropy with a mean teacher, contrast against source prototypes and
source replay (Döbler, Marsden and Yang, CVPR 2023).

As the reference benchmark runs it: every weight and bias of the student trains (BatchNorm with batch statistics),
together with a projector (linear-ReLU-linear to ``projection_dim``), Adam 1e-3 on CIFAR-10-C. A mean teacher (a
copy of the student, EMA momentum ``teacher_momentum`` over every parameter) supplies the targets. Per batch, one
step on

- ``lambda_ce_trg`` times the symmetric cross-entropy between the student and the teacher, averaged over the image
  and a random augmentation of it (CoTTA's, ``tta.core.augment.tta_augment``);
- ``lambda_cont`` times SANTA's instance contrast (``tta.methods.santa``): an image's features, its augmentation's
  and the nearest clean-source class prototype are one instance;
- ``lambda_ce_src`` times the cross-entropy of the student on the next batch of labelled clean source images
  (source replay; 0 gives the source-free variant);

then the teacher moves towards the student. The prediction returned is the sum of the student's and the teacher's
logits, computed before the update.

Before adaptation, a warm-up on the clean source images (``--source-data``): ``warmup_samples //
source_batch_size`` steps of the symmetric cross-entropy between student and teacher with the learning rate rising
linearly to ``lr``, each followed by the teacher's EMA. The warmed-up student, teacher and optimizer state are what
``reset()`` returns to; they are cached by model weights, source data and settings. Source batches come from the
source images in a new shuffled order each pass (``source_seed``); where the stream of source batches stands is
state (saved, and reset to where the warm-up left it).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tta.core.augment import tta_augment
from tta.core.base import AdaptedModel, StepOutput
from tta.core.losses import symmetric_cross_entropy
from tta.core.params import OptimizerConfig, ema_update, make_optimizer
from tta.core.reliable import eval_with_batch_statistics
from tta.core.replay import replay_batch
from tta.core.requirements import Requirements
from tta.core.teacher import weight_and_bias
from tta.core.validate import check_range
from tta.methods.santa import (
    _check_int,
    instance_contrastive_loss,
    make_projector,
    nearest_prototypes,
    source_prototypes,
)
from tta.models.fingerprint import model_fingerprint
from tta.models.surgery import FeatureSplit
from tta.registry import register
from tta.source import derived


@dataclass(frozen=True)
class RMTConfig(OptimizerConfig):
    """Settings of ``rmt`` (defaults: the reference benchmark's CIFAR-10-C configuration, Adam 1e-3)."""

    lambda_ce_src: float = 1.0
    lambda_ce_trg: float = 1.0
    lambda_cont: float = 1.0
    teacher_momentum: float = 0.999
    temperature: float = 0.1
    projection_dim: int = 128
    warmup_samples: int = 50000
    source_batch_size: int = 200
    source_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("lambda_ce_src", "lambda_ce_trg", "lambda_cont"):
            check_range(name, getattr(self, name), low=0.0)
        check_range("teacher_momentum", self.teacher_momentum, low=0.0, high=1.0)
        check_range("temperature", self.temperature, low=0.0, low_open=True)
        _check_int("projection_dim", self.projection_dim, 1, 65536)
        _check_int("warmup_samples", self.warmup_samples, 0, 10**9)
        _check_int("source_batch_size", self.source_batch_size, 2, 65536)
        _check_int("source_seed", self.source_seed, 0, 2**62)


@register("rmt")
class RMT(AdaptedModel):
    """Mean teacher with symmetric cross-entropy, prototype contrast and source replay, after a source warm-up."""

    Config = RMTConfig
    update = "gradient"
    requires = Requirements(source_data=True, classifier=True)
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The reference benchmark's ImageNet-C settings (ResNet-50, batch 64).
        "imagenet": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True, "source_batch_size": 64}}

    def configure(self, model: nn.Module) -> nn.Module:
        return eval_with_batch_statistics(model, weight_and_bias(model))

    def setup(self) -> None:
        cfg = self.config
        assert self.source_data is not None and self.num_classes is not None  # required, checked before setup
        self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        self.split = FeatureSplit(self.model)
        like = next(self.model.parameters())
        images, labels = self.source_data.sample(None)
        # Constants of the run, not adaptation state: never reset, saved or restored.
        self.register_buffer("source_images", (images * 255).round().to(torch.uint8), persistent=False)
        self.register_buffer("source_labels", labels, persistent=False)
        protos = source_prototypes(self.model, self.split, self.source_data, self.num_classes,
                                   batch_size=cfg.source_batch_size, seed=cfg.source_seed)
        self.register_buffer("prototypes", protos.to(like), persistent=False)
        self.projector = make_projector(protos.shape[1], cfg.projection_dim).to(like)
        self.add_state("source_cursor", 0)
        self._warm_optimizer: dict[str, Any] | None = None
        steps = cfg.warmup_samples // cfg.source_batch_size
        if steps:
            warm = derived("rmt-warmup", model_fingerprint(self.model), self.source_data, repr(cfg),
                           lambda: self._warm_up(steps))
            self.model.load_state_dict(warm["model"])
            self.teacher.load_state_dict(warm["teacher"])
            self._warm_optimizer = warm["optimizer"]
            self.source_cursor = steps

    def _warm_up(self, steps: int) -> dict[str, Any]:
        """The reference's warm-up: student against teacher on source batches, lr rising linearly, teacher EMA."""
        cfg = self.config
        optimizer = make_optimizer(self.params(), cfg)
        with torch.inference_mode(False), torch.enable_grad():
            for i in range(steps):
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * (i + 1) / steps
                images, _ = self._source_batch(i)
                loss = symmetric_cross_entropy(self.model(images), self.teacher(images)).mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                ema_update(self.teacher, self.model, cfg.teacher_momentum)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr
        return {"model": copy.deepcopy(self.model.state_dict()), "teacher": copy.deepcopy(self.teacher.state_dict()),
                "optimizer": copy.deepcopy(optimizer.state_dict())}

    def make_optimizer(self) -> torch.optim.Optimizer | None:
        optimizer = super().make_optimizer()
        if optimizer is not None and self._warm_optimizer is not None:
            optimizer.load_state_dict(self._warm_optimizer)  # Adam's moments carry over from the warm-up
            self._warm_optimizer = None
        return optimizer

    def params(self) -> list[nn.Parameter]:
        return weight_and_bias(self.model) + list(self.projector.parameters())

    def _source_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``index``-th batch of the source stream (``tta.core.replay.replay_batch``)."""
        return replay_batch(self.source_images, self.source_labels, index, self.config.source_batch_size,
                            self.config.source_seed, next(self.model.parameters()).dtype)

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        cfg = self.config
        features, logits = self.split(x)
        features_aug, logits_aug = self.split(tta_augment(x))
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        self_training = 0.5 * (symmetric_cross_entropy(logits, teacher_logits)
                               + symmetric_cross_entropy(logits_aug, teacher_logits)).mean()
        views = torch.stack([nearest_prototypes(features, self.prototypes), features, features_aug], dim=1)
        contrastive = instance_contrastive_loss(views, self.projector, cfg.temperature)
        loss = cfg.lambda_ce_trg * self_training + cfg.lambda_cont * contrastive
        diagnostics = {"self_training": self_training.detach(), "contrastive": contrastive.detach()}
        if cfg.lambda_ce_src > 0:
            images, labels = self._source_batch(self.source_cursor)
            self.source_cursor += 1
            replay = F.cross_entropy(self.model(images), labels)
            loss = loss + cfg.lambda_ce_src * replay
            diagnostics["source_ce"] = replay.detach()
        return StepOutput((logits + teacher_logits).detach(), loss, diagnostics=diagnostics)

    def after_step(self, x: torch.Tensor, domain: torch.Tensor | None, out: StepOutput) -> StepOutput:
        ema_update(self.teacher, self.model, self.config.teacher_momentum)
        return out

    def predict(self, x: torch.Tensor, domain: torch.Tensor | None) -> torch.Tensor:
        return self.model(x) + self.teacher(x)
