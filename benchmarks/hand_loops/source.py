"""The source model: eval mode, no updates."""

import torch
from torch import nn


def make(model: nn.Module, device: torch.device, source: object = None):
    model.eval()

    @torch.no_grad()
    def step(x: torch.Tensor) -> torch.Tensor:
        return model(x)

    return step
