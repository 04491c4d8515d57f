"""Choosing and optimising the parameters a method adapts.

``norm_affine_params`` is Tent's parameter set (the affine weight and bias of every normalisation layer);
``force_batch_statistics`` is Tent's model configuration for BatchNorm; ``OptimizerConfig`` and
``make_optimizer`` are the optimiser settings every gradient method shares (one meaning per key: ``momentum`` is
SGD's momentum, never an EMA rate).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.core.validate import check_range
from tta.errors import ModelError
from tta.norm.convert import NORM_TYPES


@dataclass(frozen=True)
class OptimizerConfig:
    """Optimiser settings shared by the gradient methods (defaults: the reference CIFAR-10-C setup, Adam 1e-3).

    ``momentum``, ``dampening`` and ``nesterov`` apply to SGD only, ``betas`` to Adam/AdamW only. ``steps`` updates
    per batch; ``reset_every`` > 0 resets the whole method after that many updates (1 = episodic: back to the
    source before every batch; RDumb uses 1000).
    """

    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = 0.9
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    steps: int = 1
    reset_every: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {self.steps}")
        if isinstance(self.reset_every, bool) or not isinstance(self.reset_every, int) or self.reset_every < 0:
            raise ValueError(f"reset_every must be an integer >= 0 (0 = never), got {self.reset_every}")
        check_range("lr", self.lr, low=0.0, low_open=True)
        check_range("weight_decay", self.weight_decay, low=0.0)
        check_range("momentum", self.momentum, low=0.0, high=1.0, high_open=True)
        check_range("dampening", self.dampening, low=0.0, high=1.0)
        for b in self.betas:
            check_range("betas", b, low=0.0, high=1.0, high_open=True)
        if self.nesterov and self.optimizer == "sgd" and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening 0; set nesterov: false or change them")


# The reference benchmark's ImageNet-C optimiser (ResNet-50, batch 64): SGD with Nesterov momentum. Methods build
# their `imagenet` presets on it.
IMAGENET_SGD: dict[str, object] = {"optimizer": "sgd", "lr": 2.5e-4, "momentum": 0.9, "nesterov": True}
# ViT-B/16 on ImageNet-C, batch 64, as SAR's and DeYO's official code run Tent, EATA, SAR and DeYO on it: SGD at
# lr 0.001 (their 0.001 / 64 x batch size), momentum 0.9 without Nesterov.
VIT_SGD: dict[str, object] = {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "nesterov": False}


def make_optimizer(params: Iterable[nn.Parameter] | list[dict], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD over ``params`` (parameters or parameter groups) with ``cfg``'s settings."""
    params = list(params)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, dampening=cfg.dampening,
                           weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm, LayerNorm and GroupNorm layer of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, NORM_TYPES)]


def norm_affine_params(model: nn.Module) -> list[nn.Parameter]:
    """Affine weight and bias of every BatchNorm, LayerNorm and GroupNorm layer (and the affine and proxy parameters
    of every Proxy Normalization PN-Act), in module order."""
    from tta.norm.proxy_norm import adaptable_parameters

    return [p for m in model.modules() for p in adaptable_parameters(m)]


def check_norm_affine(model: nn.Module, method: str) -> None:
    """A ``ModelError`` naming ``method`` when ``model`` has no norm affine parameters (``norm_affine_params``)."""
    if not norm_affine_params(model):
        raise ModelError(f"{method} adapts the affine parameters of BatchNorm, LayerNorm or GroupNorm layers, and "
                         "this model has none; use a model with affine norm layers or the source method")


def force_batch_statistics(model: nn.Module) -> None:
    """Make every BatchNorm normalise with the statistics of the current batch, in any mode (running stats dropped)."""
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None


def train_only(model: nn.Module, params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """Freeze every parameter of ``model`` but ``params``; returns ``params`` as a list."""
    params = list(params)
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * source`` over the floating-point parameters (a mean teacher)."""
    with torch.no_grad():
        t = [p for p in target.parameters()]
        s = [p for p in source.parameters()]
        torch._foreach_mul_(t, momentum)
        torch._foreach_add_(t, s, alpha=1 - momentum)


__all__ = [
    "IMAGENET_SGD", "VIT_SGD", "OptimizerConfig", "ema_update", "force_batch_statistics", "make_optimizer",
    "norm_affine_params", "norm_layers", "train_only",
]
