"""Input normalisation inside the model, so that every model takes [0, 1] images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Per-channel (x - mean) / std, so that the wrapped model takes [0, 1] images."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def normalized(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Sequential:
    """``model`` preceded by input normalisation, as one module (``[0]`` normalises, ``[1]`` is the model)."""
    return nn.Sequential(Normalize(mean, std), model)
