"""SAR: the SAM update, the recovery reset, the frozen top layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tta

RELIABLE = {"e_margin": 1.0}  # every sample of the tiny models reliable


def _state(adapted: tta.AdaptedModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapted.state_dict().items() if isinstance(v, torch.Tensor)}


def test_resets_when_the_loss_ema_falls_below_the_threshold(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "sar", reset_constant_em=100.0, **RELIABLE)  # any loss is below 100
    initial = _state(adapted)
    adapted(torch.rand(8, 3, 16, 16))
    assert adapted.counters.updates == 1 and adapted.counters.resets == 1
    assert adapted.loss_ema is None and not adapted.optimizer.state
    after = _state(adapted)
    assert all(torch.equal(after[k], initial[k]) for k in initial)


def test_keeps_the_ema_of_the_second_pass_loss_above_the_threshold(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "sar", reset_constant_em=0.0, **RELIABLE)
    adapted(torch.rand(8, 3, 16, 16))
    first = adapted.loss_ema
    assert first is not None and adapted.counters.resets == 0
    adapted(torch.rand(8, 3, 16, 16))
    assert adapted.loss_ema != first and adapted.counters.resets == 0


def test_no_reliable_sample_means_no_update(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "sar", e_margin=1e-6)
    before = _state(adapted)
    adapted(torch.rand(8, 3, 16, 16))
    assert adapted.counters.skipped == 1 and adapted.loss_ema is None
    after = _state(adapted)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_sam_steps_from_the_restored_weights_with_the_perturbed_gradient(bn_model: nn.Module) -> None:
    sar = tta.adapt(bn_model, "sar", reset_constant_em=0.0, **RELIABLE)
    plain = tta.adapt(bn_model, "sar", reset_constant_em=0.0, **RELIABLE)
    plain.update = "gradient"  # the same loss and optimizer, one plain gradient step
    start = [p.detach().clone() for p in sar.params()]
    at_step: list[torch.Tensor] = []
    base_step = sar.optimizer.step

    def recording_step(*args: object, **kwargs: object) -> object:
        at_step.extend(p.detach().clone() for p in sar.params())
        return base_step(*args, **kwargs)

    sar.optimizer.step = recording_step  # type: ignore[method-assign]
    x = torch.rand(8, 3, 16, 16)
    torch.testing.assert_close(sar(x), plain(x), atol=0, rtol=0)  # both predict before updating
    assert all(torch.equal(a, s) for a, s in zip(at_step, start, strict=True))  # exactly back before the step
    moved = [not torch.equal(p, s) for p, s in zip(sar.params(), start, strict=True)]
    assert any(moved)
    differs = [not torch.allclose(a, b) for a, b in zip(sar.params(), plain.params(), strict=True)]
    assert any(differs)


class _Top(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.layer4 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer4(self.stem(x)))


def test_top_layers_stay_frozen() -> None:
    adapted = tta.adapt(_Top().eval(), "sar")
    trainable = {n for n, p in adapted.model.named_parameters() if p.requires_grad}
    assert trainable == {"stem.1.weight", "stem.1.bias"}


@pytest.mark.parametrize("preset", [None, "imagenet"])
def test_sgd_without_nesterov_as_the_reference(bn_model: nn.Module, preset: str | None) -> None:
    adapted = tta.adapt(bn_model, "sar", preset=preset)
    group = adapted.optimizer.param_groups[0]
    assert isinstance(adapted.optimizer, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["nesterov"]) == ((1e-3 if preset is None else 2.5e-4), 0.9, False)
