"""ROID: weight ensembling with the source, prior correction, and the plain weighted SLR step its switches leave."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import tta
from tta.core.losses import entropy, soft_likelihood_ratio
from tta.core.params import norm_affine_params

PLAIN = {"use_consistency": False, "use_prior_correction": False, "src_momentum": 1.0}


def _batch(seed: int = 1, n: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def test_weight_ensembling_mixes_the_stepped_parameters_with_the_source(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "roid", lr=1e-2)
    source_before = [p.detach().clone() for p in norm_affine_params(adapted.source)]
    stepped: list[list[torch.Tensor]] = []
    step = adapted.optimizer.step

    def record(*args: object, **kwargs: object) -> object:
        result = step(*args, **kwargs)
        stepped.append([p.detach().clone() for p in adapted.params()])
        return result

    adapted.optimizer.step = record
    for seed in (1, 2):
        adapted(_batch(seed))
        expected = [s.mul(0.99).add(src, alpha=1 - 0.99) for s, src in zip(stepped[-1], source_before, strict=True)]
        for p, e in zip(adapted.params(), expected, strict=True):
            torch.testing.assert_close(p.detach(), e, atol=0, rtol=0)
    assert len(stepped) == 2 and not torch.equal(stepped[0][0], source_before[0])  # the step did move them
    for p, s in zip(norm_affine_params(adapted.source), source_before, strict=True):
        assert torch.equal(p, s) and not p.requires_grad  # the source copy never trains


def test_prior_correction_only_rescales_each_class_by_the_smoothed_prior(bn_model: nn.Module) -> None:
    x = _batch(n=12)
    corrected = tta.adapt(bn_model, "roid")(x)
    plain = tta.adapt(bn_model, "roid", use_prior_correction=False)(x)
    prior = plain.softmax(1).mean(0)
    smooth = max(1 / 12, 1 / 10) / prior.max()
    factor = (prior + smooth) / (1 + smooth * 10)
    assert bool((factor > 0).all())
    torch.testing.assert_close(corrected, plain * factor)


def test_switches_off_leave_a_plain_weighted_slr_step(bn_model: nn.Module) -> None:
    x = _batch(n=20)
    # SGD without momentum: the update is the gradient itself (Adam's first step would only show its sign).
    adapted = tta.adapt(bn_model, "roid", optimizer="sgd", lr=0.5, momentum=0.0, **PLAIN)
    hand = type(adapted.model)()  # the same tiny architecture, configured as ROID configures it
    for m in hand.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    hand.load_state_dict(adapted.model.state_dict())
    hand.eval().requires_grad_(False)
    params = norm_affine_params(hand)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=0.5)

    logits = hand(x)
    probs = logits.detach().softmax(1)
    diversity = 1 - F.cosine_similarity(torch.full((1, 10), 0.1), probs, dim=1)
    diversity = (diversity - diversity.min()) / (diversity.max() - diversity.min())
    certainty = -entropy(logits.detach())
    certainty = (certainty - certainty.min()) / (certainty.max() - certainty.min())
    dropped = diversity < diversity.mean()
    weights = torch.exp(diversity * certainty * 3)
    loss = (soft_likelihood_ratio(logits) * weights)[~dropped].sum() / 20
    loss.backward()
    optimizer.step()

    out = adapted(x)
    torch.testing.assert_close(out, logits.detach(), atol=0, rtol=0)  # no correction: the logits before the step
    for p, q in zip(adapted.params(), params, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-5)
    assert int(adapted.last.n_used) == int((~dropped).sum())
    torch.testing.assert_close(adapted.class_probs_ema, 0.9 * torch.full((10,), 0.1) + 0.1 * probs.mean(0))


def test_every_switch_combination_adapts(bn_model: nn.Module) -> None:
    x = _batch()
    for weighting in (True, False):
        for consistency in (True, False):
            adapted = tta.adapt(bn_model, "roid", use_weighting=weighting, use_consistency=consistency)
            before = [p.detach().clone() for p in adapted.params()]
            assert torch.isfinite(adapted(x)).all()
            assert adapted.counters.updates == 1
            assert any(not torch.equal(b, p) for b, p in zip(before, adapted.params(), strict=True))


def test_identical_predictions_do_not_give_nan_weights(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "roid")
    adapted(torch.full((8, 3, 16, 16), 0.5))
    assert adapted.counters.updates == 1 and adapted.counters.rejected == 0
    assert all(torch.isfinite(p).all() for p in adapted.params())
