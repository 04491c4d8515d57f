"""Contract tests every registered method must pass on BatchNorm, GroupNorm and LayerNorm test models: input checks,
no side effects, reset, state round trip; a model a method cannot adapt is refused with a ``ModelError``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import VIT_ONLY, TinyBNNet, TinyGNNet, TinyLNNet, _adapt_any, _with_source_stats, tiny_vit
from torch import nn

import tta

METHODS = tta.list_methods()
MODELS: dict[str, Callable[[], nn.Module]] = {
    "bn": lambda: _with_source_stats(TinyBNNet()), "gn": lambda: TinyGNNet().eval(), "ln": lambda: TinyLNNet().eval(),
    "vit": tiny_vit,
}


def _supported(method: str, kind: str) -> bool:
    try:
        _adapt_any(MODELS[kind](), method)
    except tta.ModelError:
        return False
    return True


CASES = [(m, kind) for m in METHODS for kind in MODELS
         if (kind == "bn" and m not in VIT_ONLY) or _supported(m, kind)]
BASE: dict[int, nn.Module] = {}
UNSUPPORTED = [(m, kind) for m in METHODS for kind in MODELS if (m, kind) not in CASES]


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(params=CASES, ids=[f"{m}-{kind}" for m, kind in CASES])
def adapted(request: pytest.FixtureRequest, adapt_any: Callable[..., nn.Module]) -> nn.Module:
    method, kind = request.param
    torch.manual_seed(0)
    model = MODELS[kind]()
    adapted = adapt_any(model, method)
    BASE[id(adapted)] = model  # the model it was built from, for tests that build a second one
    return adapted


def test_every_method_adapts_bn_models_and_some_adapt_the_others() -> None:
    assert {m for m, kind in CASES if kind == "bn"} == set(METHODS) - VIT_ONLY
    assert {"source", "tent"} <= {m for m, kind in CASES if kind == "ln"}
    assert {"tent", "eta", "sar", "deyo", "roid", "cotta", "lame", "foa"} <= {m for m, kind in CASES if kind == "vit"}


@pytest.mark.parametrize(("method", "kind"), UNSUPPORTED)
def test_unsupported_models_are_refused_with_the_fix(method: str, kind: str) -> None:
    with pytest.raises(tta.ModelError, match=r"use a|load the"):
        _adapt_any(MODELS[kind](), method)


@pytest.mark.parametrize(("x", "message"), [
    (torch.rand(3, 16, 16), r"shape \(N, C, H, W\)"),
    (torch.rand(4, 1, 16, 16), "expects 3 input channels but the batch has 1"),
    (torch.rand(4, 16, 16, 3), "expects 3 input channels but the batch has 16"),
    (torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8), "expected float images"),
    (torch.rand(0, 3, 16, 16), "empty"),
    ("not a tensor", "expected a torch.Tensor"),
])
def test_bad_batches_are_rejected(adapted: tta.AdaptedModel, x: object, message: str) -> None:
    with pytest.raises(tta.InputError, match=message):
        adapted(x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_batch_changes_nothing(adapted: tta.AdaptedModel, bad: float) -> None:
    adapted(torch.rand(8, 3, 16, 16))  # some adaptation state first
    before = _snapshot(adapted)
    x = torch.rand(8, 3, 16, 16)
    x[3, 1, 2, 2] = bad
    with pytest.raises(tta.InputError, match="NaN or inf"):
        adapted(x)
    assert _same(before, _snapshot(adapted))


def test_caller_model_is_never_modified(bn_model: nn.Module, adapt_any: Callable[..., nn.Module]) -> None:
    before = _snapshot(bn_model)
    for method in sorted(set(METHODS) - VIT_ONLY):
        adapted = adapt_any(bn_model, method)
        adapted(torch.rand(8, 3, 16, 16))
    assert _same(before, _snapshot(bn_model))
    assert not bn_model.training


def test_reset_returns_to_the_first_prediction(adapted: tta.AdaptedModel) -> None:
    x = torch.rand(8, 3, 16, 16) * 0.5
    torch.manual_seed(0)  # the same random draws (augmentations) for both calls
    first = adapted(x)
    for _ in range(3):
        adapted(torch.rand(8, 3, 16, 16))
    adapted.reset()
    torch.manual_seed(0)
    torch.testing.assert_close(adapted(x), first, atol=0, rtol=0)


def test_state_dict_round_trip_resumes_exactly(adapted: tta.AdaptedModel, adapt_any: Callable[..., nn.Module]) -> None:
    for _ in range(2):
        adapted(torch.rand(8, 3, 16, 16))
    fresh = adapt_any(BASE[id(adapted)], adapted.name)
    fresh.load_state_dict(adapted.state_dict())
    x = torch.rand(8, 3, 16, 16)
    for _ in range(2):  # the second time: optimizer state resumed too
        torch.manual_seed(1)  # the same random draws (augmentations) for both models
        loaded = fresh(x)
        torch.manual_seed(1)
        torch.testing.assert_close(loaded, adapted(x), atol=0, rtol=0)


def test_domain_argument_is_checked(adapted: tta.AdaptedModel) -> None:
    with pytest.raises(tta.InputError, match="one id per image"):
        adapted(torch.rand(4, 3, 16, 16), domain=torch.zeros(3, dtype=torch.long))
    adapted(torch.rand(4, 3, 16, 16), domain=0)
