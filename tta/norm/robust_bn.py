"""RoTTA's robust batch normalisation: statistics that follow the test stream by an exponential moving average.

In training mode the layer normalises with ``(1 - alpha) * stored + alpha * batch`` statistics (biased batch
variance, gradients through the batch part) and stores them; in eval mode it normalises with the stored ones. The
stored statistics start as the source running statistics.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def normalize_affine(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float,
                     weight: torch.Tensor | None, bias: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias``, each per-channel tensor viewed as ``shape`` (no weight or
    bias when ``None``)."""
    x = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if weight is not None:
        x = x * weight.view(shape)
    if bias is not None:
        x = x + bias.view(shape)
    return x


class RobustBN(nn.Module):
    """A BatchNorm layer whose statistics move towards each training batch's by ``alpha``."""

    def __init__(self, bn: _BatchNorm, alpha: float) -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("RobustBN starts from source running statistics; this BatchNorm has none")
        self.alpha = alpha
        self.eps = bn.eps
        self.register_buffer("mean", bn.running_mean.detach().clone())
        self.register_buffer("var", bn.running_var.detach().clone())
        self.weight = None if bn.weight is None else nn.Parameter(bn.weight.detach().clone())
        self.bias = None if bn.bias is None else nn.Parameter(bn.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        if self.training:
            dims = [0, *range(2, x.ndim)]
            var, mean = torch.var_mean(x, dim=dims, unbiased=False)
            mean = (1 - self.alpha) * self.mean + self.alpha * mean
            var = (1 - self.alpha) * self.var + self.alpha * var
            with torch.no_grad():  # in place: the buffers stay the same tensors
                self.mean.copy_(mean)
                self.var.copy_(var)
        else:
            mean, var = self.mean, self.var
        return normalize_affine(x, mean, var, self.eps, self.weight, self.bias, shape)

    def extra_repr(self) -> str:
        return f"{self.mean.numel()}, alpha={self.alpha}, eps={self.eps}"


__all__ = ["RobustBN"]
