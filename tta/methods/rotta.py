"""RoTTA: robust test-time adaptation in dynamic scenarios (Yuan et al., CVPR 2023).

As the reference benchmark runs it: every BatchNorm becomes a robust BatchNorm (source statistics moved towards each
training batch's by ``bn_alpha``), whose affine parameters train with LayerNorm/GroupNorm's (Adam 1e-3). A teacher
(a copy of the student) predicts every batch with its stored statistics; each image then enters, in stream order, a
category-balanced memory bank of ``memory_size`` images under the teacher's pseudo-label: while its class holds fewer
than ``memory_size / classes`` images it is added (if the bank is full, the highest-scoring image of the largest
classes makes room), otherwise it replaces the highest-scoring image of its own class; either only if that score
beats the newcomer's. An image's score is ``lambda_t * sigmoid(age / memory_size) + lambda_u * entropy / ln(C)``.
Every ``update_every`` images the student takes one step on the whole bank: its prediction on a strong augmentation
against the teacher's on the images themselves, weighted by timeliness ``sigmoid(-age / memory_size)``; the
teacher then moves towards the student (momentum ``teacher_momentum``, i.e. 1 - RoTTA's nu). The prediction
returned is the teacher's, computed before the batch's updates. ``norm: unmix-tns`` replaces the BatchNorm layers by
UnMix-TNS layers (``tta.norm.unmix_tns``) instead of robust BatchNorm ones.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.core.augment import tta_augment
from tta.core.base import AdaptedModel, StepOutput
from tta.core.losses import soft_cross_entropy
from tta.core.params import OptimizerConfig, check_norm_affine, ema_update, train_only
from tta.core.requirements import Requirements
from tta.core.validate import check_range
from tta.errors import InputError, ModelError
from tta.norm.convert import replace_batchnorms
from tta.norm.robust_bn import RobustBN
from tta.norm.unmix_tns import NormChoice, UnMixTNS, apply_norm
from tta.registry import register


@dataclass(frozen=True)
class RoTTAConfig(NormChoice, OptimizerConfig):
    """Settings of ``rotta`` (defaults: the reference benchmark's CIFAR-10-C configuration), with the normalisation
    layers (``norm``: ``unmix-tns`` takes the place of the robust BatchNorm)."""

    memory_size: int = 64
    update_every: int = 64
    teacher_momentum: float = 0.999
    bn_alpha: float = 0.05
    lambda_t: float = 1.0
    lambda_u: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("memory_size", "update_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65536:
                raise ValueError(f"{key} must be an integer in [1, 65536], got {value}")
        if self.steps != 1:
            raise ValueError(f"rotta takes one update per update_every images; steps must be 1, got {self.steps}")
        check_range("teacher_momentum", self.teacher_momentum, low=0.0, high=1.0)
        check_range("bn_alpha", self.bn_alpha, low=0.0, high=1.0)
        check_range("lambda_t", self.lambda_t, low=0.0)
        check_range("lambda_u", self.lambda_u, low=0.0)


@register("rotta")
class RoTTA(AdaptedModel):
    """Robust BN, a category-balanced memory bank and a mean teacher, one update every 64 images."""

    Config = RoTTAConfig
    update = "gradient"
    requires = Requirements(classifier=True)  # the memory is balanced over the classifier's classes
    presets: ClassVar[dict[str, dict[str, Any]]] = {"imagenet": {"optimizer": "adam", "lr": 1e-3}}

    def check_model(self, model: nn.Module) -> None:
        if any(isinstance(m, _BatchNorm) and m.running_mean is None for m in model.modules()):
            raise ModelError("rotta starts its robust BatchNorm from the source running statistics, but some "
                             "BatchNorm layers were built with track_running_stats=False; load the pretrained "
                             "model with its running statistics")
        check_norm_affine(model, self.name)

    def configure(self, model: nn.Module) -> nn.Module:
        model = apply_norm(model, self.config, self.name)
        replace_batchnorms(model, lambda bn: RobustBN(bn, self.config.bn_alpha))
        train_only(model, _norm_params(model))
        return model

    def params(self) -> list[nn.Parameter]:
        return _norm_params(self.model)

    def setup(self) -> None:
        self.teacher = copy.deepcopy(self.model).requires_grad_(False)
        cap = self.config.memory_size
        self.add_state("memory_x", torch.zeros(0), dynamic=True)  # (memory_size, C, H, W) from the first batch on
        self.add_state("memory_label", torch.full((cap,), -1, dtype=torch.long))  # -1: empty slot
        self.add_state("memory_entropy", torch.zeros(cap))
        self.add_state("memory_birth", torch.zeros(cap, dtype=torch.long))  # images seen before it came in
        self.add_state("seen", 0)
        self._batch: tuple[torch.Tensor, list[int], list[float]] | None = None
        self._cursor = 0

    # ------------------------------------------------------------------------------------------------ step
    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        if self.memory_x.numel() and self.memory_x.shape[1:] != x.shape[1:]:
            raise InputError(f"image shape {tuple(x.shape[1:])} differs from the memory bank's "
                             f"{tuple(self.memory_x.shape[1:])}; reset() before changing the image size")
        self.model.eval()
        self.teacher.eval()
        with torch.no_grad():
            logits = self._teacher_logits(x)
            p = logits.softmax(1)
            entropy = -(p * torch.log(p + 1e-6)).sum(1)
        self._batch, self._cursor = (x.detach(), p.argmax(1).tolist(), entropy.tolist()), 0
        return self._next_update(logits)

    def after_step(self, x: torch.Tensor, domain: torch.Tensor | None, out: StepOutput) -> StepOutput:
        updates = 0
        if out.loss is not None:
            ema_update(self.teacher, self.model, self.config.teacher_momentum)
            updates += 1
        while self._batch is not None and self._cursor < len(self._batch[1]):
            more = self._next_update(out.logits)
            if more.loss is not None:
                self._update(x, domain, more)
                ema_update(self.teacher, self.model, self.config.teacher_momentum)
                updates += 1
        self._batch = None
        out.diagnostics["updates"] = torch.tensor(updates)
        out.diagnostics["memory"] = (self.memory_label >= 0).sum()
        return out

    def predict(self, x: torch.Tensor, domain: torch.Tensor | None) -> torch.Tensor:
        self.teacher.eval()
        return self.teacher(x)

    # ------------------------------------------------------------------------------------------- memory bank
    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's prediction on a new batch (eval mode, no gradients), which also labels it for the bank."""
        return self.teacher(x)

    def _update_due(self) -> bool:
        """Whether an update is due after the image just admitted: every ``update_every`` images."""
        return self.seen % self.config.update_every == 0

    def _next_update(self, logits: torch.Tensor) -> StepOutput:
        """Admit the batch's images from the cursor on until an update is due; its loss, or no loss at the end."""
        assert self._batch is not None
        x, labels, entropies = self._batch
        label, entropy, birth = (t.tolist() for t in (self.memory_label, self.memory_entropy, self.memory_birth))
        writes: dict[int, int] = {}
        due = False
        while self._cursor < len(labels) and not due:
            i = self._cursor
            slot = self._admit(label, entropy, birth, labels[i], entropies[i])
            if slot is not None:
                label[slot], entropy[slot], birth[slot] = labels[i], entropies[i], self.seen
                writes[slot] = i
            self.seen += 1
            self._cursor += 1
            due = self._update_due()
        for buffer, values in ((self.memory_label, label), (self.memory_entropy, entropy), (self.memory_birth, birth)):
            buffer.copy_(torch.tensor(values, dtype=buffer.dtype))  # in place: fixed-capacity state
        if writes:
            if not self.memory_x.numel():
                self.memory_x = x.new_zeros((self.config.memory_size, *x.shape[1:]))
            slots = torch.tensor(list(writes), device=x.device)
            self.memory_x[slots] = x[torch.tensor(list(writes.values()), device=x.device)]
        if not due:
            return StepOutput(logits, None, 0)
        return StepOutput(logits, *self._memory_loss(label, birth))

    def _score(self, age: int, entropy: float) -> float:
        cap, c = self.config.memory_size, self.num_classes
        assert c is not None
        return self.config.lambda_t / (1 + math.exp(-age / cap)) + self.config.lambda_u * entropy / math.log(c)

    def _admit(self, label: list[int], entropy: list[float], birth: list[int], new: int, new_entropy: float
               ) -> int | None:
        """The slot a new image with pseudo-label ``new`` takes (evicting its occupant), or ``None``: rejected."""
        assert self.num_classes is not None
        counts = [0] * self.num_classes
        for c in label:
            if c >= 0:
                counts[c] += 1
        if counts[new] < self.config.memory_size / self.num_classes:
            if sum(counts) < self.config.memory_size:
                return label.index(-1)
            most = max(counts)
            classes = {c for c, n in enumerate(counts) if n == most}
        else:
            classes = {new}
        # The highest score goes; ties: the higher class, then the newest image (the reference's scan order).
        candidates = [(self._score(self.seen - birth[s], entropy[s]), label[s], birth[s], s)
                      for s in range(len(label)) if label[s] in classes]
        if not candidates:
            return label.index(-1) if -1 in label else None
        score, _, _, slot = max(candidates)
        return slot if score > self._score(0, new_entropy) else None

    def _memory_loss(self, label: list[int], birth: list[int]) -> tuple[torch.Tensor, int]:
        """The student's timeliness-weighted cross-entropy against the teacher on the bank (grouped by class)."""
        order = sorted((s for s in range(len(label)) if label[s] >= 0), key=lambda s: (label[s], birth[s]))
        data = self.memory_x[torch.tensor(order, device=self.memory_x.device)]
        age = torch.tensor([(self.seen - birth[s]) / self.config.memory_size for s in order], device=data.device)
        weight = torch.sigmoid(-age.float())
        self.model.train()
        self.teacher.train()
        strong = tta_augment(data)
        with torch.no_grad():
            target = self.teacher(data)
        loss = (soft_cross_entropy(self.model(strong), target) * weight.to(data.dtype)).mean()
        return loss, len(order)


def _norm_params(model: nn.Module) -> list[nn.Parameter]:
    """Affine parameters of the robust BatchNorm (or UnMix-TNS), LayerNorm and GroupNorm layers (what RoTTA
    trains)."""
    return [p for m in model.modules() if isinstance(m, (RobustBN, UnMixTNS, nn.LayerNorm, nn.GroupNorm))
            for p in (m.weight, m.bias) if p is not None]
