"""The unadapted source model in eval mode: the baseline every method is compared with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tta.methods.base import AdaptedModel
from tta.registry import register


@dataclass(frozen=True)
class SourceConfig:
    """The source model has no settings."""


@register("source")
class Source(AdaptedModel):
    """Predict with the pretrained model as it is (eval mode, no updates)."""

    Config = SourceConfig

    def adapt(self, x: torch.Tensor, domain: torch.Tensor | None) -> torch.Tensor:
        return self.model(x)
