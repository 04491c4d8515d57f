"""AdaptiveBN: one layer for source, batch, prior, EMA and cumulative BN statistics (docs/methods/statistics.md).

Statistics are per channel over every dimension but the channel one. ``batch`` normalises with the batch mean
and biased variance (prediction-time BN, Tent's "norm" baseline); ``prior`` blends the source statistics with
the batch's using the source pseudo-count ``prior_n`` (Schneider et al. 2020); ``ema`` updates an exponential
moving average initialised from the source before using it; ``cumulative`` pools every target value seen so far
exactly (Chan's parallel merge in float64); ``cumulative_prior`` blends that pool with the source by image counts;
``alpha`` is the reference benchmark's BN-alpha: (1 - alpha) source + alpha batch statistics (unbiased batch
variance), whatever the batch size.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.norm.convert import Float64State, replace_batchnorms
from tta.norm.moments import merge_moments

Mode = Literal["source", "batch", "prior", "alpha", "ema", "cumulative", "cumulative_prior"]
MODES: tuple[str, ...] = ("source", "batch", "prior", "alpha", "ema", "cumulative", "cumulative_prior")


def blend_prior(
    src_mean: torch.Tensor,
    src_var: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    n: float | torch.Tensor,
    prior_n: float,
    exact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Schneider et al.'s blend: source weight N/(N+n), target weight n/(N+n).

    ``exact`` adds the between-component term N n/(N+n)^2 (mu_s - mu_t)^2, giving the variance of the pooled
    mixture; the official code omits it. ``prior_n = inf`` returns the source statistics.
    """
    if math.isinf(prior_n):
        return src_mean, src_var
    a, b = prior_n / (prior_n + n), n / (prior_n + n)
    out_mean = a * src_mean + b * mean
    out_var = a * src_var + b * var
    if exact:
        out_var = out_var + a * b * (src_mean - mean) ** 2
    return out_mean, out_var


