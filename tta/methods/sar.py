"""SAR: sharpness-aware and reliable entropy minimisation with model recovery (Niu et al., ICLR 2023).

As the reference benchmark's code: the model runs in eval mode with batch statistics forced in every BatchNorm;
the affine parameters of the norm layers train, except those of the top layers the reference leaves alone (module
names containing ``layer4``, ``blocks.9``, ``blocks.10``, ``blocks.11`` or ``norm.``, or named ``norm``; with
``freeze_final_norm``, also any layer whose name ends in ``norm``, as SAR's official ViT runs). The first pass
minimises the mean entropy of the reliable samples (entropy below ``e_margin * ln C``); SAM moves the weights
by ``rho`` along that gradient, and the second pass takes the mean entropy of the first pass's reliable samples that
are still reliable at the moved weights; the base optimizer steps with that gradient at the original weights. An
EMA (``ema_momentum``) of the second-pass loss below ``reset_constant_em`` resets the whole method.

The reference's SAR always wraps SGD (momentum 0.9, no Nesterov) in SAM, at ``lr`` 1e-3 on CIFAR whatever its
optimizer setting says; these defaults reproduce that. A batch with no reliable sample is not an update (the
reference still takes an SGD step of its momentum on it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from tta.core.base import AdaptedModel, StepOutput
from tta.core.losses import entropy, entropy_margin
from tta.core.params import OptimizerConfig, norm_layers
from tta.core.reliable import eval_with_batch_statistics, reliable
from tta.core.validate import check_range
from tta.errors import ModelError
from tta.registry import register

# Module-name parts whose norm layers SAR leaves frozen (the top of ResNets and ViT-Base, and a ViT's final norm).
FROZEN_PARTS = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm.")


@dataclass(frozen=True)
class SARConfig(OptimizerConfig):
    """Settings of ``sar``: SGD (momentum 0.9) at 1e-3, the reliability margin (a fraction of ln C), SAM's radius
    ``rho`` and the recovery rule (EMA rate of the second-pass loss and the threshold that resets)."""

    optimizer: Literal["adam", "adamw", "sgd"] = "sgd"
    e_margin: float = 0.4
    rho: float = 0.05
    reset_constant_em: float = 0.2
    ema_momentum: float = 0.9
    freeze_final_norm: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("e_margin", self.e_margin, low=0.0, low_open=True)
        check_range("rho", self.rho, low=0.0)
        check_range("reset_constant_em", self.reset_constant_em, low=0.0)
        check_range("ema_momentum", self.ema_momentum, low=0.0, high=1.0)


def sar_params(model: nn.Module, freeze_final_norm: bool = False) -> list[nn.Parameter]:
    """Affine parameters of the norm layers outside SAR's frozen top layers, in module order; with
    ``freeze_final_norm`` also outside any layer named ``norm`` (a ViT's final norm, inside a wrapper too)."""
    layers = set(map(id, norm_layers(model)))
    return [p for name, m in model.named_modules()
            if id(m) in layers and name != "norm" and not any(part in name for part in FROZEN_PARTS)
            and not (freeze_final_norm and name.rsplit(".", 1)[-1] == "norm")
            for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if isinstance(p, nn.Parameter)]


@register("sar")
class SAR(AdaptedModel):
    """Sharpness-aware entropy minimisation on reliable samples, reset when the loss EMA collapses."""

    Config = SARConfig
    update = "sam"
    # vit: SAR's official ViT-B/16 runs (batch 64): lr 0.001, and the final norm frozen as its unwrapped timm model's
    # top-level "norm" is there (the reference adapts it: behind its normalisation wrapper the name no longer matches).
    presets: ClassVar[dict[str, dict[str, Any]]] = {"imagenet": {"lr": 2.5e-4},
                                                    "vit": {"lr": 1e-3, "freeze_final_norm": True}}

    def check_model(self, model: nn.Module) -> None:
        if not sar_params(model, self.config.freeze_final_norm):
            raise ModelError("sar adapts the affine parameters of BatchNorm, LayerNorm or GroupNorm layers below the "
                             "top layers, and this model has none; use a model with such layers or another method")

    def configure(self, model: nn.Module) -> nn.Module:
        return eval_with_batch_statistics(model, sar_params(model, self.config.freeze_final_norm))

    def setup(self) -> None:
        self.add_state("loss_ema", None)  # EMA of the second-pass loss; None until the first finite one
        self._reliable = torch.zeros(0, dtype=torch.long)  # the first pass's reliable samples, for the second

    def params(self) -> list[nn.Parameter]:
        return sar_params(self.model, self.config.freeze_final_norm)

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        logits = self.model(x)
        ent = entropy(logits)
        self._reliable = reliable(ent, entropy_margin(logits.shape[1], self.config.e_margin))
        return StepOutput(logits.detach(), ent[self._reliable].mean(0), n_used=self._reliable.shape[0],
                          diagnostics={"entropy": ent.detach().mean(),
                                       "reliable": torch.tensor(self._reliable.shape[0])})

    def sam_loss(self, x: torch.Tensor, domain: torch.Tensor | None, first: StepOutput) -> torch.Tensor:
        logits = self.model(x)
        ent = entropy(logits)[self._reliable]
        ent = ent[reliable(ent, entropy_margin(logits.shape[1], self.config.e_margin))]
        loss = ent.mean(0)  # NaN when nothing stays reliable: zero gradients, as the reference
        value = loss.item()
        if not math.isnan(value):
            m = self.config.ema_momentum
            self.loss_ema = value if self.loss_ema is None else m * self.loss_ema + (1 - m) * value
        return loss

    def after_step(self, x: torch.Tensor, domain: torch.Tensor | None, out: StepOutput) -> StepOutput:
        if self.loss_ema is not None and self.loss_ema < self.config.reset_constant_em:
            self.reset()
        return out
