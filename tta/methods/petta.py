"""PeTTA: persistent test-time adaptation for recurring streams (Hoang, Vo and Nguyen, NeurIPS 2024).

RoTTA's machinery (``tta.methods.rotta``: robust BatchNorm, a category-balanced memory bank of ``memory_size``
images, a mean teacher whose prediction is returned) with a sensor of how far the model has drifted from the source,
which sets the strength of what holds it back. Per batch, as the authors' code runs it:

1. the teacher (eval mode) predicts the batch and labels it; its images enter the memory bank;
2. the divergence ``d = 1 - exp(-D)``: ``D`` is the mean, over the classes the batch is labelled with and the
   feature dimensions, of ``(mu_hat_c - mu_c)^2 / (var_c + 1e-6)``, where ``mu_c`` and ``var_c`` are the mean and
   the variance of the features (the input of the linear head) of the clean source images the source model
   predicts as class ``c``, and ``mu_hat_c`` an exponential moving average (rate ``prototype_momentum``) of the
   teacher's features of the stream's images labelled ``c``; then ``mu_hat`` takes in this batch;
3. one step on the whole bank: the self-training loss (``sce``: the symmetric cross-entropy of the student on the
   images and on a strong augmentation against the teacher, in train mode; ``ce``: the cross-entropy of the
   augmented prediction against the teacher), plus ``lambda_0 * d`` times the regulariser (``cosine``: minus the
   mean cosine similarity of each trained parameter with its source value; ``l2``: the mean squared distance), plus
   ``anchor_weight`` times the anchor loss: the cross-entropy of the student's augmented prediction against a frozen
   copy of the source model's;
4. the teacher moves towards the student at rate ``alpha_0 * (1 - d)``.

The more the model has drifted, the harder it is pulled back and the slower the teacher follows.
``adaptive_lambda``/``adaptive_alpha`` off use ``lambda_0`` and ``alpha_0`` as they are. The source statistics come
from ``--source-data`` (the authors use the clean test split of the source data set) and are cached by model
weights, source data and settings; a class the source model predicts fewer than twice takes the statistics of all
source features.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tta.core.augment import tta_augment
from tta.core.base import StepOutput
from tta.core.losses import soft_cross_entropy, symmetric_cross_entropy
from tta.core.params import OptimizerConfig, ema_update
from tta.core.requirements import Requirements
from tta.core.validate import check_range
from tta.methods.rotta import RoTTA
from tta.methods.santa import _check_int
from tta.models.fingerprint import model_fingerprint
from tta.models.surgery import FeatureSplit
from tta.registry import register
from tta.source import SourceData, derived


@dataclass(frozen=True)
class PeTTAConfig(OptimizerConfig):
    """Settings of ``petta`` (defaults: the authors' CIFAR-10-C configuration, Adam 1e-3)."""

    memory_size: int = 64
    bn_alpha: float = 0.05
    lambda_t: float = 1.0
    lambda_u: float = 1.0
    alpha_0: float = 0.001
    lambda_0: float = 10.0
    anchor_weight: float = 1.0
    regularizer: Literal["cosine", "l2", "none"] = "cosine"
    loss: Literal["sce", "ce"] = "sce"
    adaptive_lambda: bool = True
    adaptive_alpha: bool = True
    prototype_momentum: float = 0.05
    source_images: int = 0
    source_batch_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("memory_size", self.memory_size, 1, 65536)
        if self.steps != 1:
            raise ValueError(f"petta takes one update per batch; steps must be 1, got {self.steps}")
        for key in ("bn_alpha", "alpha_0", "prototype_momentum"):
            check_range(key, getattr(self, key), low=0.0, high=1.0)
        for key in ("lambda_t", "lambda_u", "lambda_0", "anchor_weight"):
            check_range(key, getattr(self, key), low=0.0)
        _check_int("source_images", self.source_images, 0, 10**9)
        _check_int("source_batch_size", self.source_batch_size, 1, 65536)


def divergence(prototypes: torch.Tensor, source_mean: torch.Tensor, source_var: torch.Tensor,
               classes: torch.Tensor) -> torch.Tensor:
    """PeTTA's divergence in [0, 1): ``1 - exp(-mean((mu_hat - mu)^2 / (var + 1e-6)))`` over ``classes``' rows."""
    gap = (prototypes[classes] - source_mean[classes]).pow(2) / (source_var[classes] + 1e-6)
    return 1 - torch.exp(-gap.mean())


@register("petta")
class PeTTA(RoTTA):
    """RoTTA with a divergence-sensing regulariser, adaptive teacher momentum and an anchor loss (recurring TTA)."""

    Config = PeTTAConfig
    requires = Requirements(source_data=True, classifier=True)
    # The authors' ImageNet-C configuration: the cross-entropy loss, the rest as on CIFAR-10-C.
    presets: ClassVar[dict[str, dict[str, Any]]] = {"imagenet": {"loss": "ce"}}

    def setup(self) -> None:
        super().setup()
        assert self.source_data is not None and self.num_classes is not None  # required, checked before setup
        self.anchor = copy.deepcopy(self.model).requires_grad_(False)  # the source model, its statistics follow
        self._split = FeatureSplit(self.teacher)
        mean, var = source_feature_stats(self.model, self.source_data, self.num_classes,
                                         images=self.config.source_images, batch_size=self.config.source_batch_size)
        like = next(self.model.parameters())
        # Constants of the run, not adaptation state: never reset, saved or restored.
        self.register_buffer("source_mean", mean.to(like), persistent=False)
        self.register_buffer("source_var", var.to(like), persistent=False)
        self.register_buffer("source_params", torch.cat([p.detach().reshape(-1) for p in self.params()]).clone()
                             if self.params() else like.new_zeros(0), persistent=False)
        self.add_state("prototypes", mean.to(like).clone())
        self.add_state("divergence", like.new_zeros(()))

    # ------------------------------------------------------------------------------------------------ step
    def _teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        features, logits = self._split(x)
        labels = logits.argmax(1)
        classes = labels.unique()
        self.divergence.copy_(divergence(self.prototypes, self.source_mean, self.source_var, classes))
        rate = self.config.prototype_momentum
        for c in classes:
            self.prototypes[c] = (1 - rate) * self.prototypes[c] + rate * features[labels == c].mean(0)
        return logits

    def _update_due(self) -> bool:
        assert self._batch is not None
        return self._cursor == len(self._batch[1])  # one update per batch, after the whole batch came in

    def regularization_weight(self) -> torch.Tensor:
        """The weight of the regulariser now: ``lambda_0 * divergence`` (``lambda_0`` when not adaptive)."""
        cfg = self.config
        return cfg.lambda_0 * self.divergence if cfg.adaptive_lambda else self.divergence.new_tensor(cfg.lambda_0)

    def teacher_rate(self) -> torch.Tensor:
        """How far the teacher moves towards the student now: ``alpha_0 * (1 - divergence)`` (or ``alpha_0``)."""
        cfg = self.config
        return cfg.alpha_0 * (1 - self.divergence) if cfg.adaptive_alpha else self.divergence.new_tensor(cfg.alpha_0)

    def _memory_loss(self, label: list[int], birth: list[int]) -> tuple[torch.Tensor, int]:
        """Self-training on the bank against the teacher, the weighted regulariser and the anchor loss."""
        cfg = self.config
        order = sorted((s for s in range(len(label)) if label[s] >= 0), key=lambda s: (label[s], birth[s]))
        data = self.memory_x[torch.tensor(order, device=self.memory_x.device)]
        # The authors' order of forward passes: every train-mode pass moves that model's robust BN statistics.
        self.teacher.train()
        self.model.train()
        self.anchor.train()
        with torch.no_grad():
            target = self.teacher(data)
        logits = self.model(data)
        with torch.no_grad():
            anchor = self.anchor(data)
        strong = self.model(tta_augment(data))
        if cfg.loss == "sce":
            self_training = 0.5 * (symmetric_cross_entropy(logits, target)
                                   + symmetric_cross_entropy(strong, target)).mean()
        else:
            self_training = soft_cross_entropy(strong, target).mean()
        loss = (self_training + self.regularization_weight() * self._regularizer()
                + cfg.anchor_weight * soft_cross_entropy(strong, anchor).mean())
        return loss, len(order)

    def _regularizer(self) -> torch.Tensor:
        """Distance of the trained parameters from their source values (0 for ``none``)."""
        params = self.params()
        if self.config.regularizer == "none" or not params:
            return self.divergence.new_zeros(())
        sources = torch.split(self.source_params, [p.numel() for p in params])
        if self.config.regularizer == "cosine":
            terms = [-F.cosine_similarity(p.reshape(1, -1), s.reshape(1, -1)).mean() for p, s in zip(params, sources,
                                                                                                     strict=True)]
        else:
            terms = [(p.reshape(-1) - s).pow(2).sum() for p, s in zip(params, sources, strict=True)]
        return torch.stack(terms).mean()

    def after_step(self, x: torch.Tensor, domain: torch.Tensor | None, out: StepOutput) -> StepOutput:
        rate = self.teacher_rate()
        if out.loss is not None:
            ema_update(self.teacher, self.model, 1 - float(rate))
        self._batch = None
        out.diagnostics["divergence"] = self.divergence.clone()
        out.diagnostics["regularization_weight"] = self.regularization_weight()
        out.diagnostics["teacher_rate"] = rate
        out.diagnostics["memory"] = (self.memory_label >= 0).sum()
        return out


def source_feature_stats(model: nn.Module, source: SourceData, num_classes: int, *, images: int,
                         batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes, D) means and unbiased variances of the features entering ``model``'s linear head, per class the
    model predicts, over ``images`` clean source images (0: all), in eval mode. Cached by model weights, source
    data and settings."""

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        x, _ = source.sample(images or None)
        split, like = FeatureSplit(model), next(model.parameters())
        was_training = model.training
        model.eval()
        feats, preds = [], []
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                f, logits = split(x[start:start + batch_size].to(device=like.device, dtype=like.dtype))
                feats.append(f.double().cpu())
                preds.append(logits.argmax(1).cpu())
        model.train(was_training)
        f, pred = torch.cat(feats), torch.cat(preds)
        mean = f.mean(0).repeat(num_classes, 1)
        var = (f.var(0) if len(f) > 1 else torch.ones_like(f[0])).repeat(num_classes, 1)
        for c in range(num_classes):
            if int((pred == c).sum()) >= 2:
                mean[c], var[c] = f[pred == c].mean(0), f[pred == c].var(0)
        return mean.float(), var.float()

    settings = f"classes={num_classes}|images={images}|batch={batch_size}"
    return derived("petta-source-features", model_fingerprint(model), source, settings, compute,
                   valid=lambda v: all(bool(torch.isfinite(t).all()) for t in v))


__all__ = ["PeTTA", "PeTTAConfig", "divergence", "source_feature_stats"]
