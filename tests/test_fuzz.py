"""Fuzz suite: random batches and domain ids against every registered method on BatchNorm, GroupNorm and LayerNorm
models and a small ViT, and concurrent callers.

A seeded generator draws shapes, dtypes, value ranges, NaN/inf placements, empty and single-image batches and
domain ids (negative, huge, wrong shape, float, not ids at all), inside ``torch.no_grad()``/``inference_mode()``
or not. An independent oracle says what each call must do; every outcome is either

- a correct prediction: (N, classes) logits, bit-identical to what a copy of the model taken before the call
  predicts for the same batch converted to float32, with every state tensor finite afterwards; or
- the intended error (``InputError``), after which the whole state (parameters, buffers, declared values and
  optimizer state) is bit-identical to before.

Concurrent callers (threads) must give outputs and a final state equal to one of the sequential orders.
The sweep marked ``slow`` (deselect with ``-m 'not slow'``) draws more calls per method and model.
"""

from __future__ import annotations

import copy
import itertools
import random
import threading
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import tta
from tta.core.base import MAX_DOMAIN_IDS, RANGE_TOLERANCE
from tta.errors import InputError, ModelError
from tta.methods import get_method

METHODS = tta.list_methods()
MODELS = ("bn_model", "gn_model", "ln_model", "vit_model")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Calibrations are cached on disk: keep them out of the user's cache."""
    monkeypatch.setenv("TTA_CACHE", str(tmp_path / "cache"))


@dataclass
class Case:
    """One call: the batch, the domain argument, the grad context, and whether the oracle expects an error."""

    x: Any
    domain: Any
    context: str
    error: bool
    why: str


def _valid_domain(rng: random.Random, n: int) -> Any:
    kind = rng.choice(["none", "none", "int", "tensor", "huge", "scalar_tensor"])
    if kind == "int":
        return rng.randrange(0, 5)
    if kind == "tensor":
        return torch.tensor([rng.randrange(0, 3) for _ in range(n)], dtype=rng.choice([torch.long, torch.int32]))
    if kind == "huge":
        return torch.tensor([rng.choice([2**62, 2**40, 7]) for _ in range(n)])
    if kind == "scalar_tensor":
        return torch.tensor(rng.randrange(0, 3))
    return None


def _bad_domain(rng: random.Random, n: int) -> Any:
    kind = rng.choice(["negative", "overflow", "shape", "float", "list", "bool"])
    if kind == "negative":
        return torch.tensor([rng.randrange(-3, 2) for _ in range(n - 1)] + [-1]) if rng.random() < 0.5 else -1
    if kind == "overflow":
        return 2**70
    if kind == "shape":
        return torch.zeros(n + rng.choice([1, 2]), dtype=torch.long) if rng.random() < 0.5 else torch.zeros(
            n, 1, dtype=torch.long)
    if kind == "float":
        return torch.zeros(n) if rng.random() < 0.5 else 1.0
    if kind == "list":
        return [0] * n
    return True


FAULTS = ("ndim", "dtype", "channels", "empty", "non-finite", "range", "domain")
RANGES = {"unit": (0.0, 1.0), "tolerance": (-RANGE_TOLERANCE / 2, 1 + RANGE_TOLERANCE / 2), "255": (0.0, 255.0),
          "signed": (-1.0, 1.0), "huge": (0.0, 1e30)}


