"""EATA, ETA and RDumb: sample selection, the skipped update, the Fisher term, the periodic reset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import tta
from tta.core.fisher import pseudo_label_fisher
from tta.core.losses import entropy

ALL_SELECTED = {"e_margin": 1.0, "d_margin": 1.0}  # every sample reliable and (almost surely) non-redundant


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTA_CACHE", str(tmp_path / "cache"))


def _state(adapted: tta.AdaptedModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapted.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("method", ["eta", "eata", "rdumb"])
def test_no_selected_sample_means_no_update(
    bn_model: nn.Module, adapt_any: Callable[..., nn.Module], method: str
) -> None:
    adapted = adapt_any(bn_model, method, e_margin=1e-6)  # nothing is that certain
    before = _state(adapted)
    logits = adapted(torch.rand(8, 3, 16, 16))
    assert logits.shape == (8, 10)
    assert int(adapted.last.n_used) == 0
    assert adapted.counters.skipped == 1 and adapted.counters.updates == 0
    after = _state(adapted)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not adapted.optimizer.state  # no moment was ever taken


def test_selection_follows_reliability_and_redundancy(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "eta", e_margin=1.0, d_margin=0.999)
    x = torch.rand(8, 3, 16, 16)
    logits = adapted(x)
    assert int(adapted.last.n_used) == 8  # first batch: no redundancy filter yet
    torch.testing.assert_close(adapted.model_probs, logits.softmax(1).mean(0))
    probs = adapted.model_probs.clone()
    with torch.no_grad():
        current = adapted.model(x)
    cos = torch.nn.functional.cosine_similarity(probs.unsqueeze(0), current.softmax(1), dim=1)
    adapted(x)
    assert int(adapted.last.n_used) == int((cos.abs() < 0.999).sum())
    assert int(adapted.last.diagnostics["reliable"]) == int((entropy(current) < torch.log(torch.tensor(10.0))).sum())


def test_eta_is_eata_without_fisher(bn_model: nn.Module, adapt_any: Callable[..., nn.Module]) -> None:
    eta = tta.adapt(bn_model, "eta", **ALL_SELECTED)
    eata = adapt_any(bn_model, "eata", fisher_alpha=0.0, **ALL_SELECTED)
    for _ in range(3):
        x = torch.rand(8, 3, 16, 16)
        torch.testing.assert_close(eata(x), eta(x), atol=0, rtol=0)
    torch.testing.assert_close(eata.model.state_dict(), eta.model.state_dict(), atol=0, rtol=0)


def _drift(adapted: tta.AdaptedModel, start: list[torch.Tensor]) -> float:
    return sum(float((p.detach() - s).pow(2).sum()) for p, s in zip(adapted.params(), start, strict=True))


def test_fisher_term_holds_parameters_near_the_source(
    bn_model: nn.Module, adapt_any: Callable[..., nn.Module]
) -> None:
    free = adapt_any(bn_model, "eata", fisher_alpha=0.0, lr=1e-2, **ALL_SELECTED)
    held = adapt_any(bn_model, "eata", fisher_alpha=1e9, lr=1e-2, **ALL_SELECTED)
    start = [p.detach().clone() for p in held.params()]
    assert float(held.fisher.sum()) > 0
    for _ in range(10):
        x = torch.rand(8, 3, 16, 16)
        free(x)
        held(x)
    assert held.counters.updates == free.counters.updates == 10
    assert _drift(held, start) < 0.05 * _drift(free, start)


def test_fisher_is_the_mean_squared_batch_gradient(bn_model: nn.Module) -> None:
    model = tta.adapt(bn_model, "eta").model
    params = [p for p in model.parameters() if p.requires_grad]
    images = torch.rand(12, 3, 16, 16)
    fisher = pseudo_label_fisher(model, params, images, batch_size=6)
    expected = [torch.zeros_like(p) for p in params]
    for batch in images.split(6):
        logits = model(batch)
        grads = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, logits.argmax(1)), params)
        for e, g in zip(expected, grads, strict=True):
            e += g ** 2 / 2
    torch.testing.assert_close(fisher, expected)
    assert all(p.grad is None for p in params)


def test_eata_needs_source_data(bn_model: nn.Module) -> None:
    with pytest.raises(tta.ConfigError, match="source data"):
        tta.adapt(bn_model, "eata")


def test_rdumb_is_back_at_the_source_after_exactly_reset_every_updates(bn_model: nn.Module) -> None:
    fresh = tta.adapt(bn_model, "rdumb", reset_every=3, **ALL_SELECTED)
    adapted = tta.adapt(bn_model, "rdumb", reset_every=3, **ALL_SELECTED)
    initial = _state(fresh)
    for _ in range(2):
        adapted(torch.rand(8, 3, 16, 16))
    two = _state(adapted)
    assert not all(torch.equal(two[k], initial[k]) for k in initial)
    adapted(torch.rand(8, 3, 16, 16))
    assert adapted.counters.updates == 3 and adapted.counters.resets == 1
    after = _state(adapted)
    assert after.keys() == initial.keys() and all(torch.equal(after[k], initial[k]) for k in initial)
    assert adapted.model_probs.numel() == 0 and not adapted.optimizer.state
    x = torch.rand(8, 3, 16, 16)
    torch.testing.assert_close(adapted(x), fresh(x), atol=0, rtol=0)
