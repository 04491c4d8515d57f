"""SHOT-IM: information maximisation (mean entropy minus the entropy of the mean prediction), head frozen."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import tta
from tta.core.params import force_batch_statistics, norm_affine_params
from tta.methods.shot_im import information_maximization


def _batch(seed: int = 1, n: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def test_diversity_is_largest_at_a_uniform_mean_prediction() -> None:
    c = 10
    eye = torch.eye(c) * 20  # every class predicted confidently by one image: the mean prediction is uniform
    _, uniform = information_maximization(eye, epsilon=0.0)
    torch.testing.assert_close(uniform, torch.tensor(math.log(c)))
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(8, c, generator=g) * 3
        _, diversity = information_maximization(logits, epsilon=0.0)
        assert float(diversity) < math.log(c)
    conditional, collapsed = information_maximization(torch.tensor([[9.0, 0.0], [9.0, 0.0]]), epsilon=0.0)
    assert float(collapsed) < 0.01 and float(conditional) < 0.01  # one class everywhere: confident, not diverse


@pytest.mark.parametrize("params", ["norm", "features"])
def test_the_classifier_head_never_changes(bn_model: nn.Module, params: str) -> None:
    adapted = tta.adapt(bn_model, "shot-im", params=params)
    head = copy.deepcopy(adapted.model.head.state_dict())
    before = {k: v.clone() for k, v in adapted.model.named_parameters()}
    for seed in range(3):
        adapted(_batch(seed))
    assert adapted.counters.updates == 3
    assert all(torch.equal(v, head[k]) for k, v in adapted.model.head.state_dict().items())
    changed = {k for k, v in adapted.model.named_parameters() if not torch.equal(v, before[k])}
    if params == "norm":  # only the affine of the norm layers
        assert changed == {"features.1.weight", "features.1.bias", "features.4.weight", "features.4.bias",
                           "features.8.weight", "features.8.bias"}
    else:  # the convolutions too
        assert {"features.0.weight", "features.3.weight"} <= changed and not any(k.startswith("head") for k in changed)


def test_one_step_is_sgd_on_the_information_maximisation_loss(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "shot-im")
    x = _batch()
    # By hand: batch statistics, SGD lr 0.01 momentum 0.9 on the norm affine, loss = mean H(p) - H(mean p) with the
    # epsilon 1e-5 inside the logarithms.
    model = copy.deepcopy(bn_model)
    force_batch_statistics(model)
    params = norm_affine_params(model)
    logits = model(x)
    p = logits.softmax(1)
    m = p.mean(0)
    loss = -(p * torch.log(p + 1e-5)).sum(1).mean() + (m * torch.log(m + 1e-5)).sum()
    loss.backward()
    with torch.no_grad():
        for q in params:
            q -= 0.01 * q.grad
    out = adapted(x)
    torch.testing.assert_close(out, logits.detach(), atol=0, rtol=0)  # the prediction precedes the update
    for mine, theirs in zip(norm_affine_params(adapted.model), params, strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-5)


def test_diversity_weight_zero_is_plain_entropy_minimisation(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "shot-im", diversity_weight=0.0)
    adapted(_batch())
    last = adapted.last
    assert last is not None and last.loss is not None
    torch.testing.assert_close(last.loss, last.diagnostics["entropy"])


def test_the_diversity_term_prevents_the_collapse_of_entropy_minimisation(bn_model: nn.Module) -> None:
    x = _batch(n=32)
    kept = []
    for weight in (0.0, 1.0):
        adapted = tta.adapt(bn_model, "shot-im", diversity_weight=weight, lr=0.05)
        for _ in range(30):
            adapted(x)
        kept.append(len(torch.unique(adapted(x).argmax(1))))
    assert kept[1] > kept[0]


def test_features_without_a_linear_head_is_refused() -> None:
    model = nn.Sequential(nn.Conv2d(3, 10, 3), nn.BatchNorm2d(10), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    with pytest.raises(tta.ModelError, match="classifier head"):
        tta.adapt(model, "shot-im", params="features")
    tta.adapt(model, "shot-im")  # the norm affine needs no head


def test_bad_settings_are_refused(bn_model: nn.Module) -> None:
    with pytest.raises(tta.ConfigError, match="diversity_weight"):
        tta.adapt(bn_model, "shot-im", diversity_weight=-1.0)
    with pytest.raises(tta.ConfigError, match="params"):
        tta.adapt(bn_model, "shot-im", params="all")
