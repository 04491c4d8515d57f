"""EATA: ETA's loop plus fisher_alpha (1.0) * sum F (theta - theta0)^2, F from the clean source images."""

import torch
from torch import nn

from hand_loops import eta


def make(model: nn.Module, device: torch.device, source: object = None):
    return eta.make(model, device, source, fisher_alpha=1.0)
