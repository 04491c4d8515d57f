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


def test_large_finite_state_is_not_taken_for_non_finite(bn_model: nn.Module) -> None:
    """The finiteness check summed squares: a finite statistic past ~1e19 overflowed to inf and every batch was
    rolled back. Only NaN and inf count as non-finite."""
    model = copy.deepcopy(bn_model)
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    with torch.no_grad():
        bn.running_var[0] = 1e30  # finite in float32; its square is not
    adapted = tta.adapt(model, "source")
    adapted(torch.rand(4, 3, 16, 16))
    assert adapted.counters.rejected == 0


@pytest.mark.parametrize(("model_name", "method"), [("bn_model", "tent"), ("gn_model", "source")])
def test_state_moved_to_another_dtype_is_still_rolled_back(model_name: str, method: str,
                                                           request: pytest.FixtureRequest) -> None:
    """The snapshot buffers are reused from batch to batch; after ``.double()`` they must follow the new tensors,
    so that a batch which poisons the state is still undone exactly. (``.double()`` after an update also left
    Adam's moments in float32, and the next step crashed.)"""
    adapted = tta.adapt(request.getfixturevalue(model_name), method)
    adapted(torch.rand(4, 3, 16, 16))  # fills the snapshot buffers (float32)
    adapted.double()
    with torch.no_grad():
        for param in adapted.parameters():
            param.add_(1e-12)  # below float32's resolution: a float32 snapshot would lose it
    adapted(torch.rand(4, 3, 16, 16, dtype=torch.float64))
    before = copy.deepcopy(adapted.state_dict())
    conv = next(m for m in adapted.model.modules() if isinstance(m, nn.Conv2d))

    def poison(module: nn.Module, args: object, output: torch.Tensor) -> None:
        with torch.no_grad():
            module.weight.fill_(float("nan"))  # after its use: this batch's loss stays finite

    handle = conv.register_forward_hook(poison)
    adapted(torch.rand(4, 3, 16, 16, dtype=torch.float64))
    handle.remove()
    assert adapted.counters.rejected == 1
    after = adapted.state_dict()
    tensors = {k: v for k, v in before.items() if isinstance(v, torch.Tensor)}
    assert tensors
    for key, value in tensors.items():
        assert after[key].dtype == value.dtype
        torch.testing.assert_close(after[key], value, atol=0, rtol=0, equal_nan=True)