def _random_case(rng: random.Random, min_batch: int, window: int) -> Case:
    """A random call, valid or with one or two random faults, and the oracle's verdict."""
    faults = set() if rng.random() < 0.5 else set(rng.sample(FAULTS, rng.choice([1, 1, 2])))
    n = 0 if "empty" in faults else rng.choice([1, 1, 2, 3, 5, 8])
    c = rng.choice([1, 4]) if "channels" in faults else 3
    h, w = rng.choice([(16, 16), (16, 16), (8, 8), (5, 7), (17, 16)]) if window <= 1 else (16, 16)  # a window
    ndim = rng.choice([3, 5]) if "ndim" in faults else 4
    shape = {4: (n, c, h, w), 3: (c, h, w), 5: (n, 1, c, h, w)}[ndim]
    dtype = (rng.choice([torch.uint8, torch.int64]) if "dtype" in faults else
             rng.choice([torch.float32] * 3 + [torch.float64, torch.float16, torch.bfloat16]))
    value_range = rng.choice(["255", "signed", "huge"]) if "range" in faults else rng.choice(["unit"] * 3 + [
        "tolerance"])
    low, high = RANGES[value_range]
    g = torch.Generator().manual_seed(rng.randrange(2**31))
    x = torch.rand(shape, generator=g, dtype=torch.float64) * (high - low) + low
    if "range" in faults and x.numel():
        x.view(-1)[0] = high if high > 1 else low  # the out-of-range value is certainly there
    if "non-finite" in faults and x.numel():
        x.view(-1)[rng.randrange(x.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
    x = x.to(dtype) if dtype.is_floating_point else x.clamp(-1e9, 1e9).nan_to_num(0.0, 0.0, 0.0).to(dtype)
    domain = _bad_domain(rng, max(n, 1)) if "domain" in faults else _valid_domain(rng, n)
    context = rng.choice(["plain", "plain", "no_grad", "inference_mode"])
    if faults:
        return Case(x, domain, context, True, "+".join(sorted(faults)))
    if n < min_batch and not (window > 1 and n == 1):
        return Case(x, domain, context, True, "min batch")
    return Case(x, domain, context, False, "valid")


def _context(name: str) -> Any:
    return {"plain": nullcontext(), "no_grad": torch.no_grad(), "inference_mode": torch.inference_mode()}[name]


def _state(adapted: nn.Module) -> Any:
    """Everything ``state_dict`` holds (tensors, declared values, optimizer state), deep-copied."""
    return copy.deepcopy(adapted.state_dict())


def _equal(a: Any, b: Any) -> bool:
    """Bit-identical nested state (tensors compared by dtype, shape and every bit, NaN included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8) if a.numel() else a,
                                                       b.reshape(-1).view(torch.uint8) if b.numel() else b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(u, v) for u, v in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _finite_state(adapted: nn.Module) -> bool:
    return all(torch.isfinite(t).all() for t in adapted.state_dict().values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())


def _build(adapt_any: Callable[..., nn.Module], model: nn.Module, method: str, **kwargs: Any) -> nn.Module:
    try:
        return adapt_any(model, method, **kwargs)
    except ModelError as err:  # the intended error for a model the method cannot adapt (e.g. adabn without BN)
        pytest.skip(f"{method} does not adapt this model: {err}")


def _fuzz(adapted: tta.AdaptedModel, seed: int, calls: int) -> None:
    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    for i in range(calls):
        case = _random_case(rng, adapted.requires.min_batch, adapted.window)
        before = _state(adapted)
        reference = copy.deepcopy(adapted)
        torch.manual_seed(i)
        try:
            with _context(case.context):
                out = adapted(case.x, domain=case.domain)
        except InputError as err:
            # Methods that keep images in their state (a memory bank, a window) refuse a new image size until reset.
            new_size = "reset() before changing the image size" in str(err)
            assert case.error or new_size, f"call {i} ({case.why}, {case.context}): valid input rejected: {err}"
            assert _equal(before, _state(adapted)), f"call {i} ({case.why}): state changed by a rejected batch"
            outcomes[case.why] = outcomes.get(case.why, 0) + 1
            continue
        assert not case.error, f"call {i}: expected an InputError ({case.why}), got a prediction"
        assert isinstance(out, torch.Tensor) and out.shape == (case.x.shape[0], 10), f"call {i}: bad output"
        assert out.dtype == torch.float32 and bool(torch.isfinite(out).all()), f"call {i}: non-finite prediction"
        assert _finite_state(adapted), f"call {i}: a valid batch left non-finite state"
        torch.manual_seed(i)
        expected = reference(case.x.float(), domain=case.domain)
        assert torch.equal(out, expected), f"call {i} ({case.x.dtype}, {case.context}): prediction differs"
        outcomes["valid"] = outcomes.get("valid", 0) + 1
    assert outcomes.get("valid", 0) > 0 and len(outcomes) > 1, f"the generator covered too little: {outcomes}"


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_random_calls_predict_or_fail_cleanly(
    method: str, model_name: str, request: pytest.FixtureRequest, adapt_any: Callable[..., nn.Module],
    one_thread: None,
) -> None:
    adapted = _build(adapt_any, request.getfixturevalue(model_name), method)
    _fuzz(adapted, seed=sum(map(ord, method + model_name)), calls=24)


@pytest.mark.parametrize("method", [m for m in METHODS if get_method(m).sliding_window])
def test_random_single_images_on_a_sliding_window(
    method: str, bn_model: nn.Module, adapt_any: Callable[..., nn.Module], one_thread: None
) -> None:
    adapted = _build(adapt_any, bn_model, method, window=4)
    _fuzz(adapted, seed=7, calls=12)


@pytest.mark.parametrize("method", METHODS)
def test_random_calls_with_a_guard(
    method: str, bn_model: nn.Module, adapt_any: Callable[..., nn.Module], one_thread: None
) -> None:
    g = torch.Generator().manual_seed(3)
    source = (torch.rand(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g))
    adapted = _build(adapt_any, bn_model, method, guard="default", source_data=source)
    _fuzz(adapted, seed=11, calls=12)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_random_calls_larger_sweep(
    method: str, model_name: str, request: pytest.FixtureRequest, adapt_any: Callable[..., nn.Module],
    one_thread: None,
) -> None:
    for seed in range(2):
        adapted = _build(adapt_any, request.getfixturevalue(model_name), method)
        _fuzz(adapted, seed=1000 + seed, calls=40)


def test_many_distinct_huge_domain_ids_are_bounded(bn_model: nn.Module, adapt_any: Callable[..., nn.Module]) -> None:
    """Memory never depends on an id's value; past MAX_DOMAIN_IDS distinct ids the call fails and changes nothing."""
    for method in METHODS:
        try:
            adapted = adapt_any(bn_model, method)
        except ModelError:
            continue
        if not adapted.requires.domain_ids:
            continue
        adapted(torch.rand(4, 3, 16, 16), domain=torch.tensor([2**62, 0, 2**62, 5]))
        before = _state(adapted)
        ids = torch.arange(MAX_DOMAIN_IDS + 1, dtype=torch.long) * 2**40
        with pytest.raises(InputError, match="distinct domain ids"):
            adapted(torch.rand(len(ids), 3, 4, 4), domain=ids)
        assert _equal(before, _state(adapted))


# ------------------------------------------------------------------------------------------------ concurrency
def _run_concurrently(adapted: nn.Module, batches: list[tuple[torch.Tensor, Any]], seed: int) -> list[torch.Tensor]:
    outputs: list[torch.Tensor | None] = [None] * len(batches)
    errors: list[BaseException] = []
    start = threading.Barrier(len(batches))

    def call(i: int) -> None:
        try:
            start.wait()
            outputs[i] = adapted(batches[i][0], domain=batches[i][1])
        except BaseException as err:  # reported in the main thread
            errors.append(err)

    torch.manual_seed(seed)
    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"a concurrent call failed: {errors[0]!r}"
    return [o for o in outputs if o is not None]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("model_name", ["bn_model", "gn_model"])
def test_concurrent_callers_equal_some_sequential_order(
    method: str, model_name: str, request: pytest.FixtureRequest, adapt_any: Callable[..., nn.Module]
) -> None:
    adapted = _build(adapt_any, request.getfixturevalue(model_name), method)
    g = torch.Generator().manual_seed(5)
    batches = [(torch.rand(6, 3, 16, 16, generator=g) * (0.3 + 0.3 * i), i) for i in range(3)]
    initial = copy.deepcopy(adapted)
    outputs = _run_concurrently(adapted, batches, seed=9)
    final = _state(adapted)
    for order in itertools.permutations(range(len(batches))):
        replay = copy.deepcopy(initial)
        torch.manual_seed(9)
        got: dict[int, torch.Tensor] = {i: replay(batches[i][0], domain=batches[i][1]) for i in order}
        if all(torch.equal(got[i], outputs[i]) for i in range(len(batches))) and _equal(final, _state(replay)):
            return
    pytest.fail(f"{method}: concurrent outputs and final state match no sequential order of the calls")
