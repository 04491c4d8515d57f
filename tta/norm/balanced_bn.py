"""TRIBE's balanced batch normalisation: class-balanced statistics that follow the test stream.

The layer keeps a mean and a variance per class (``local_mean``/``local_var``, (K, C), all starting at the source
running statistics) and normalises with their balanced combination: ``mean = mean_k local_mean_k`` and
``var = mean_k local_var_k + var_k(local_mean_k)`` (the unbiased variance over the K classes), so that every class
weighs the same however many of its images a batch holds.

In training mode, a forward inside ``class_labels(model, labels)`` first moves the statistics of the classes in the
batch towards their images (``labels``: one pseudo-label per image). With ``n_k`` images of class ``k``, rate
``m_k = 1 / n_k`` when ``n_k > 1 / eta``, else ``eta``, and ``delta_k = m_k * sum_{i in k} (mean_i - local_mean_k)``
(``mean_i``: image i's mean over its spatial positions):

- ``local_mean_k += (1 - gamma) * delta_k``, then every class's mean moves by ``gamma * mean_k(delta_k)``;
- ``local_var_k += (1 - gamma) * (m_k * (S_k - n_k * local_var_k) - delta_k^2)``, where ``S_k`` sums each image's
  mean squared deviation from the old ``local_mean_k``; then every class's variance moves by ``gamma * (mean_k(m_k
  S_k - delta_k^2) - mean_k(m_k n_k) * local_var)``.

``gamma`` shares each update with the classes absent from the batch (0: none). Gradients flow through this batch's
part of the statistics, as they do through batch statistics. Outside ``class_labels``, and in eval mode, the layer
normalises with the stored statistics and changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.norm.robust_bn import normalize_affine


class BalancedBN(nn.Module):
    """A BatchNorm layer with per-class statistics combined class-balanced (see the module doc)."""

    def __init__(self, bn: _BatchNorm, num_classes: int, eta: float, gamma: float) -> None:
        super().__init__()
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("BalancedBN starts from source running statistics; this BatchNorm has none")
        self.num_classes, self.eta, self.gamma, self.eps = num_classes, eta, gamma, bn.eps
        mean, var = bn.running_mean.detach(), bn.running_var.detach()
        self.register_buffer("local_mean", mean.expand(num_classes, -1).clone())
        self.register_buffer("local_var", var.expand(num_classes, -1).clone())
        self.register_buffer("mean", mean.clone())
        self.register_buffer("var", var.clone())
        self.weight = None if bn.weight is None else nn.Parameter(bn.weight.detach().clone())
        self.bias = None if bn.bias is None else nn.Parameter(bn.bias.detach().clone())
        self.labels: torch.Tensor | None = None  # set by class_labels() for one forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        if self.training and self.labels is not None:
            local_mean, local_var = self.updated_statistics(x, self.labels)
            mean, var = balanced_statistics(local_mean, local_var)
            with torch.no_grad():  # in place: the buffers stay the same tensors
                for buffer, value in ((self.local_mean, local_mean), (self.local_var, local_var),
                                      (self.mean, mean), (self.var, var)):
                    buffer.copy_(value)
        else:
            mean, var = self.mean, self.var
        return normalize_affine(x, mean, var, self.eps, self.weight, self.bias, shape)

    def updated_statistics(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-class statistics after taking in ``x`` with ``labels`` (not stored; gradients through ``x``)."""
        if labels.shape != (x.shape[0],):
            raise ValueError(f"expected one label per image ({x.shape[0]}), got shape {tuple(labels.shape)}")
        spatial = tuple(range(2, x.ndim))
        classes, index, counts = labels.unique(return_inverse=True, return_counts=True)
        old = self.local_mean[labels]  # (N, C): each image's class mean before the update
        centred = x - old.view(*old.shape, *(1,) * len(spatial))
        first = centred.mean(spatial) if spatial else centred
        second = centred.pow(2).mean(spatial) if spatial else centred.pow(2)
        k, c = len(classes), x.shape[1]
        n = counts.to(x.dtype)
        rate = torch.where(n > 1.0 / self.eta, 1.0 / n, torch.full_like(n, self.eta)).view(k, 1)
        delta = rate * x.new_zeros(k, c).index_add(0, index, first)
        squares = x.new_zeros(k, c).index_add(0, index, second)
        g = self.gamma
        local_mean = self.local_mean.index_add(0, classes, (1 - g) * delta)
        local_mean = local_mean + g * delta.mean(0, keepdim=True)
        old_var = self.local_var[classes]
        local_var = self.local_var.index_add(0, classes, (1 - g) * (rate * (squares - n.view(k, 1) * old_var)
                                                                     - delta.pow(2)))
        gap = (rate * squares - delta.pow(2)).mean(0, keepdim=True)
        local_var = local_var + g * (gap - (rate.view(-1) * n).mean() * local_var)
        return local_mean, local_var

    def extra_repr(self) -> str:
        return f"{self.mean.numel()}, classes={self.num_classes}, eta={self.eta}, gamma={self.gamma}, eps={self.eps}"


def balanced_statistics(local_mean: torch.Tensor, local_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The class-balanced mean and variance of per-class statistics (K, C): every class weighs ``1 / K``."""
    return local_mean.mean(0), local_var.mean(0) + local_mean.var(0)


@contextmanager
def class_labels(model: nn.Module, labels: torch.Tensor) -> Iterator[None]:
    """Within the block, every ``BalancedBN`` of ``model`` in training mode updates its statistics with ``labels``."""
    layers = [m for m in model.modules() if isinstance(m, BalancedBN)]
    for m in layers:
        m.labels = labels
    try:
        yield
    finally:
        for m in layers:
            m.labels = None


__all__ = ["BalancedBN", "balanced_statistics", "class_labels"]
