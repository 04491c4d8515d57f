"""ETA: EATA's sample-efficient entropy minimisation without the Fisher regulariser (Niu et al., ICML 2022).

As the reference benchmark's EATA with ``fisher_alpha`` 0: the model runs in eval mode with batch statistics forced
in every BatchNorm, and only norm affine parameters train. A sample is used when its prediction is reliable (softmax
entropy below ``e_margin * ln C``) and not redundant (the absolute cosine similarity between its probabilities and
an EMA of the mean probabilities of the samples used so far is below ``d_margin``; no redundancy filter before the
first selection). Each used sample's entropy is weighted by ``1 / exp(H - E0)`` and the loss is their mean; a
batch with no used sample is not an update. The EMA (``probs_momentum``) follows the used samples of every batch.
The returned logits are those computed before the update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tta.core.base import AdaptedModel, StepOutput
from tta.core.losses import entropy, entropy_margin
from tta.core.params import IMAGENET_SGD, VIT_SGD, OptimizerConfig, check_norm_affine, norm_affine_params
from tta.core.reliable import eval_with_batch_statistics, reliable
from tta.core.validate import check_range
from tta.registry import register

# The reference benchmark's ImageNet-C settings (ResNet-50, batch 64).
IMAGENET = {**IMAGENET_SGD, "d_margin": 0.05}
VIT = {**VIT_SGD, "d_margin": 0.05}  # SAR's official code running EATA on ViT-B/16


@dataclass(frozen=True)
class ETAConfig(OptimizerConfig):
    """Settings of ``eta``: the optimiser's (Adam 1e-3), the reliability margin ``e_margin`` (a fraction of
    ln C), the redundancy margin ``d_margin`` (a cosine similarity) and the EMA momentum of the mean probabilities
    (the weight kept on the running mean: p <- m p + (1 - m) batch mean)."""

    e_margin: float = 0.4
    d_margin: float = 0.4
    probs_momentum: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("e_margin", self.e_margin, low=0.0, low_open=True)
        check_range("d_margin", self.d_margin, low=0.0, high=1.0)
        check_range("probs_momentum", self.probs_momentum, low=0.0, high=1.0)


@register("eta")
class ETA(AdaptedModel):
    """Entropy minimisation on reliable, non-redundant samples, weighted by confidence (EATA without Fisher)."""

    Config = ETAConfig
    update = "gradient"
    presets: ClassVar[dict[str, dict[str, Any]]] = {"imagenet": IMAGENET, "vit": VIT}

    def check_model(self, model: nn.Module) -> None:
        check_norm_affine(model, self.name)

    def configure(self, model: nn.Module) -> nn.Module:
        return eval_with_batch_statistics(model, norm_affine_params(model))

    def setup(self) -> None:
        self.add_state("model_probs", torch.zeros(0), dynamic=True)  # empty until the first selection

    def params(self) -> list[nn.Parameter]:
        return norm_affine_params(self.model)

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        logits = self.model(x)
        ent = entropy(logits)
        e0 = entropy_margin(logits.shape[1], self.config.e_margin)
        ids = reliable(ent, e0)
        selected = ent[ids]
        probs = logits[ids].softmax(1)
        ema = self.model_probs
        if ema.numel():
            cos = F.cosine_similarity(ema.unsqueeze(0), probs, dim=1)
            keep = torch.where(cos.abs() < self.config.d_margin)[0]
            selected, probs = selected[keep], probs[keep]
        with torch.no_grad():
            if probs.shape[0]:
                m = self.config.probs_momentum
                mean = probs.mean(0)
                self.model_probs = m * ema + (1 - m) * mean if ema.numel() else mean
        coeff = 1 / torch.exp(selected.detach() - e0)
        loss = selected.mul(coeff).mean(0)
        return StepOutput(logits.detach(), loss, n_used=selected.shape[0], diagnostics={
            "entropy": ent.detach().mean(), "reliable": torch.tensor(ids.shape[0]),
            "used": torch.tensor(selected.shape[0])})
