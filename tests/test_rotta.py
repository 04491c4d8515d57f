"""RoTTA: a bounded, class-balanced memory bank that resets, an EMA teacher, updates every update_every images."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tta
from tta.norm.robust_bn import RobustBN


def _norm_params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for m in module.modules() if isinstance(m, RobustBN) for p in (m.weight, m.bias)]


def test_memory_never_exceeds_its_capacity_and_stays_class_balanced(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "rotta", memory_size=20, update_every=16)
    for _ in range(6):
        adapted(torch.rand(24, 3, 16, 16))
        labels = adapted.memory_label
        assert labels.shape == (20,) and adapted.memory_x.shape[0] == 20
        counts = torch.bincount(labels[labels >= 0], minlength=10)
        assert int(counts.sum()) <= 20
        assert int(counts.max()) <= 2  # memory_size / classes per class
    assert int((adapted.memory_label >= 0).sum()) > 0
    assert adapted.counters.updates == 6 * 24 // 16


def test_one_dominant_class_cannot_fill_the_memory(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "rotta", memory_size=20, update_every=1000)
    with torch.no_grad():
        adapted.teacher.head.bias.fill_(0).data[3] = 100.0  # the teacher calls every image class 3
    adapted(torch.rand(50, 3, 16, 16))
    assert adapted.memory_label.tolist().count(3) == 2
    assert adapted.memory_label.tolist().count(-1) == 18


def test_teacher_is_an_ema_of_the_student_and_predicts_before_the_update(bn_model: nn.Module) -> None:
    x = torch.rand(16, 3, 16, 16)
    adapted = tta.adapt(bn_model, "rotta", update_every=16, teacher_momentum=0.9, lr=0.01)
    teacher = _norm_params(adapted.teacher)
    with torch.no_grad():
        expected = bn_model(x)  # robust BN in eval mode: the source statistics
    torch.testing.assert_close(adapted(x), expected)
    assert adapted.counters.updates == 1
    student = _norm_params(adapted.model)
    assert not all(torch.equal(s, t) for s, t in zip(student, teacher, strict=True))
    for t_new, t_old, s in zip(_norm_params(adapted.teacher), teacher, student, strict=True):
        torch.testing.assert_close(t_new, 0.9 * t_old + 0.1 * s)


def test_reset_empties_the_memory(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "rotta")
    adapted(torch.rand(100, 3, 16, 16))
    assert int((adapted.memory_label >= 0).sum()) > 0 and adapted.seen == 100
    adapted.reset()
    assert adapted.memory_x.numel() == 0 and adapted.seen == 0
    assert bool((adapted.memory_label == -1).all())


def test_robust_bn_moves_its_statistics_by_alpha_in_training_only() -> None:
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.fill_(1.0)
    layer = RobustBN(bn, alpha=0.25)
    x = torch.randn(8, 3, 4, 4) + 3.0
    torch.testing.assert_close(layer.eval()(x), bn(x))
    layer.train()(x)
    torch.testing.assert_close(layer.mean, 0.75 * 1.0 + 0.25 * x.mean(dim=(0, 2, 3)))


def test_image_size_change_needs_a_reset(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "rotta")
    adapted(torch.rand(8, 3, 16, 16))
    with pytest.raises(tta.InputError, match="reset"):
        adapted(torch.rand(8, 3, 8, 8))
    adapted.reset()
    adapted(torch.rand(8, 3, 8, 8))


@pytest.mark.parametrize(("key", "value"), [("memory_size", 0), ("steps", 2), ("bn_alpha", 2.0)])
def test_bad_settings_are_rejected(bn_model: nn.Module, key: str, value: object) -> None:
    with pytest.raises(tta.ConfigError, match=key):
        tta.adapt(bn_model, "rotta", **{key: value})
