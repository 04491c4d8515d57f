"""RMT: the teacher is an EMA of the student, the prediction is student + teacher, the warm-up is what reset()
returns to, and source replay walks through the source batches."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

import tta
from tta.core.teacher import weight_and_bias


def _batch(seed: int = 1, n: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def _source(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, 3, 16, 16, generator=g) * 0.8 + 0.1, torch.arange(n) % 10


def test_teacher_is_an_ema_of_the_student_and_the_prediction_their_sum(bn_model: nn.Module,
                                                                        record_steps: Callable) -> None:
    adapted = tta.adapt(bn_model, "rmt", source_data=_source(), warmup_samples=0, lr=1e-2, source_batch_size=16)
    stepped = record_steps(adapted)
    for seed in (1, 2):
        x = _batch(seed)
        teacher_before = [p.detach().clone() for p in adapted.teacher.parameters()]
        with torch.no_grad():
            expected = adapted.model(x) + adapted.teacher(x)
        out = adapted(x)
        torch.testing.assert_close(out, expected)
        for t, before, student in zip(adapted.teacher.parameters(), teacher_before, stepped[-1], strict=True):
            torch.testing.assert_close(t.detach(), 0.999 * before + 0.001 * student)
    assert adapted.source_cursor == 2  # one source batch replayed per step
    changed = [not torch.equal(a, b) for a, b in zip(weight_and_bias(adapted.model), weight_and_bias(
        adapted.teacher), strict=True)]
    assert any(changed)


def test_warm_up_moves_the_student_and_reset_returns_to_it(bn_model: nn.Module) -> None:
    cold = tta.adapt(bn_model, "rmt", source_data=_source(), warmup_samples=0, source_batch_size=16)
    warm = tta.adapt(bn_model, "rmt", source_data=_source(), warmup_samples=64, source_batch_size=16)
    assert warm.source_cursor == 4  # 64 // 16 warm-up steps
    diffs = [not torch.equal(a, b) for a, b in zip(cold.model.parameters(), warm.model.parameters(), strict=True)]
    assert any(diffs)
    warmed = copy.deepcopy(warm.model.state_dict())
    assert any(len(s) for s in warm.optimizer.state.values())  # Adam's moments carried over from the warm-up
    warm(_batch())
    warm.reset()
    assert warm.source_cursor == 4
    assert all(torch.equal(v, warm.model.state_dict()[k]) for k, v in warmed.items())
