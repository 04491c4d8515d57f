"""AdaptiveBN and the adabn method: the prior's limits, exact cumulative pooling and the mode semantics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tta
from tta.norm.adaptive_bn import AdaptiveBN


def _bn(channels: int = 4) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn.eval()


def test_prior_with_infinite_n_equals_source() -> None:
    bn, x = _bn(), torch.randn(8, 4, 5, 5) * 3 + 1
    layer = AdaptiveBN.from_bn(bn, mode="prior", prior_n=math.inf)
    torch.testing.assert_close(layer(x), bn(x), atol=1e-6, rtol=0)


def test_prior_with_zero_n_equals_batch_mode() -> None:
    bn, x = _bn(), torch.randn(8, 4, 5, 5) * 3 + 1
    batch = AdaptiveBN.from_bn(bn, mode="batch")(x)
    exact = AdaptiveBN.from_bn(bn, mode="prior", prior_n=0.0, exact_prior=True)(x)
    torch.testing.assert_close(exact, batch, atol=1e-6, rtol=0)
    # The official form uses the unbiased batch variance: equal up to the n/(n-1) factor (n = 200 values here).
    official = AdaptiveBN.from_bn(bn, mode="prior", prior_n=0.0)(x)
    torch.testing.assert_close(official, batch, atol=2e-2, rtol=0)
    assert not torch.allclose(official, batch, atol=1e-6, rtol=0)


def test_batch_mode_equals_train_mode_batchnorm() -> None:
    bn, x = _bn(), torch.randn(8, 4, 5, 5)
    expected = nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    torch.testing.assert_close(AdaptiveBN.from_bn(bn, mode="batch")(x), expected)


def test_prior_blend_weights_follow_the_pseudo_count() -> None:
    bn, x = _bn(1), torch.randn(16, 1, 4, 4) * 2 + 3
    layer = AdaptiveBN.from_bn(bn, mode="prior", prior_n=16.0, exact_prior=True)
    var_t, mean_t = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    a, b = 0.5, 0.5  # N = n = 16
    mean = a * bn.running_mean + b * mean_t
    var = a * bn.running_var + b * var_t + a * b * (bn.running_mean - mean_t) ** 2
    expected = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + bn.eps) * bn.weight.view(
        1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_cumulative_equals_full_set_pooled_statistics() -> None:
    bn = _bn()
    data = [torch.randn(n, 4, 6, 6) * (i + 1) + i for i, n in enumerate((7, 13, 5, 20))]  # shifting batches
    layer = AdaptiveBN.from_bn(bn, mode="cumulative")
    for x in data:
        out = layer(x)
    full = torch.cat(data).double()
    var, mean = torch.var_mean(full, dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(layer.pool_mean, mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.pool_m2 / layer.pool_count, var, atol=1e-5, rtol=1e-6)
    expected = AdaptiveBN.from_bn(bn, mode="source")
    expected.source_mean.copy_(mean.float())
    expected.source_var.copy_(var.float())
    torch.testing.assert_close(out, expected(data[-1]), atol=1e-5, rtol=1e-5)


def test_ema_updates_before_use_from_the_source() -> None:
    bn, x = _bn(), torch.randn(8, 4, 5, 5) + 2
    layer = AdaptiveBN.from_bn(bn, mode="ema", momentum=0.1)
    layer(x)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=1)
    torch.testing.assert_close(layer.ema_mean, 0.9 * bn.running_mean + 0.1 * mean)
    torch.testing.assert_close(layer.ema_var, 0.9 * bn.running_var + 0.1 * var)


def test_single_sample_batchnorm1d_falls_back_to_source() -> None:
    bn = nn.BatchNorm1d(5).eval()
    with torch.no_grad():
        bn.running_mean.fill_(0.3)
    x = torch.randn(1, 5)
    torch.testing.assert_close(AdaptiveBN.from_bn(bn, mode="batch")(x), bn(x))


@pytest.mark.parametrize("mode", ["batch", "prior", "ema", "cumulative", "cumulative_prior"])
def test_adabn_modes_adapt_and_reset(bn_model: nn.Module, mode: str) -> None:
    x = torch.rand(16, 3, 16, 16) * 0.3  # shifted: darker than the source statistics
    adapted = tta.adapt(bn_model, "adabn", mode=mode)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in adapted.modules())
    first = adapted(x)
    assert not torch.allclose(first, bn_model(x))
    second = adapted(x)
    if mode in ("ema", "cumulative_prior"):  # statistics moved on between the two calls
        assert not torch.allclose(first, second)
    adapted.reset()
    torch.testing.assert_close(adapted(x), first)


def test_adabn_without_batchnorm_is_a_clear_error(ln_model: nn.Module) -> None:
    with pytest.raises(tta.ModelError, match="no BatchNorm layers"):
        tta.adapt(ln_model, "adabn")


def test_pooled_statistics_stay_float64_through_conversion_and_casts(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "adabn", mode="cumulative")
    adapted.float()
    layers = [m for m in adapted.modules() if isinstance(m, AdaptiveBN)]
    assert layers and all(m.pool_mean.dtype == m.pool_m2.dtype == torch.float64 for m in layers)
    assert all(m.weight.dtype == torch.float32 for m in layers)


def test_adabn_needs_source_running_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(tta.ModelError, match="needs the source running statistics"):
        tta.adapt(model, "adabn")
