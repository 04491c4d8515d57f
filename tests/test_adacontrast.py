"""AdaContrast: the key encoder is an EMA of the model, the queue and the bank take only the current batch, the
pseudo-labels come from the nearest bank neighbours, and the contrast leaves out same-label queue entries."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta
from tta.core.params import ema_update
from tta.methods import adacontrast as ac
from tta.models.surgery import FeatureSplit


def _batch(seed: int = 1, n: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


@pytest.fixture
def identity_views(monkeypatch: pytest.MonkeyPatch) -> None:
    """Views equal to the image, so that the expected features can be recomputed."""
    monkeypatch.setattr(ac, "weak_view", lambda x, gen: x.clone())
    monkeypatch.setattr(ac, "strong_view", lambda x, gen: x.clone())


def test_key_encoder_is_an_ema_of_the_model_before_its_update(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "adacontrast", lr=1e-2, queue_size=64, key_momentum=0.9)
    for seed in (1, 2):
        model_before = [p.detach().clone() for p in adapted.model.parameters()]
        key_before = [p.detach().clone() for p in adapted.key_model.parameters()]
        adapted(_batch(seed))
        for k, k0, p0 in zip(adapted.key_model.parameters(), key_before, model_before, strict=True):
            torch.testing.assert_close(k, 0.9 * k0 + 0.1 * p0)
    moved = [not torch.equal(a, b) for a, b in zip(adapted.model.parameters(), bn_model.parameters(), strict=True)]
    assert any(moved)


def test_queue_takes_only_this_batchs_keys_and_pseudo_labels(bn_model: nn.Module, identity_views: None) -> None:
    adapted = tta.adapt(bn_model, "adacontrast", queue_size=40, warmup_samples=1000)
    x = _batch(1)
    for step in range(3):
        queue, labels, ptr = adapted.queue.clone(), adapted.queue_labels.clone(), adapted.queue_ptr
        model, key = copy.deepcopy(adapted.model).train(), copy.deepcopy(adapted.key_model).train()
        with torch.no_grad():
            pseudo = model(x).argmax(1)
            ema_update(key, model, adapted.config.key_momentum)
            keys = F.normalize(FeatureSplit(key)(x)[0], dim=1)
        adapted(x)
        idx = (torch.arange(len(x)) + ptr) % 40
        torch.testing.assert_close(adapted.queue[:, idx], keys.T)
        assert torch.equal(adapted.queue_labels[idx], pseudo)
        rest = torch.ones(40, dtype=torch.bool)
        rest[idx] = False
        assert torch.equal(adapted.queue[:, rest], queue[:, rest])
        assert torch.equal(adapted.queue_labels[rest], labels[rest])
        assert adapted.queue_ptr == (ptr + len(x)) % 40, step


def test_bank_holds_the_key_encoders_latest_weak_features(bn_model: nn.Module, identity_views: None) -> None:
    adapted = tta.adapt(bn_model, "adacontrast", queue_size=24)
    batches = [_batch(s, 16) for s in (1, 2, 3)]
    adapted(batches[0])
    with torch.no_grad():
        feats, logits = FeatureSplit(copy.deepcopy(adapted.key_model).train())(batches[0])
    torch.testing.assert_close(adapted.bank_features, feats)
    torch.testing.assert_close(adapted.bank_probs, logits.softmax(1))
    adapted(batches[1])
    assert len(adapted.bank_features) == 32  # appends until full (the reference grows past the size once)
    adapted(batches[2])
    # then overwrites from its pointer (the reference's: the end of the last write, modulo the bank's length)
    assert len(adapted.bank_features) == 32 and adapted.bank_ptr == 0
    with torch.no_grad():
        feats = FeatureSplit(copy.deepcopy(adapted.key_model).train())(batches[2])[0]
    torch.testing.assert_close(adapted.bank_features[16:], feats)


def test_pseudo_labels_are_the_mean_prediction_of_the_nearest_bank_features() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0], [-0.9, 0.1]])
    probs = F.one_hot(torch.tensor([0, 0, 1, 1, 2, 2]), 3).float()
    probs[1] = torch.tensor([0.2, 0.8, 0.0])  # 0.6 / 0.4 for the two nearest of a first-cluster feature
    feats = torch.tensor([[5.0, 0.2], [0.2, 3.0], [-2.0, 0.1]])  # scale does not matter: cosine distance
    assert ac.knn_pseudo_labels(feats, bank, probs, 2).tolist() == [0, 1, 2]
    assert ac.knn_pseudo_labels(feats[:1], bank, probs, 1).tolist() == [0]


def test_after_warm_up_the_queue_labels_come_from_the_bank(bn_model: nn.Module, identity_views: None) -> None:
    adapted = tta.adapt(bn_model, "adacontrast", queue_size=64, warmup_samples=16, num_neighbors=3)
    adapted(_batch(1))  # warm-up: argmax; fills the bank
    x = _batch(2)
    model = copy.deepcopy(adapted.model).train()
    with torch.no_grad():
        feats = FeatureSplit(model)(x)[0]
    expected = ac.knn_pseudo_labels(feats, adapted.bank_features, adapted.bank_probs, 3)
    ptr = adapted.queue_ptr
    adapted(x)
    assert torch.equal(adapted.queue_labels[ptr:ptr + 16], expected)


def test_instance_loss_leaves_out_queue_entries_of_the_same_pseudo_label() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, generator=g)
    pseudo = torch.tensor([0, 1, 2, 0])
    queue_labels = torch.tensor([0, 1, 2, 0, 1, 2])
    expected = torch.stack([
        -logits[i, 0] + torch.logsumexp(torch.cat([logits[i, :1], logits[i, 1:][queue_labels != pseudo[i]]]), 0)
        for i in range(4)]).mean()
    torch.testing.assert_close(ac.instance_loss(logits, pseudo, queue_labels), expected)


def test_prediction_is_the_updated_model_with_running_statistics(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "adacontrast", lr=1e-2, queue_size=64)
    x = _batch(3)
    out = adapted(x)
    model = copy.deepcopy(adapted.model).eval()
    with torch.no_grad():
        torch.testing.assert_close(out, model(x))
        assert not torch.allclose(out, bn_model.eval()(x))


def test_views_keep_shape_and_range_and_replay_after_reset(bn_model: nn.Module) -> None:
    x = (_batch(4) * 255).round() / 255
    gen = torch.Generator().manual_seed(0)
    s, w = ac.strong_view(x, gen), ac.weak_view(x, gen)
    assert s.shape == w.shape == x.shape and float(s.min()) >= 0 and float(s.max()) <= 1
    torch.testing.assert_close(s * 255, (s * 255).round(), rtol=0, atol=1e-4)  # 8-bit values, as PIL's
    assert not torch.equal(s, x)
    torch.manual_seed(0)
    adapted = tta.adapt(bn_model, "adacontrast", queue_size=64)
    first = adapted(x)
    adapted.reset()
    torch.testing.assert_close(adapted(x), first)
