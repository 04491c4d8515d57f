"""Tent: trainable parameters, reset and pre-update logits (docs/methods/entropy.md), the official configuration."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tta
from tta.core.losses import entropy


def test_only_norm_affine_parameters_train(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "tent")
    trainable = {n for n, p in adapted.model.named_parameters() if p.requires_grad}
    norms = {f"{n}.{p}" for n, m in adapted.model.named_modules()
             if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for p in ("weight", "bias")}
    assert trainable == norms
    bns = [m for m in adapted.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(m.running_mean is None and not m.track_running_stats for m in bns)


def test_layernorm_and_groupnorm_affine_train(ln_model: nn.Module) -> None:
    adapted = tta.adapt(ln_model, "tent")
    trainable = {n for n, p in adapted.model.named_parameters() if p.requires_grad}
    assert trainable == {"net.1.weight", "net.1.bias", "net.5.weight", "net.5.bias"}
    before = adapted.model.net[1].weight.detach().clone()
    adapted(torch.rand(8, 3, 8, 8))
    assert not torch.equal(before, adapted.model.net[1].weight)


def test_returns_logits_before_the_update_and_lowers_entropy(bn_model: nn.Module) -> None:
    x = torch.rand(32, 3, 16, 16) * 0.5
    adapted = tta.adapt(bn_model, "tent", lr=1e-2)
    reference = tta.adapt(bn_model, "tent")  # same configuration, never updated
    with torch.no_grad():
        expected = reference.model(x)
    logits = adapted(x)
    torch.testing.assert_close(logits, expected)
    with torch.no_grad():
        after = adapted.model(x)
    assert not torch.allclose(after, expected)
    assert entropy(after).mean() < entropy(expected).mean()


def test_reset_restores_parameters_bit_exactly_and_clears_adam(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "tent")
    initial = {k: v.clone() for k, v in adapted.model.state_dict().items()}
    x = torch.rand(16, 3, 16, 16)
    first = adapted(x)
    adapted(x)
    assert adapted.optimizer.state  # Adam moments exist
    adapted.reset()
    assert not adapted.optimizer.state
    for key, value in adapted.model.state_dict().items():
        assert torch.equal(value, initial[key]), key
    torch.testing.assert_close(adapted(x), first, atol=0, rtol=0)


def test_reset_every_update_is_episodic(bn_model: nn.Module) -> None:
    x = torch.rand(16, 3, 16, 16)
    adapted = tta.adapt(bn_model, "tent", reset_every=1)
    torch.testing.assert_close(adapted(x), adapted(x), atol=0, rtol=0)


def test_sgd_and_multiple_steps(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "tent", optimizer="sgd", lr=0.1, steps=3)
    assert isinstance(adapted.optimizer, torch.optim.SGD)
    adapted(torch.rand(8, 3, 16, 16))
    assert adapted.optimizer.state  # momentum buffers after three steps


def test_works_inside_no_grad(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "tent")
    before = [p.detach().clone() for p in adapted.params()]
    with torch.no_grad():
        adapted(torch.rand(8, 3, 16, 16))
    assert any(not torch.equal(b, p) for b, p in zip(before, adapted.params(), strict=True))


def test_model_without_norm_layers_is_rejected(no_norm_model: nn.Module) -> None:
    with pytest.raises(tta.ModelError, match="has none"):
        tta.adapt(no_norm_model, "tent")


def test_single_image_with_batchnorm1d_is_rejected_without_change(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "tent")
    state = {k: v.clone() for k, v in adapted.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(tta.InputError, match="at least 2 images"):
        adapted(torch.rand(1, 3, 16, 16))
    assert all(torch.equal(v, adapted.state_dict()[k]) for k, v in state.items())
