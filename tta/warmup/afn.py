"""The ``afn`` warm-up conversion (Zhou & Chen 2023): every BatchNorm2d becomes an AFN layer and only the AFN
parameters train, with cross-entropy, while every pretrained weight stays frozen in eval mode (the official recipe)."""

from __future__ import annotations

from typing import Any

from torch import nn

from tta.errors import ModelError
from tta.norm.afn import afn_layers, afn_parameters, convert_to_afn
from tta.warmup.registry import Conversion, register_conversion


def _convert(model: nn.Module, settings: dict[str, Any]) -> nn.Module:
    convert_to_afn(model, lambda_init=settings["lambda_init"], identity_init=settings["identity_init"],
                   p_drop=settings["p_drop"])
    return model


def _train_mode(model: nn.Module) -> None:
    """Only the AFN layers in train mode (dropout on their statistic vectors); the rest stays in eval mode."""
    model.eval()
    for layer in afn_layers(model):
        layer.train()


def _check(model: nn.Module) -> None:
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise ModelError("the afn warm-up converts BatchNorm2d layers to AFN and this model has none; use a BN network")


AFN = register_conversion(Conversion(
    name="afn",
    settings={"lambda_init": "paper", "identity_init": True, "p_drop": 0.3},
    recipe={"loss": "ce", "schedule": "constant", "epochs": 5},
    convert=_convert,
    trainable=lambda model: afn_parameters(model, "all"),
    train_mode=_train_mode,
    adapt_with="--method afn",
    check=_check,
))
