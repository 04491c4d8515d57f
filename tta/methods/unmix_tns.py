"""UnMix-TNS alone: every BatchNorm becomes an UnMix-TNS layer and nothing trains (Tomar et al., ICLR 2024).

The normalisation-only variant of the paper (its ``source`` model with UnMix-TNS layers): each image is normalised
with K statistics components mixed with its own instance statistics, and the components follow the images assigned
to them (see ``tta.norm.unmix_tns``). An image's prediction depends on the stream before it, not on its batch-mates,
so single images need no sliding window. To put the layer under a method that trains, use that method's
``norm=unmix-tns`` setting (tent, roid, rotta).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from tta.core.base import AdaptedModel, StepOutput
from tta.core.requirements import Requirements
from tta.errors import ConfigError
from tta.norm.unmix_tns import UnMixSettings, convert_to_unmix_tns
from tta.registry import register


@dataclass(frozen=True)
class UnMixTNSConfig(UnMixSettings):
    """Settings of ``unmix-tns``: ``components`` K (the paper: 16, 128 on mixed-domain streams), the update
    ``momentum`` per ``reference_batch`` images, the assignment's softmax ``temperature``, the share of the source
    variance the initial components spread their means over (``spread``), the ``seed`` of that draw, and the
    ``batch_size`` the update rate is computed for (0: each forward pass's own size)."""


@register("unmix-tns")
class UnMixTNSMethod(AdaptedModel):
    """BatchNorm replaced by K statistics components mixed per image with its own statistics; nothing trains."""

    Config = UnMixTNSConfig
    requires = Requirements(norm_layers=(nn.BatchNorm2d,), running_stats=True)
    sliding_window: ClassVar[bool] = False

    def check_model(self, model: nn.Module) -> None:
        if self.window > 1:
            raise ConfigError("unmix-tns normalises each image on its own: a sliding window would count its images "
                              "several times; use window=0 (--window 0)")

    def configure(self, model: nn.Module) -> nn.Module:
        model = super().configure(model)
        convert_to_unmix_tns(model, self.config)
        return model

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        return StepOutput(self.model(x))
