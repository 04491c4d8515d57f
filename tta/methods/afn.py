"""AFN test-time finetuning: every BatchNorm2d becomes an AFN layer, trained by Tent's entropy minimisation.

Every BatchNorm2d is converted to an AFN layer (gamma/beta copied into gamma_bias/beta_bias), everything outside
the AFN layers is frozen, and each batch takes Tent's step (Adam 1e-3, one step, mean softmax entropy), returning
the logits computed before the update. ``trainable`` chooses the AFN parameters that train: ``affine``
(gamma_bias, beta_bias and the lambdas) or ``all`` (also the encoders and decoders). ``afn_checkpoint`` loads a
source warm-up made by ``tta.warmup.warmup_afn`` (``tta warmup``) instead of starting from the identity init; a
model loaded from such a warm-up's checkpoint (``load_model(checkpoint=FILE)``) already has its AFN layers and is
used as it is.
The model stays in eval mode: AFN always normalises with batch statistics, and eval only switches off dropout,
so predictions are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tta.errors import ModelError
from tta.methods.base import AdaptedModel
from tta.methods.tent import OptimizerConfig, entropy_step, make_optimizer
from tta.norm.afn import afn_layers, afn_parameters, convert_to_afn
from tta.registry import register
from tta.warmup import apply_afn_checkpoint


@dataclass(frozen=True)
class AFNConfig(OptimizerConfig):
    """Settings of ``afn``: Tent's optimiser defaults plus the AFN layer settings and an optional warm-up file."""

    trainable: Literal["affine", "all"] = "affine"
    lambda_init: Literal["paper", "official"] = "paper"
    identity_init: bool = True
    source_prior_n: float | None = None
    afn_checkpoint: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source_prior_n is not None and self.source_prior_n < 0:
            raise ValueError(f"source_prior_n must be >= 0 or null, got {self.source_prior_n}")


def require_batchnorm2d(model: nn.Module, source_prior: bool) -> None:
    """``ModelError`` unless ``model`` has a BatchNorm2d to convert (with running statistics if the prior is on)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        raise ModelError("afn converts BatchNorm2d layers and this model has none; use a BN network "
                         "(or tent for LayerNorm/GroupNorm models)")
    if source_prior and any(bn.running_mean is None for bn in bns):
        raise ModelError("source_prior_n needs the BatchNorm running statistics, but some layers were built with "
                         "track_running_stats=False; load the model with its running statistics or unset it")


@register("afn")
class AFNMethod(AdaptedModel):
    """BN-to-AFN conversion, then entropy minimisation on the AFN parameters at test time."""

    Config = AFNConfig

    def check_model(self, model: nn.Module) -> None:
        if not afn_layers(model):  # a model loaded from a warm-up checkpoint is converted already
            require_batchnorm2d(model, self.config.source_prior_n is not None)

    def configure(self, model: nn.Module) -> nn.Module:
        cfg = self.config
        model = super().configure(model)
        if afn_layers(model):
            if cfg.afn_checkpoint is not None:
                raise ModelError("the model already has AFN layers (it was loaded from a warm-up checkpoint), so "
                                 "afn_checkpoint has nothing to apply to; drop --afn-checkpoint")
            for layer in afn_layers(model):
                layer.source_prior_n = None if cfg.source_prior_n is None else float(cfg.source_prior_n)
        elif cfg.afn_checkpoint is not None:
            model = apply_afn_checkpoint(model, cfg.afn_checkpoint, source_prior_n=cfg.source_prior_n)
        else:
            convert_to_afn(model, lambda_init=cfg.lambda_init, identity_init=cfg.identity_init,
                           source_prior_n=cfg.source_prior_n)
        model.eval()
        model.requires_grad_(False)
        for p in self.params_of(model):
            p.requires_grad_(True)
        return model

    def params_of(self, model: nn.Module) -> list[nn.Parameter]:
        """The configured trainable set of ``model``'s AFN layers."""
        return afn_parameters(model, self.config.trainable)

    def params(self) -> list[nn.Parameter]:
        return self.params_of(self.model)

    def make_optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.params(), self.config)

    def adapt(self, x: torch.Tensor, domain: torch.Tensor | None) -> torch.Tensor:
        if self.config.episodic:
            self.reset()
        return entropy_step(self, x, self.config.steps)
