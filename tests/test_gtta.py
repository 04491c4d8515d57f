"""GTTA: a source step on mixed-up source images, then a target step on confident pseudo-labels; the prediction
is the one between the two steps."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta
from tta.core.replay import replay_batch
from tta.errors import ConfigError


def _batch(seed: int = 1, n: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def _source(n: int = 48, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, 3, size, size, generator=g) * 0.8 + 0.1, torch.arange(n) % 10


def test_two_steps_per_batch_and_the_prediction_comes_between_them(bn_model: nn.Module,
                                                                   record_steps: Callable) -> None:
    adapted = tta.adapt(bn_model, "gtta", source_data=_source(), lr=1e-2, source_batch_size=16)
    adapted.mean_confidence.fill_(0.0)  # every pseudo-label passes: the target step runs
    stepped = record_steps(adapted)
    x = _batch()
    out = adapted(x)
    assert len(stepped) == 2 and adapted.counters.updates == 2
    reference = {k: v.clone() for k, v in adapted.model.state_dict().items()}
    with torch.no_grad():
        for p, value in zip(adapted.model.parameters(), stepped[0], strict=True):
            p.copy_(value)
        torch.testing.assert_close(out, adapted.model(x))  # after the source step, before the target step
    adapted.model.load_state_dict(reference)
    assert any(not torch.equal(a, b) for a, b in zip(stepped[0], stepped[1], strict=True))


def test_the_source_step_is_the_cross_entropy_of_source_images_mixed_towards_the_batch(bn_model: nn.Module) -> None:
    x = _batch(n=8)
    source_images, source_labels = _source()
    images, labels = replay_batch(torch.round(source_images * 255).to(torch.uint8), source_labels, 0, 16, 0,
                                  torch.float32)
    images, labels = images[:8], labels[:8]  # at most as many source images as the batch holds
    for lam in (0.0, 1 / 3):
        adapted = tta.adapt(bn_model, "gtta", source_data=_source(), source_batch_size=16, lambda_mixup=lam)
        with torch.no_grad():
            probs = adapted.model(x).softmax(1)
            closest = (adapted.model(images).softmax(1) @ probs.T).argmax(1)
            expected = F.cross_entropy(adapted.model(lam * x[closest] + (1 - lam) * images), labels)
        adapted(x)
        torch.testing.assert_close(adapted.last.diagnostics["source_ce"], expected)


def test_unconfident_batches_take_only_the_source_step(bn_model: nn.Module, record_steps: Callable) -> None:
    adapted = tta.adapt(bn_model, "gtta", source_data=_source(), source_batch_size=16)
    probs = adapted.model(_batch()).softmax(1)
    assert probs.max() < 0.9 ** 0.5  # an untrained model: no prediction reaches the threshold
    stepped = record_steps(adapted)
    adapted(_batch())
    assert len(stepped) == 1
    torch.testing.assert_close(adapted.mean_confidence, 0.9 * torch.tensor(0.9) + 0.1 * probs.max(1).values.mean())


def test_reset_returns_the_confidence_mean_and_the_source_stream(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "gtta", source_data=_source(), source_batch_size=16)
    before = {k: v.clone() for k, v in adapted.model.state_dict().items()}
    adapted(_batch(1))
    adapted(_batch(2))
    assert adapted.source_cursor == 2 and float(adapted.mean_confidence) != pytest.approx(0.9)
    adapted.reset()
    assert adapted.source_cursor == 0 and float(adapted.mean_confidence) == pytest.approx(0.9)
    assert all(torch.equal(v, adapted.model.state_dict()[k]) for k, v in before.items())


def test_source_images_of_another_size_are_resized_and_bad_source_data_refused(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "gtta", source_data=_source(size=8), source_batch_size=16)
    out = adapted(_batch())
    assert out.shape == (16, 10) and torch.isfinite(out).all()
    images, _ = _source()
    with pytest.raises(ConfigError, match="model's own classes"):
        tta.adapt(bn_model, "gtta", source_data=(images, torch.arange(48) % 12))
    with pytest.raises(ConfigError, match="channels"):
        tta.adapt(bn_model, "gtta", source_data=(images[:, :1], torch.arange(48) % 10))
