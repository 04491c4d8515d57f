"""Helpers for mean-teacher methods (CoTTA, RoTTA): the parameters they train and CoTTA's stochastic restore."""

from __future__ import annotations

import torch
from torch import nn


def weight_and_bias(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter named ``weight`` or ``bias`` in its own module, in module order.

    The reference benchmark's parameter set for its teacher-student methods: other parameters (e.g. a vision
    transformer's position embedding) stay fixed.
    """
    return [p for m in model.modules() for name, p in m.named_parameters(recurse=False) if name in ("weight", "bias")]


@torch.no_grad()
def stochastic_restore(params: list[nn.Parameter], sources: list[torch.Tensor], prob: float) -> None:
    """Return each element of ``params`` to its value in ``sources`` independently with probability ``prob``."""
    if prob <= 0:
        return
    for p, source in zip(params, sources, strict=True):
        restore = torch.rand(p.shape, device=p.device) < prob
        p.copy_(torch.where(restore, source, p))


__all__ = ["stochastic_restore", "weight_and_bias"]
