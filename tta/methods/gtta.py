"""GTTA: gradual test-time adaptation by self-training with source replay mixed towards the test batch
(Marsden, Döbler and Yang, WACV 2024), in the variant the reference benchmark runs by default.

As the reference benchmark runs it on CIFAR-10-C: every weight and bias trains (BatchNorm with batch statistics),
Adam at lr 1e-5. Per batch:

1. the model's prediction on the test batch (no gradient) gives hard pseudo-labels, kept only where the
   confidence is at least ``sqrt(c)``, ``c`` a running mean of the batches' mean confidence (momentum
   ``conf_momentum``, starting at 0.9);
2. a source step: the next batch of labelled clean source images (``--source-data``, at most as many as the test
   batch holds, resized to the batch's image size if theirs differs) is mixed with the test images whose predicted
   class distribution is closest to each source image's (largest dot product of the two softmax vectors):
   ``lambda_mixup * x_test + (1 - lambda_mixup) * x_source``, and one step is taken on the cross-entropy of the
   mixed images against the source labels;
3. a target step: the model, after the source step, predicts the test batch again (this is the prediction
   returned) and one more step is taken on its cross-entropy against the pseudo-labels of 1. (skipped when no
   pseudo-label passed the threshold).

With ``steps`` > 1, steps 2 and 3 repeat with the pseudo-labels of the batch's first prediction, as in the reference.
The paper's other variant replaces the mixup by style transfer through an AdaIN network (a VGG encoder and a decoder
pretrained on the source data); it is not included. Source batches come from the source images in a new shuffled
order each pass (``source_seed``); where the stream of source batches stands is state, as is the confidence mean
(both return to their start on ``reset()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tta.core.base import AdaptedModel, StepOutput
from tta.core.params import OptimizerConfig
from tta.core.reliable import eval_with_batch_statistics
from tta.core.replay import replay_batch
from tta.core.requirements import Requirements
from tta.core.teacher import weight_and_bias
from tta.core.validate import check_range
from tta.errors import ConfigError
from tta.methods.santa import _check_int
from tta.registry import register


@dataclass(frozen=True)
class GTTAConfig(OptimizerConfig):
    """Settings of ``gtta`` (defaults: the reference benchmark's CIFAR-10-C configuration, Adam 1e-5)."""

    lr: float = 1e-5
    lambda_mixup: float = 1 / 3
    conf_momentum: float = 0.9
    source_batch_size: int = 200
    source_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("lambda_mixup", self.lambda_mixup, low=0.0, high=1.0)
        check_range("conf_momentum", self.conf_momentum, low=0.0, high=1.0)
        _check_int("source_batch_size", self.source_batch_size, 2, 65536)
        _check_int("source_seed", self.source_seed, 0, 2**62)


@register("gtta")
class GTTA(AdaptedModel):
    """Self-training on confident pseudo-labels, after a step on source images mixed towards the test batch."""

    Config = GTTAConfig
    update = "gradient"
    requires = Requirements(source_data=True)
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The reference benchmark's ImageNet-C settings (ResNet-50, batch 64, Adam 1e-5), without the style
        # transfer that configuration switches on.
        "imagenet": {"source_batch_size": 64}}

    def configure(self, model: nn.Module) -> nn.Module:
        return eval_with_batch_statistics(model, weight_and_bias(model))

    def setup(self) -> None:
        assert self.source_data is not None  # required, checked before setup
        images, labels = self.source_data.sample(None)
        if self.num_classes is not None and int(labels.max()) >= self.num_classes:
            raise ConfigError(f"the source data has labels up to {int(labels.max())} but the model predicts "
                              f"{self.num_classes} classes; pass source data of the model's own classes")
        if self.in_channels is not None and images.shape[1] != self.in_channels:
            raise ConfigError(f"the source images have {images.shape[1]} channels but the model takes "
                              f"{self.in_channels}; pass source data the model can read")
        # Constants of the run, not adaptation state: never reset, saved or restored.
        self.register_buffer("source_images", (images * 255).round().to(torch.uint8), persistent=False)
        self.register_buffer("source_labels", labels, persistent=False)
        self.add_state("mean_confidence", torch.tensor(0.9))
        self.add_state("source_cursor", 0)
        self._pseudo_labels: torch.Tensor | None = None
        self._target_logits: torch.Tensor | None = None

    def params(self) -> list[nn.Parameter]:
        return weight_and_bias(self.model)

    def step(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        self._pseudo_labels = self._target_logits = None  # a new batch: pseudo-labels from its first prediction
        return super().step(x, domain)

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        cfg = self.config
        with torch.no_grad():
            logits = self.model(x)
            probs = logits.softmax(1)
            if self._pseudo_labels is None:
                confidence, labels = probs.max(1)
                self.mean_confidence.mul_(cfg.conf_momentum).add_((1 - cfg.conf_momentum) * confidence.mean())
                self._pseudo_labels = labels.masked_fill(confidence < self.mean_confidence.sqrt(), -1)
            images, labels = replay_batch(self.source_images, self.source_labels, self.source_cursor,
                                          cfg.source_batch_size, cfg.source_seed, x.dtype)
            self.source_cursor += 1
            images, labels = images[:len(x)].to(x.device), labels[:len(x)].to(x.device)
            if images.shape[2:] != x.shape[2:]:  # source images of another size are resized to the batch's
                images = F.interpolate(images, size=x.shape[2:], mode="bilinear", antialias=True,
                                       align_corners=False)
            closest = (self.model(images).softmax(1) @ probs.T).argmax(1)
            mixed = cfg.lambda_mixup * x[closest] + (1 - cfg.lambda_mixup) * images
        source_ce = F.cross_entropy(self.model(mixed), labels)
        return StepOutput(logits, source_ce, diagnostics={"source_ce": source_ce.detach()})

    def _update(self, x: torch.Tensor, domain: torch.Tensor | None, out: StepOutput) -> None:
        """The source step on ``out.loss``, then the target step on a new prediction against the pseudo-labels."""
        super()._update(x, domain, out)
        assert self._pseudo_labels is not None  # set by loss()
        logits = self.model(x)
        self._target_logits = logits.detach()
        kept = self._pseudo_labels >= 0
        target = F.cross_entropy(logits, self._pseudo_labels, ignore_index=-1) if kept.any() else None
        super()._update(x, domain, StepOutput(logits.detach(), target, int(kept.sum())))

    def after_step(self, x: torch.Tensor, domain: torch.Tensor | None, out: StepOutput) -> StepOutput:
        if self._target_logits is None:  # no update ran (e.g. a guard vetoed it): the prediction before it
            return out
        return StepOutput(self._target_logits, out.loss, out.n_used, out.diagnostics)


__all__ = ["GTTA", "GTTAConfig"]
