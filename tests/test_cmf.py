"""CMF: the Kalman-filtered hidden model stays a convex combination of the source and the adapted parameters, and
the fused weights are exactly gamma * stepped + (1 - gamma) * hidden."""

from __future__ import annotations

import math

import torch
from torch import nn

import tta


def _batch(seed: int = 1, n: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def _record_steps(adapted: tta.AdaptedModel) -> list[torch.Tensor]:
    """The adapted parameters right after each optimiser step (before the fusion), flattened."""
    stepped: list[torch.Tensor] = []
    step = adapted.optimizer.step

    def record(*args: object, **kwargs: object) -> object:
        result = step(*args, **kwargs)
        stepped.append(torch.cat([p.detach().reshape(-1) for p in adapted.params()]).clone())
        return result

    adapted.optimizer.step = record
    return stepped


def test_hidden_model_is_a_convex_combination_and_weights_are_fused_with_it(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "cmf", lr=5e-2, q=0.5)  # large steps and noise: the filter moves visibly
    source = adapted.hidden.clone()
    stepped = _record_steps(adapted)
    var, coef_source = 0.0, 1.0  # the hidden model's variance and its weight on the source, tracked by hand
    q = adapted.q_scaled
    for seed in range(1, 6):
        adapted(_batch(seed))
        var = 0.99 ** 2 * var + q
        beta = min(max((1 - q) / (var + 1 - q), 0.89), 1.0)
        var *= beta
        coef_source = beta * (0.99 * coef_source + 0.01)
        assert math.isclose(adapted.hidden_var, var, rel_tol=1e-12)
        torch.testing.assert_close(adapted.last.diagnostics["kalman_gain"], torch.tensor(beta))
        history = torch.stack([source, *stepped])
        low, high = history.min(0).values, history.max(0).values
        hidden = adapted.hidden
        assert bool(((hidden >= low - 1e-6) & (hidden <= high + 1e-6)).all())  # inside the convex hull, per element
        fused = torch.cat([p.detach().reshape(-1) for p in adapted.params()])
        torch.testing.assert_close(fused, 0.99 * stepped[-1] + 0.01 * hidden)
    assert 0 < coef_source < 1 and not torch.equal(adapted.hidden, source)


def test_without_steps_the_hidden_model_stays_the_source(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "cmf", lr=1e-12)
    source = adapted.hidden.clone()
    for seed in (1, 2):
        adapted(_batch(seed))
    torch.testing.assert_close(adapted.hidden, source)


def test_reset_restores_the_filter(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "cmf", lr=1e-2, q=0.5)  # a gain below 1: the hidden model moves
    source = adapted.hidden.clone()
    adapted(_batch())
    assert adapted.hidden_var > 0 and not torch.equal(adapted.hidden, source)
    adapted.reset()
    assert adapted.hidden_var == 0.0 and torch.equal(adapted.hidden, source)
