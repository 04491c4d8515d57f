"""The ``proxy-norm`` warm-up conversion (Labatie et al. 2021): every BN -> activation becomes a per-image norm ->
PN-Act (``tta.norm.proxy_norm``). The normalisation changes from the training set's statistics to each image's own,
so every parameter trains; by default with cross-entropy plus distillation from the original BN model's logits, after
a calibration that makes the converted layers mimic BN."""

from __future__ import annotations

from typing import Any

from torch import nn

from tta.norm.proxy_norm import calibrate_proxy_norm, convert_to_proxy_norm
from tta.warmup.registry import Conversion, register_conversion


def _convert(model: nn.Module, settings: dict[str, Any]) -> nn.Module:
    return convert_to_proxy_norm(model, norm=settings["norm"], groups=settings["groups"], eps=settings["eps"])


PROXY_NORM = register_conversion(Conversion(
    name="proxy-norm",
    settings={"norm": "layer", "groups": 8, "eps": 1e-5},
    recipe={"loss": "ce+distill", "schedule": "cosine", "epochs": 12},  # see the Proxy Normalization docs
    convert=_convert,
    trainable=lambda model: list(model.parameters()),
    train_mode=lambda model: model.train(),
    adapt_with="--method stream-stats --batch-size 1 --source-data {source}",  # batch-independent by design
    calibrate=calibrate_proxy_norm,  # type: ignore[arg-type]
))
