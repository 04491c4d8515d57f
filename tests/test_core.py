"""The method core: thread safety, input handling, rejected updates, save/load, sliding window, domain ids."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import tta


def _state(adapted: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapted.state_dict().items() if isinstance(v, torch.Tensor)}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_images_in_0_255_are_refused_with_the_fix(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "tent")
    before = _state(adapted)
    with pytest.raises(tta.InputError, match="divide by 255"):
        adapted(torch.rand(4, 3, 16, 16) * 255)
    with pytest.raises(tta.InputError, match="normalisation belongs inside the model"):
        adapted(torch.randn(4, 3, 16, 16) * 3)
    assert _same(before, _state(adapted))


def test_float64_and_half_inputs_are_converted(bn_model: nn.Module) -> None:
    x = torch.rand(6, 3, 16, 16)
    ref = tta.adapt(bn_model, "source")(x)
    adapted = tta.adapt(bn_model, "source")
    torch.testing.assert_close(adapted(x.double()), ref)
    assert adapted(x.half()).dtype == torch.float32


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_gradient_methods_work_inside_no_grad_and_inference_mode(bn_model: nn.Module, context: Callable) -> None:
    adapted = tta.adapt(bn_model, "tent")
    before = [p.detach().clone() for p in adapted.params()]
    with context():
        adapted(torch.rand(8, 3, 16, 16))
    assert any(not torch.equal(a, b) for a, b in zip(before, adapted.params(), strict=True))


def test_a_non_finite_loss_is_not_applied_and_is_counted(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "tent")
    adapted(torch.rand(8, 3, 16, 16))
    before = _state(adapted)
    optimizer_before = {k: v.clone() for s in adapted.optimizer.state.values() for k, v in s.items()}
    original = adapted.loss

    def poisoned(x: torch.Tensor, domain: torch.Tensor | None) -> tta.StepOutput:
        out = original(x, domain)
        out.loss = out.loss * float("nan")
        return out

    adapted.loss = poisoned  # type: ignore[method-assign]
    adapted(torch.rand(8, 3, 16, 16))
    assert _same(before, _state(adapted))
    after = {k: v for s in adapted.optimizer.state.values() for k, v in s.items()}
    assert all(torch.equal(optimizer_before[k], after[k]) for k in optimizer_before)
    assert adapted.counters.rejected == 1 and adapted.counters.updates == 1


def test_a_batch_that_leaves_state_non_finite_is_rolled_back(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "adabn", mode="ema")
    adapted(torch.rand(8, 3, 16, 16))
    before = _state(adapted)
    layer = next(m for m in adapted.modules() if hasattr(m, "ema_mean"))
    original = adapted.loss

    def poisoned(x: torch.Tensor, domain: torch.Tensor | None) -> tta.StepOutput:
        out = original(x, domain)
        layer.ema_mean.fill_(float("inf"))  # as an overflow in a statistic would
        return out

    adapted.loss = poisoned  # type: ignore[method-assign]
    adapted(torch.rand(8, 3, 16, 16))
    assert _same(before, _state(adapted)) and adapted.counters.rejected == 1


def test_concurrent_callers_equal_some_sequential_order(bn_model: nn.Module) -> None:
    torch.manual_seed(0)
    batches = [torch.rand(8, 3, 16, 16) for _ in range(12)]
    adapted = tta.adapt(bn_model, "tent")
    order: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    original = adapted.step

    def recording_step(x: torch.Tensor, domain: torch.Tensor | None) -> tta.StepOutput:
        with lock:
            order.append(next(i for i, b in enumerate(batches) if torch.equal(b, x)))
        return original(x, domain)

    adapted.step = recording_step  # type: ignore[method-assign]

    def call(i: int) -> None:
        try:
            adapted(batches[i])
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(order) == list(range(len(batches)))
    sequential = tta.adapt(bn_model, "tent")
    for i in order:
        sequential(batches[i])
    assert _same(_state(sequential), _state(adapted))


def test_save_and_load_restore_exactly(bn_model: nn.Module, tmp_path: Path) -> None:
    adapted = tta.adapt(bn_model, "tent", lr=5e-3)
    for _ in range(3):
        adapted(torch.rand(8, 3, 16, 16))
    path = adapted.save(tmp_path / "adapted.pt")
    loaded = tta.load_adapted(path, bn_model)
    x = torch.rand(8, 3, 16, 16)
    torch.testing.assert_close(loaded(x), adapted(x), rtol=0, atol=0)
    torch.testing.assert_close(loaded(x), adapted(x), rtol=0, atol=0)  # optimizer state too
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_load_onto_another_model_or_a_foreign_file_is_a_clear_error(bn_model: nn.Module, tmp_path: Path) -> None:
    from conftest import TinyBNNet, _with_source_stats

    path = tta.adapt(bn_model, "tent").save(tmp_path / "a.pt")
    with pytest.raises(tta.ModelError, match="another source model"):
        tta.load_adapted(path, _with_source_stats(TinyBNNet(), seed=3))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(tta.ModelError, match="not a readable"):
        tta.load_adapted(tmp_path / "junk.pt", bn_model)


def test_a_mismatched_state_dict_leaves_the_model_untouched(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "tent")
    adapted(torch.rand(8, 3, 16, 16))
    before = _state(adapted)
    state = adapted.state_dict()
    broken = dict(state)
    first = next(k for k in broken if k.startswith("model.") and k.endswith("bias"))
    broken[first] = torch.zeros(3)  # wrong shape, after other entries would already have loaded
    with pytest.raises(tta.ModelError, match="does not fit"):
        adapted.load_state_dict(broken)
    assert _same(before, _state(adapted))
    wrong_method = tta.adapt(bn_model, "adabn").state_dict()
    with pytest.raises(tta.ModelError):
        adapted.load_state_dict(wrong_method)
    assert _same(before, _state(adapted))


def test_sliding_window_updates_once_per_window(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "tent", window=4)
    before = [p.detach().clone() for p in adapted.params()]
    for _ in range(3):
        assert adapted(torch.rand(1, 3, 16, 16)).shape == (1, 10)
    assert adapted.counters.updates == 0
    assert all(torch.equal(a, b) for a, b in zip(before, adapted.params(), strict=True))
    adapted(torch.rand(1, 3, 16, 16))
    assert adapted.counters.updates == 1 and adapted.counters.batches == 1
    adapted.reset()
    assert adapted._window_x.numel() == 0


def test_a_batch_too_small_for_the_method_names_the_window(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "tent")  # BatchNorm1d: batch statistics need two images
    with pytest.raises(tta.InputError, match="window"):
        adapted(torch.rand(1, 3, 16, 16))


def test_domain_ids_cost_no_memory_for_their_value(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "dsbn")
    adapted(torch.rand(4, 3, 16, 16), domain=torch.tensor([0, 2**62, 0, 2**62]))
    assert adapted._domain_keys.tolist() == [0, 2**62]
    with pytest.raises(tta.InputError, match="non-negative"):
        adapted(torch.rand(2, 3, 16, 16), domain=torch.tensor([-1, 0]))
    with pytest.raises(tta.InputError, match="integers"):
        adapted(torch.rand(2, 3, 16, 16), domain=torch.tensor([0.5, 1.0]))


def test_settings_out_of_range_name_the_valid_range(bn_model: nn.Module) -> None:
    for key, value, message in [("lr", float("nan"), "lr must be a finite number"), ("lr", -1.0, "lr must be > 0"),
                                ("weight_decay", float("inf"), "weight_decay must be a finite"),
                                ("momentum", 1.5, r"momentum must be in \[0.0, 1.0\)"),
                                ("steps", 0, "steps must be an integer >= 1")]:
        with pytest.raises(tta.ConfigError, match=message):
            tta.adapt(bn_model, "tent", **{key: value})
    with pytest.raises(tta.ConfigError, match=r"alpha must be in \[0.0, 1.0\]"):
        tta.adapt(bn_model, "adabn", alpha=2.0)


def test_presets_and_source_data_are_checked(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "tent", preset="imagenet")
    assert adapted.config.optimizer == "sgd" and adapted.config.lr == 2.5e-4 and adapted.config.nesterov
    assert tta.adapt(bn_model, "tent", preset="imagenet", lr=0.1).config.lr == 0.1  # keywords win
    with pytest.raises(tta.ConfigError, match="has no preset 'nope'"):
        tta.adapt(bn_model, "tent", preset="nope")
    with pytest.raises(tta.ConfigError, match="unknown clean source"):
        tta.adapt(bn_model, "tent", source_data="bogus")
