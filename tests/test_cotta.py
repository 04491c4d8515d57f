"""CoTTA: stochastic restore with the given probability, an EMA teacher, a frozen anchor, teacher predictions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tta
from tta.core.augment import tta_augment
from tta.core.teacher import weight_and_bias


def _params(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in weight_and_bias(module)]


def _step(adapted: tta.AdaptedModel) -> None:
    adapted(torch.rand(16, 3, 16, 16))


def test_every_weight_and_bias_trains_with_batch_statistics(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "cotta")
    assert len(adapted.params()) == len(list(bn_model.parameters()))  # every parameter is a weight or a bias
    assert all(p.requires_grad for p in adapted.model.parameters())
    assert not any(p.requires_grad for p in adapted.teacher.parameters())
    bns = [m for m in adapted.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(m.running_mean is None for m in bns)


def test_restore_probability_one_returns_every_weight_to_the_source(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "cotta", restore_prob=1.0, lr=0.1, n_augmentations=2)
    source = _params(bn_model)
    _step(adapted)
    assert adapted.counters.updates == 1
    for p, s in zip(_params(adapted.model), source, strict=True):
        torch.testing.assert_close(p, s, atol=0, rtol=0)


@pytest.mark.parametrize("prob", [0.0, 0.3])
def test_restore_probability_is_the_fraction_of_elements_restored(bn_model: nn.Module, prob: float) -> None:
    adapted = tta.adapt(bn_model, "cotta", restore_prob=prob, lr=0.1, n_augmentations=2)
    source = _params(bn_model)
    _step(adapted)
    restored = sum(int((p == s).sum()) for p, s in zip(_params(adapted.model), source, strict=True))
    total = sum(s.numel() for s in source)
    assert abs(restored / total - prob) < 0.05  # ~1,900 elements: a binomial standard deviation below 0.011


def test_teacher_is_the_ema_of_the_student_and_the_anchor_never_changes(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "cotta", restore_prob=0.0, teacher_momentum=0.9, n_augmentations=2)
    anchor = _params(adapted.anchor)
    for _ in range(3):
        teacher = _params(adapted.teacher)
        _step(adapted)
        for t_new, t_old, s in zip(_params(adapted.teacher), teacher, _params(adapted.model), strict=True):
            torch.testing.assert_close(t_new, 0.9 * t_old + 0.1 * s)
    for a, s in zip(_params(adapted.anchor), anchor, strict=True):
        torch.testing.assert_close(a, s, atol=0, rtol=0)


def test_returns_the_teachers_prediction_before_the_update(bn_model: nn.Module) -> None:
    x = torch.rand(16, 3, 16, 16)
    adapted = tta.adapt(bn_model, "cotta", aug_threshold=0.0)  # confident enough: the plain teacher prediction
    with torch.no_grad():
        expected = adapted.teacher(x)
    torch.testing.assert_close(adapted(x), expected)
    assert not bool(adapted.last.diagnostics["augmented"])


def test_low_anchor_confidence_averages_the_teacher_over_augmentations(bn_model: nn.Module) -> None:
    x = torch.rand(16, 3, 16, 16)
    adapted = tta.adapt(bn_model, "cotta", aug_threshold=1.0, n_augmentations=3)
    torch.manual_seed(5)
    logits = adapted(x)
    assert bool(adapted.last.diagnostics["augmented"])
    reference = tta.adapt(bn_model, "cotta")
    torch.manual_seed(5)
    with torch.no_grad():
        reference.model(x), reference.anchor(x)  # no random draws: the same generator state follows
        expected = torch.stack([reference.teacher(tta_augment(x)) for _ in range(3)]).mean(0)
    torch.testing.assert_close(logits, expected)


def test_augmentation_is_reproducible_and_keeps_images_valid() -> None:
    x = torch.rand(4, 3, 32, 32)
    torch.manual_seed(3)
    a = tta_augment(x)
    torch.manual_seed(3)
    b = tta_augment(x)
    c = tta_augment(x)
    assert a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, c) and not torch.equal(a, x)
    assert tta_augment(torch.rand(2, 1, 8, 8), soft=True).shape == (2, 1, 8, 8)  # grey images too


@pytest.mark.parametrize(("key", "value"), [("restore_prob", 1.5), ("aug_threshold", -0.1),
                                            ("n_augmentations", 0), ("teacher_momentum", float("nan"))])
def test_bad_settings_are_rejected(bn_model: nn.Module, key: str, value: object) -> None:
    with pytest.raises(tta.ConfigError, match=key):
        tta.adapt(bn_model, "cotta", **{key: value})
