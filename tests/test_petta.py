"""PeTTA: the divergence from the source sets the regulariser and the teacher rate; one update per batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tta
from tta.methods.petta import divergence
from tta.norm.robust_bn import RobustBN


def _source(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 16, 16, generator=g) * 0.8 + 0.1, torch.randint(0, 10, (n,), generator=g)


def _adapt(model: nn.Module, **overrides: object) -> tta.AdaptedModel:
    return tta.adapt(model, "petta", source_data=_source(), **overrides)


def _bn_params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for m in module.modules() if isinstance(m, RobustBN) for p in (m.weight, m.bias)]


def test_divergence_is_zero_at_the_source_and_rises_with_the_distance() -> None:
    g = torch.Generator().manual_seed(0)
    mean, var = torch.randn(4, 8, generator=g), torch.rand(4, 8, generator=g) + 0.5
    classes = torch.tensor([0, 2])
    assert float(divergence(mean, mean, var, classes)) == 0.0
    direction = torch.randn(4, 8, generator=g)
    scores = [float(divergence(mean + s * direction, mean, var, classes)) for s in (0.1, 0.5, 1.0, 3.0)]
    assert scores == sorted(scores) and len(set(scores)) == 4
    assert scores[0] > 0 and scores[-1] < 1
    moved = mean.clone()
    moved[1] += 10  # a class absent from the batch does not count
    assert float(divergence(moved, mean, var, classes)) == 0.0


def test_regularisation_strength_rises_and_teacher_rate_falls_with_the_divergence(bn_model: nn.Module) -> None:
    adapted = _adapt(bn_model, lambda_0=10.0, alpha_0=0.002)
    weights, rates = [], []
    for d in (0.0, 0.2, 0.5, 0.9):
        adapted.divergence.fill_(d)
        weights.append(float(adapted.regularization_weight()))
        rates.append(float(adapted.teacher_rate()))
    assert weights == pytest.approx([0.0, 2.0, 5.0, 9.0])
    assert rates == pytest.approx([0.002, 0.0016, 0.001, 0.0002])
    fixed = _adapt(bn_model, adaptive_lambda=False, adaptive_alpha=False)
    fixed.divergence.fill_(0.7)
    assert float(fixed.regularization_weight()) == 10.0 and float(fixed.teacher_rate()) == pytest.approx(0.001)


def test_a_shifted_stream_raises_the_divergence_and_with_it_the_regulariser(bn_model: nn.Module) -> None:
    adapted = _adapt(bn_model)
    x, _ = _source()
    adapted(x[:32])  # clean source images: the stream's features sit near the source's
    near = float(adapted.last.diagnostics["divergence"])
    g = torch.Generator().manual_seed(3)
    for _ in range(6):  # far from the source: saturated, noisy images
        adapted((torch.rand(32, 3, 16, 16, generator=g) > 0.5).float())
    d = adapted.last.diagnostics
    assert float(d["divergence"]) > near
    torch.testing.assert_close(d["regularization_weight"], 10.0 * d["divergence"])
    torch.testing.assert_close(d["teacher_rate"], 0.001 * (1 - d["divergence"]))


def test_one_update_per_batch_and_the_teacher_follows_at_the_adaptive_rate(bn_model: nn.Module) -> None:
    adapted = _adapt(bn_model, lr=0.01)
    x = torch.rand(10, 3, 16, 16)
    with torch.no_grad():
        expected = bn_model(x)  # robust BN in eval mode: the source statistics
    teacher = _bn_params(adapted.teacher)
    torch.testing.assert_close(adapted(x), expected)  # the teacher's prediction, before the update
    rate = float(adapted.last.diagnostics["teacher_rate"])
    for t_new, t_old, s in zip(_bn_params(adapted.teacher), teacher, _bn_params(adapted.model), strict=True):
        torch.testing.assert_close(t_new, (1 - rate) * t_old + rate * s)
    adapted(torch.rand(7, 3, 16, 16))
    assert adapted.counters.updates == 2  # batches of any size: one update each


def test_regularizers_measure_the_distance_from_the_source(bn_model: nn.Module) -> None:
    with torch.no_grad():
        for m in bn_model.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
                m.bias.uniform_(0.1, 0.5)  # a zero vector has no direction: cosine similarity 0
    cosine, l2 = _adapt(bn_model), _adapt(bn_model, regularizer="l2")
    assert float(cosine._regularizer().detach()) == pytest.approx(-1.0)
    assert float(l2._regularizer().detach()) == 0.0
    with torch.no_grad():
        for m in (cosine, l2):
            for p in m.params():
                p.mul_(-1)
    assert float(cosine._regularizer().detach()) == pytest.approx(1.0)
    assert float(l2._regularizer().detach()) > 0


def test_anchor_keeps_the_source_parameters(bn_model: nn.Module) -> None:
    adapted = _adapt(bn_model, lr=0.05)
    anchor = _bn_params(adapted.anchor)
    for _ in range(3):
        adapted(torch.rand(16, 3, 16, 16))
    assert all(torch.equal(a, b) for a, b in zip(_bn_params(adapted.anchor), anchor, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(_bn_params(adapted.model), anchor, strict=True))


def test_needs_source_data_affine_norms_and_valid_settings(bn_model: nn.Module) -> None:
    with pytest.raises(tta.ConfigError, match="source data"):
        tta.adapt(bn_model, "petta")
    with pytest.raises(tta.ConfigError, match="steps must be 1"):
        _adapt(bn_model, steps=2)
    with pytest.raises(tta.ConfigError, match="regularizer"):
        _adapt(bn_model, regularizer="l1")
    assert _adapt(bn_model, preset="imagenet").config.loss == "ce"
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 10)).eval()
    with pytest.raises(tta.ModelError, match="petta adapts the affine parameters"):
        _adapt(plain)
