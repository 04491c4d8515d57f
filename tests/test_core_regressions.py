"""Regressions found by the fuzz suite (tests/test_fuzz.py) in the method core."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import tta


def test_adapted_model_can_be_copied_after_a_gradient_step(bn_model: nn.Module) -> None:
    """``last`` kept the loss with its autograd graph: deepcopy failed and the graph stayed alive until the next
    batch."""
    adapted = tta.adapt(bn_model, "tent")
    adapted(torch.rand(8, 3, 16, 16))
    assert adapted.last is not None and adapted.last.loss is not None and not adapted.last.loss.requires_grad
    twin = copy.deepcopy(adapted)
    x = torch.rand(8, 3, 16, 16)
    torch.testing.assert_close(twin(x), adapted(x), atol=0, rtol=0)


def test_domain_id_past_64_bits_is_an_input_error(bn_model: nn.Module) -> None:
    """A Python int too large for int64 escaped as torch's ValueError instead of an InputError."""
    adapted = tta.adapt(bn_model, "tent")
    with pytest.raises(tta.InputError, match="fit in 64 bits"):
        adapted(torch.rand(4, 3, 16, 16), domain=2**70)


def test_first_single_image_on_a_window_with_batchnorm1d(bn_model: nn.Module) -> None:
    """The first image of a sliding window was predicted alone: BatchNorm1d with batch statistics raised torch's
    ValueError (one value per channel) instead of predicting."""
    adapted = tta.adapt(bn_model, "tent", window=4)
    for _ in range(6):
        out = adapted(torch.rand(1, 3, 16, 16))
        assert out.shape == (1, 10) and bool(torch.isfinite(out).all())
