"""The unadapted source model in eval mode: the baseline every method is compared with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tta.core.base import AdaptedModel, StepOutput
from tta.registry import register


@dataclass(frozen=True)
class SourceConfig:
    """The source model has no settings."""


@register("source")
class Source(AdaptedModel):
    """The pretrained model as it is (eval mode, no updates): the baseline."""

    Config = SourceConfig

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        return StepOutput(self.model(x))
