"""Tent: test-time entropy minimisation on the affine parameters of norm layers (Wang et al., ICLR 2021).

As the official code: BatchNorm layers always use batch statistics (running statistics dropped), only the affine
parameters of BatchNorm/LayerNorm/GroupNorm train, one Adam step per batch on the mean softmax entropy, and the
returned logits are those computed before the update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.errors import InputError, ModelError
from tta.methods.base import AdaptedModel, entropy
from tta.norm.proxy_norm import adaptable_parameters
from tta.registry import register


@dataclass(frozen=True)
class OptimizerConfig:
    """Tent's optimiser settings (CIFAR-10-C defaults of the paper), shared by the entropy-minimisation methods."""

    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    weight_decay: float = 0.0
    steps: int = 1
    episodic: bool = False

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")


@dataclass(frozen=True)
class TentConfig(OptimizerConfig):
    """Settings of ``tent``: the optimiser's plus the mode the rest of the model runs in."""

    model_mode: Literal["train", "eval"] = "train"


def norm_affine_params(model: nn.Module) -> list[nn.Parameter]:
    """Affine weight and bias of every BatchNorm, LayerNorm and GroupNorm layer (and the affine and proxy parameters
    of every Proxy Normalization PNAct), in module order."""
    return [p for m in model.modules() for p in adaptable_parameters(m)]


def make_optimizer(params: list[nn.Parameter], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """Adam or SGD over ``params`` with Tent's settings (shared by the methods that reuse Tent's optimiser)."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def entropy_step(adapted: AdaptedModel, x: torch.Tensor, steps: int, **kwargs: object) -> torch.Tensor:
    """``steps`` rounds of forward, mean-entropy backward and optimizer step; the last pre-update logits."""
    assert adapted.optimizer is not None
    for _ in range(steps):
        logits = adapted.model(x, **kwargs)
        entropy(logits).mean().backward()
        adapted.optimizer.step()
        adapted.optimizer.zero_grad(set_to_none=True)
    return logits.detach()


@register("tent")
class Tent(AdaptedModel):
    """Entropy minimisation on norm affine parameters, batch statistics forced in every BatchNorm."""

    Config = TentConfig

    def check_model(self, model: nn.Module) -> None:
        if not norm_affine_params(model):
            raise ModelError("tent adapts the affine parameters of BatchNorm, LayerNorm or GroupNorm layers, and "
                             "this model has none; use a model with affine norm layers or the source method")

    def configure(self, model: nn.Module) -> nn.Module:
        model.train(self.config.model_mode == "train")
        model.requires_grad_(False)
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                # Always normalise with the statistics of the current batch, as the official code does.
                m.track_running_stats = False
                m.running_mean = None
                m.running_var = None
        for p in norm_affine_params(model):
            p.requires_grad_(True)
        self.has_bn1d = any(isinstance(m, nn.BatchNorm1d) for m in model.modules())
        return model

    def params(self) -> list[nn.Parameter]:
        return norm_affine_params(self.model)

    def make_optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.params(), self.config)

    def check_input(self, x: torch.Tensor, domain: torch.Tensor | int | None = None) -> torch.Tensor | None:
        domain = super().check_input(x, domain)
        if x.shape[0] < 2 and self.has_bn1d:
            raise InputError("tent normalises with batch statistics and this model has BatchNorm1d layers, which "
                             "need at least 2 images per batch; use a larger batch")
        return domain

    def adapt(self, x: torch.Tensor, domain: torch.Tensor | None) -> torch.Tensor:
        if self.config.episodic:
            self.reset()
        return entropy_step(self, x, self.config.steps)