class AdaptiveBN(Float64State):
    """BatchNorm with selectable test-time statistics; built from a pretrained BN with ``AdaptiveBN.from_bn``."""

    def __init__(
        self,
        num_features: int,
        mode: Mode = "batch",
        prior_n: float = 16.0,
        momentum: float = 0.1,
        eps: float = 1e-5,
        exact_prior: bool = False,
        detach_stats: bool = True,
        affine: bool = True,
        alpha: float = 0.1,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown AdaptiveBN mode {mode!r}; choose one of {', '.join(MODES)}")
        self.num_features, self.mode, self.prior_n, self.momentum = num_features, mode, float(prior_n), momentum
        self.eps, self.exact_prior, self.detach_stats, self.alpha = eps, exact_prior, detach_stats, alpha
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("source_mean", torch.zeros(num_features))
        self.register_buffer("source_var", torch.ones(num_features))
        self.register_buffer("ema_mean", torch.zeros(num_features))
        self.register_buffer("ema_var", torch.ones(num_features))
        # Exact pooled statistics over all target values seen so far (float64: sums over millions of values).
        self.register_buffer("pool_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("pool_images", torch.zeros((), dtype=torch.float64))
        self.register_buffer("pool_mean", torch.zeros(num_features, dtype=torch.float64))
        self.register_buffer("pool_m2", torch.zeros(num_features, dtype=torch.float64))

    @classmethod
    def from_bn(cls, bn: _BatchNorm, **kwargs: object) -> AdaptiveBN:
        """Copy affine parameters and running statistics (the source statistics) from a pretrained BN."""
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"{bn} has no running statistics to use as the source; it was built with "
                             "track_running_stats=False")
        layer = cls(bn.num_features, eps=bn.eps, affine=bn.affine, **kwargs)  # type: ignore[arg-type]
        with torch.no_grad():
            if bn.affine:
                layer.weight.copy_(bn.weight)
                layer.bias.copy_(bn.bias)
            for name in ("source_mean", "ema_mean"):
                getattr(layer, name).copy_(bn.running_mean)
            for name in ("source_var", "ema_var"):
                getattr(layer, name).copy_(bn.running_var)
        return layer.to(bn.running_mean.device)

    def _normalise(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), self.weight, self.bias, False, 0.0, self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (N, C, ...) with the statistics the mode prescribes, updating them first if it keeps any."""
        dims = [0, *range(2, x.ndim)]
        per_channel = x.numel() // max(x.shape[1], 1)
        if self.mode == "source" or per_channel < 2:
            # One value per channel (e.g. BatchNorm1d with a single sample) has no variance: use the source.
            return self._normalise(x, self.source_mean, self.source_var)
        if self.mode == "batch" and not (self.detach_stats and torch.is_grad_enabled()):
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if self.mode == "alpha":
            if self.detach_stats or not torch.is_grad_enabled():
                # The fused kernel's running statistics at momentum 1 are the batch mean and unbiased variance:
                # several times faster on CPU than var_mean for MEMO's and TTAug's many views (output discarded).
                mean, unbiased = x.new_zeros(x.shape[1]), x.new_ones(x.shape[1])
                with torch.no_grad():
                    F.batch_norm(x, mean, unbiased, None, None, True, 1.0, self.eps)
            else:
                var, mean = torch.var_mean(x, dim=dims, correction=0)
                unbiased = var * per_channel / (per_channel - 1)
            return self._normalise(x, (1 - self.alpha) * self.source_mean + self.alpha * mean,
                                   (1 - self.alpha) * self.source_var + self.alpha * unbiased)
        xs = x.detach() if self.detach_stats else x
        var, mean = torch.var_mean(xs, dim=dims, correction=0)
        if self.mode == "batch":
            return self._normalise(x, mean, var)
        if self.mode == "prior":
            # As in the official code: unbiased batch variance, no mixture term (exact_prior adds it, biased var).
            batch_var = var if self.exact_prior else var * per_channel / (per_channel - 1)
            mean, var = blend_prior(self.source_mean, self.source_var, mean, batch_var, x.shape[0], self.prior_n,
                                    self.exact_prior)
            return self._normalise(x, mean, var)
        with torch.no_grad():
            if self.mode == "ema":
                unbiased = var.detach() * per_channel / (per_channel - 1)
                self.ema_mean.lerp_(mean.detach(), self.momentum)
                self.ema_var.lerp_(unbiased, self.momentum)
            else:
                self._pool(mean.detach().double(), var.detach().double(), per_channel, x.shape[0])
        if self.mode == "ema":
            return self._normalise(x, self.ema_mean, self.ema_var)
        pool_var = self.pool_m2 / self.pool_count
        if self.mode == "cumulative":
            return self._normalise(x, self.pool_mean, pool_var)
        mean, var = blend_prior(self.source_mean.double(), self.source_var.double(), self.pool_mean, pool_var,
                                self.pool_images, self.prior_n, self.exact_prior)
        return self._normalise(x, mean, var)

    def _pool(self, mean: torch.Tensor, var: torch.Tensor, count: int, images: int) -> None:
        """Merge a new batch into the pool (count, mean, M2): exact, order-independent pooling (``merge_moments``)."""
        n, pool_mean, pool_m2 = merge_moments(self.pool_count, self.pool_mean, self.pool_m2, float(count), mean,
                                              var * count)
        self.pool_mean.copy_(pool_mean)
        self.pool_m2.copy_(pool_m2)
        self.pool_count.copy_(n)
        self.pool_images.add_(images)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, mode={self.mode}, prior_n={self.prior_n}, momentum={self.momentum}, "
                f"alpha={self.alpha}")


def use_bn_alpha(model: nn.Module, alpha: float) -> int:
    """Replace every BatchNorm2d of ``model`` in place by an ``AdaptiveBN`` normalising with BN-alpha statistics,
    (1 - ``alpha``) source + ``alpha`` statistics of the current forward; returns how many were replaced."""
    return replace_batchnorms(model, lambda bn: AdaptiveBN.from_bn(bn, mode="alpha", alpha=alpha),
                              types=(nn.BatchNorm2d,))
