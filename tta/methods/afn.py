"""AFN test-time finetuning: every BatchNorm2d becomes an AFN layer, trained by Tent's entropy minimisation.

Every BatchNorm2d is converted to an AFN layer (gamma/beta copied into gamma_bias/beta_bias), everything outside
the AFN layers is frozen, and each batch takes Tent's step (Adam 1e-3, one step, mean softmax entropy), returning
the logits computed before the update. ``trainable`` chooses the AFN parameters that train: ``affine``
(gamma_bias, beta_bias and the lambdas) or ``all`` (also the encoders and decoders). ``afn_checkpoint`` loads a
source warm-up made by ``tta.warmup_afn`` (``tta warmup``) instead of starting from the identity init; a
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

from tta.core.base import AdaptedModel, StepOutput
from tta.core.losses import entropy_objective
from tta.core.params import OptimizerConfig, train_only
from tta.core.requirements import Requirements, check_requirements
from tta.core.validate import check_range
from tta.errors import ModelError
from tta.norm.afn import afn_layers, afn_parameters, convert_to_afn
from tta.registry import register
from tta.warmup.checkpoint import apply_afn_checkpoint


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
        if self.source_prior_n is not None:
            check_range("source_prior_n", self.source_prior_n, low=0.0, allow_inf=True)


@register("afn")
class AFNMethod(AdaptedModel):
    """BN-to-AFN conversion, then entropy minimisation on the AFN parameters at test time."""

    Config = AFNConfig
    update = "gradient"

    def check_model(self, model: nn.Module) -> None:
        if not afn_layers(model):  # a model loaded from a warm-up checkpoint is converted already
            check_requirements(Requirements(norm_layers=(nn.BatchNorm2d,),
                                            running_stats=self.config.source_prior_n is not None),
                               model, "afn", None)

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
        train_only(model, self.params_of(model))
        return model

    def params_of(self, model: nn.Module) -> list[nn.Parameter]:
        """The configured trainable set of ``model``'s AFN layers."""
        return afn_parameters(model, self.config.trainable)

    def params(self) -> list[nn.Parameter]:
        return self.params_of(self.model)

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        return entropy_objective(self.model(x))
