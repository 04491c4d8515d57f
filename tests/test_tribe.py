"""TRIBE: balanced BatchNorm weighs classes equally; the teacher shares the student's parameters; the anchor stays."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tta
from tta.norm.balanced_bn import BalancedBN, class_labels


def _layer(channels: int = 3, classes: int = 2, eta: float = 0.25, gamma: float = 0.0) -> BalancedBN:
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return BalancedBN(bn, classes, eta, gamma).train()


def _update(layer: BalancedBN, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with class_labels(layer, labels):
        layer(x)
    return layer.mean.clone(), layer.var.clone()


def test_an_imbalanced_batch_gives_the_statistics_of_a_balanced_one() -> None:
    torch.manual_seed(0)
    per_class = [torch.randn(5, 3, 4, 4) + 3 * k for k in range(2)]  # five distinct images per class
    balanced = torch.cat(per_class)
    imbalanced = torch.cat([per_class[0].repeat(6, 1, 1, 1), per_class[1]])  # class 0 six times as often
    labels_b = torch.tensor([0] * 5 + [1] * 5)
    labels_i = torch.tensor([0] * 30 + [1] * 5)
    mean_b, var_b = _update(_layer(), balanced, labels_b)
    mean_i, var_i = _update(_layer(), imbalanced, labels_i)
    torch.testing.assert_close(mean_i, mean_b)
    torch.testing.assert_close(var_i, var_b)
    # ... where the batch's own statistics lean towards the frequent class
    plain_b, plain_i = balanced.mean((0, 2, 3)), imbalanced.mean((0, 2, 3))
    assert float((plain_i - plain_b).abs().max()) > 0.5
    torch.testing.assert_close(mean_b, torch.stack([p.mean((0, 2, 3)) for p in per_class]).mean(0))


def _reference_update(layer: BalancedBN, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The update rule written out class by class (slow and plain)."""
    mean, var, g = layer.local_mean.clone(), layer.local_var.clone(), layer.gamma
    present = sorted(set(labels.tolist()))
    deltas, gaps, rates = [], [], []
    for k in present:
        xs = x[labels == k]
        n = len(xs)
        m = 1.0 / n if n > 1 / layer.eta else layer.eta
        centred = xs - layer.local_mean[k].view(1, -1, 1, 1)
        delta = m * centred.mean((2, 3)).sum(0)
        squares = centred.pow(2).mean((2, 3)).sum(0)
        mean[k] = layer.local_mean[k] + (1 - g) * delta
        var[k] = layer.local_var[k] + (1 - g) * (m * (squares - n * layer.local_var[k]) - delta**2)
        deltas.append(delta)
        gaps.append(m * squares - delta**2)
        rates.append(m * n)
    mean = mean + g * torch.stack(deltas).mean(0)
    var = var + g * (torch.stack(gaps).mean(0) - sum(rates) / len(rates) * var)
    return mean.mean(0), var.mean(0) + mean.var(0)


@pytest.mark.parametrize(("eta", "gamma"), [(0.01, 0.0), (0.3, 0.0), (0.1, 0.5)])
def test_balanced_statistics_follow_the_update_rule(eta: float, gamma: float) -> None:
    torch.manual_seed(1)
    layer = _layer(classes=4, eta=eta, gamma=gamma)
    for _ in range(3):
        x, labels = torch.randn(12, 3, 4, 4) * 2 + 1, torch.randint(0, 3, (12,))
        expected = _reference_update(layer, x, labels)
        got = _update(layer, x, labels)
        torch.testing.assert_close(got, expected)


def test_statistics_stay_outside_training_with_labels() -> None:
    layer = _layer()
    before = layer.mean.clone(), layer.var.clone()
    x = torch.randn(6, 3, 4, 4) + 5
    layer(x)  # training mode, but no labels
    with class_labels(layer.eval(), torch.zeros(6, dtype=torch.long)):
        layer(x)
    assert torch.equal(layer.mean, before[0]) and torch.equal(layer.var, before[1])
    assert layer.labels is None


def _bn_params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for m in module.modules() if isinstance(m, BalancedBN) for p in (m.weight, m.bias)]


def test_anchor_never_moves_and_the_teacher_shares_the_students_parameters(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "tribe", lr=0.05, h0=1.0)  # h0 = 1: every image counts as confident
    source = _bn_params(adapted.anchor)
    for _ in range(4):
        adapted(torch.rand(16, 3, 16, 16))
    assert adapted.counters.updates == 4
    assert all(torch.equal(a, b) for a, b in zip(_bn_params(adapted.anchor), source, strict=True))
    student = _bn_params(adapted.model)
    assert not all(torch.equal(a, b) for a, b in zip(student, source, strict=True))
    teacher = [p for m in adapted.teacher.modules() if isinstance(m, BalancedBN) for p in (m.weight, m.bias)]
    assert all(t is s for t, s in zip(teacher, adapted.params(), strict=True))
    bns = [m for m in adapted.model.modules() if isinstance(m, BalancedBN)]
    assert not torch.equal(bns[0].mean, next(m for m in adapted.teacher.modules() if isinstance(m, BalancedBN)).mean)


def test_returns_the_teachers_prediction_before_the_update(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "tribe", lr=0.05, h0=1.0)
    x = torch.rand(16, 3, 16, 16)
    with torch.no_grad():
        expected = bn_model(x)  # balanced BN in eval mode starts at the source statistics
    torch.testing.assert_close(adapted(x), expected)
    assert not torch.allclose(adapted.infer(x), expected)


def test_no_confident_image_leaves_the_gradient_zero(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "tribe", h0=0.0)  # nothing is confident
    before = _bn_params(adapted.model)
    adapted(torch.rand(16, 3, 16, 16))
    assert int(adapted.last.diagnostics["confident"]) == 0
    assert adapted.counters.updates == 1  # Adam steps with a zero gradient and no moments yet: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(_bn_params(adapted.model), before, strict=True))


def test_models_without_batchnorm_are_refused(ln_model: nn.Module, bn_model: nn.Module) -> None:
    with pytest.raises(tta.ModelError, match="tribe adapts BatchNorm layers"):
        tta.adapt(ln_model, "tribe")
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 10)).eval()
    with pytest.raises(tta.ModelError, match="affine=False"):
        tta.adapt(plain, "tribe")
    assert tta.adapt(bn_model, "tribe", preset="imagenet").config.eta == 0.5
