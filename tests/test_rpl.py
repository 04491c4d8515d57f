"""RPL: the generalised cross-entropy against the model's own argmax, one step on the norm affine parameters."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tta
from tta.methods.rpl import generalized_cross_entropy


def _batch(seed: int = 1, n: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def test_gce_is_bounded_and_interpolates_between_ce_and_mae() -> None:
    logits = torch.tensor([[4.0, 0.0, -1.0], [0.1, 0.2, 0.0]])
    p = logits.softmax(1).amax(1)
    torch.testing.assert_close(generalized_cross_entropy(logits, 1.0), 1 - p)  # q = 1: mean absolute error
    ce = -logits.double().softmax(1).amax(1).log()
    torch.testing.assert_close(generalized_cross_entropy(logits.double(), 1e-4), ce, rtol=1e-3, atol=0)  # q -> 0: CE
    assert bool((generalized_cross_entropy(logits * 100, 0.8) <= 1 / 0.8).all())  # bounded by 1 / q


def test_one_step_minimises_the_gce_of_the_predictions_before_the_update(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "rpl", lr=1e-2)
    x = _batch()
    with torch.no_grad():
        before = adapted.model(x)
    out = adapted(x)
    torch.testing.assert_close(out, before, atol=0, rtol=0)  # the returned logits precede the update
    expected = generalized_cross_entropy(before, 0.8).mean()
    torch.testing.assert_close(adapted.last.diagnostics["gce"], expected)
    with torch.no_grad():
        after = generalized_cross_entropy(adapted.model(x), 0.8).mean()
    assert float(after) < float(expected)


def test_only_norm_affine_parameters_train(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "rpl", lr=1e-2)
    before = {k: v.clone() for k, v in adapted.model.named_parameters()}
    adapted(_batch())
    changed = {k for k, v in adapted.model.named_parameters() if not torch.equal(v, before[k])}
    assert changed and all(".weight" in k or ".bias" in k for k in changed)
    assert not any(k.startswith("features.0") or k.startswith("features.3") or k.startswith("head") for k in changed)


def test_q_outside_its_range_is_refused(bn_model: nn.Module) -> None:
    with pytest.raises(tta.ConfigError, match="q"):
        tta.adapt(bn_model, "rpl", q=0.0)
    assert math.isclose(tta.adapt(bn_model, "rpl").config.q, 0.8)
