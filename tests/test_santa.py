"""SANTA: the loss is anchored to the frozen source model, the prototypes are the source's class means, and the
contrastive loss treats an image, its augmentation and its nearest prototype as one instance."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import tta
from tta.methods.santa import instance_contrastive_loss


def _batch(seed: int = 1, n: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def _source(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    images = ((torch.rand(n, 3, 16, 16, generator=g) * 0.8 + 0.1) * 255).round() / 255  # exact as uint8
    return images, torch.arange(n) % 10


def test_self_training_is_anchored_to_the_frozen_source(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "santa", source_data=_source(), lr=1e-2, aug_weight=0.0)
    anchor = copy.deepcopy(adapted.anchor.state_dict())
    for seed in (1, 2, 3):
        x = _batch(seed)
        with torch.no_grad():
            p = adapted.model(x).softmax(1)
            anchor_log_p = adapted.anchor(x).log_softmax(1)
        adapted(x)
        expected = -(p * anchor_log_p).sum(1).mean()
        torch.testing.assert_close(adapted.last.diagnostics["self_training"], expected)
    state = adapted.anchor.state_dict()
    assert all(torch.equal(anchor[k], state[k]) for k in anchor)  # the anchor never moves
    moved = [not torch.equal(a, b) for a, b in zip(adapted.params(), tta.adapt(
        bn_model, "santa", source_data=_source()).params(), strict=True)]
    assert any(moved)


def test_prototypes_are_the_class_means_of_the_source_features(bn_model: nn.Module) -> None:
    images, labels = _source()
    adapted = tta.adapt(bn_model, "santa", source_data=(images, labels), source_batch_size=64)  # one batch
    features = adapted.split(images)[0].detach()
    expected = torch.stack([features[labels == c].mean(0) for c in range(10)])
    torch.testing.assert_close(adapted.prototypes, expected, rtol=1e-4, atol=1e-5)


def test_contrastive_loss_equals_a_direct_supcon_computation() -> None:
    g = torch.Generator().manual_seed(0)
    views = torch.randn(5, 3, 8, generator=g)
    projector = nn.Linear(8, 4)
    loss = instance_contrastive_loss(views, projector, 0.1)
    z = F.normalize(projector(views), dim=2)  # (N, V, D)
    total, count = torch.zeros(()), 0
    for i in range(5):
        for a in range(3):
            others = [(j, b) for j in range(5) for b in range(3) if (j, b) != (i, a)]
            logits = torch.stack([z[i, a] @ z[j, b] / 0.1 for j, b in others])
            log_prob = logits - torch.logsumexp(logits, 0)
            positives = [k for k, (j, _) in enumerate(others) if j == i]
            total = total - log_prob[positives].mean()
            count += 1
    torch.testing.assert_close(loss, total / count)


def test_contrastive_loss_is_lowest_when_views_of_an_instance_agree() -> None:
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 1, 8, generator=g)
    agree = base.repeat(1, 3, 1)
    disagree = torch.randn(6, 3, 8, generator=g)
    projector = nn.Identity()
    assert float(instance_contrastive_loss(agree, projector, 0.1)) < float(
        instance_contrastive_loss(disagree, projector, 0.1))
