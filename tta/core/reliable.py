"""Pieces shared by the reliable-entropy methods (EATA, ETA, RDumb, SAR).

They run the whole model in eval mode while every BatchNorm normalises with the statistics of the current batch
(so stochastic layers such as dropout or stochastic depth stay off), train only the chosen norm affine parameters,
and call a prediction reliable when its softmax entropy is below ``fraction * ln(C)``.
"""

from __future__ import annotations

import torch
from torch import nn

from tta.core.params import force_batch_statistics, train_only


def eval_with_batch_statistics(model: nn.Module, params: list[nn.Parameter]) -> nn.Module:
    """Eval mode, batch statistics forced in every BatchNorm, only ``params`` trainable; returns ``model``."""
    model.eval()
    force_batch_statistics(model)
    train_only(model, params)
    return model


def reliable(entropies: torch.Tensor, margin: float) -> torch.Tensor:
    """Indices of the samples whose entropy is below ``margin`` (in batch order)."""
    return torch.where(entropies < margin)[0]


__all__ = ["eval_with_batch_statistics", "reliable"]
