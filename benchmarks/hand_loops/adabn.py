"""Prediction-time BN: every BatchNorm normalises with the batch's statistics."""

import torch
from torch import nn


def make(model: nn.Module, device: torch.device, source: object = None):
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.track_running_stats, m.running_mean, m.running_var = False, None, None

    @torch.no_grad()
    def step(x: torch.Tensor) -> torch.Tensor:
        return model(x)

    return step
