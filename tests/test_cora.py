"""CORA: its statistics rule, its single-context limit (AdaBN), its update, contexts, determinism and settings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tta
from tta.methods.cora import CoraConfig, RecentContextNorm
from tta.norm.context_norm import Routing


def _clean(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 16, 16, generator=g) * 0.8 + 0.1, torch.randint(0, 10, (n,), generator=g)


def _batch(seed: int = 1, n: int = 16, shift: float = 0.0) -> torch.Tensor:
    x = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 0.6 + 0.2
    return (x + shift).clamp(0, 1)


def _layer(memory: float, prior_n: float = 0.0, source_prior: float = float("inf")) -> RecentContextNorm:
    bn = nn.BatchNorm2d(3).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3]))
        bn.running_var.copy_(torch.tensor([1.5, 0.5, 2.0]))
    return RecentContextNorm.from_bn(bn, memory=memory, prior_n=prior_n, source_prior=source_prior,
                                     declared=1, routing=Routing())


def _route(layer: RecentContextNorm, n: int, k: int) -> None:
    layer.routing.weights = torch.nn.functional.one_hot(torch.full((n,), k), layer.num_contexts).double()


def test_share_statistics_move_with_rate_share_over_share_plus_evidence() -> None:
    layer = _layer(memory=8.0)
    first, second = torch.randn(4, 3, 5, 5), torch.randn(12, 3, 5, 5) * 2 + 1
    _route(layer, 4, 1)
    layer(first)  # a context with no evidence takes its first share's statistics (prior_n 0)
    v, m = torch.var_mean(first.double().transpose(0, 1).reshape(3, -1), dim=1, correction=0)
    torch.testing.assert_close(layer.ctx_mean[1], m)
    torch.testing.assert_close(layer.ctx_var[1], v)
    _route(layer, 12, 1)
    layer(second)  # evidence 4 images (below the memory of 8): rate 12 / 16
    rate = 12 / 16  # as a plain pool so far
    v2, m2 = torch.var_mean(second.double().transpose(0, 1).reshape(3, -1), dim=1, correction=0)
    mean, var = (1 - rate) * m + rate * m2, (1 - rate) * v + rate * v2 + rate * (1 - rate) * (m - m2).square()
    torch.testing.assert_close(layer.ctx_mean[1], mean)
    torch.testing.assert_close(layer.ctx_var[1], var)
    third = torch.randn(4, 3, 5, 5) - 2
    _route(layer, 4, 1)
    layer(third)  # 16 images seen, capped at the memory of 8: rate 4 / 12 (a plain pool would give 4 / 20)
    m3 = third.double().transpose(0, 1).reshape(3, -1).mean(1)
    torch.testing.assert_close(layer.ctx_mean[1], mean + (m3 - mean) / 3)


def test_source_context_never_changes_and_blends_with_its_share_in_the_forward() -> None:
    layer = _layer(memory=8.0, source_prior=4.0)
    before = (layer.ctx_mean[0].clone(), layer.ctx_var[0].clone())
    x = torch.randn(12, 3, 5, 5) * 3 + 2
    _route(layer, 12, 0)
    out = layer(x)
    assert torch.equal(layer.ctx_mean[0], before[0]) and torch.equal(layer.ctx_var[0], before[1])
    fixed = _layer(memory=8.0)  # source_prior inf: the source BatchNorm itself
    _route(fixed, 12, 0)
    ref = nn.functional.batch_norm(x, fixed.source_mean, fixed.source_var, fixed.weight, fixed.bias, False, 0.0,
                                   fixed.eps)
    torch.testing.assert_close(fixed(x), ref)
    assert (out - ref).abs().max() > 0.1  # 12 of 16 parts of its statistics are the share's


def test_store_false_changes_nothing() -> None:
    layer = _layer(memory=8.0)
    _route(layer, 8, 1)
    layer.routing.store = False
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(torch.randn(8, 3, 5, 5))
    assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items())


def test_one_context_batch_statistics_and_no_update_is_adabn(bn_model: nn.Module) -> None:
    cora = tta.adapt(bn_model, "cora", contexts="single", stats_memory=0.0, prior_n=0.0, update_affine=False,
                     use_prior_correction=False, source_data=_clean())
    adabn = tta.adapt(bn_model, "adabn")
    for seed in (1, 2, 3):
        x = _batch(seed, shift=0.1 * seed)
        torch.testing.assert_close(cora(x), adabn(x), atol=1e-4, rtol=1e-4)


def test_the_step_moves_the_shared_affine_then_ensembles_it_with_the_source(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "cora", lr=1e-2, source_data=_clean())
    layers = adapted.model.layers()
    source = [layer.source_weight.clone() for layer in layers]
    stepped: list[torch.Tensor] = []
    step = adapted.optimizer.step

    def record(*args: object, **kwargs: object) -> object:
        result = step(*args, **kwargs)
        stepped.append(layers[0].weight.detach().clone())
        return result

    adapted.optimizer.step = record
    adapted(_batch(1))
    assert adapted.counters.updates == 1 and not torch.equal(stepped[0], source[0])
    torch.testing.assert_close(layers[0].weight.detach(), stepped[0] * 0.99 + source[0] * 0.01, atol=0, rtol=0)
    assert all(torch.equal(layer.source_weight, s) for layer, s in zip(layers, source, strict=True))
    assert {id(p) for p in adapted.params()} == {id(p) for layer in layers for p in (layer.weight, layer.bias)}


def test_prior_correction_multiplies_the_logits_by_the_smoothed_batch_prior(bn_model: nn.Module) -> None:
    on = tta.adapt(bn_model, "cora", source_data=_clean())
    off = tta.adapt(bn_model, "cora", use_prior_correction=False, source_data=_clean())
    x = _batch(4)
    a, b = on(x), off(x)
    prior = b.softmax(1).mean(0)
    n, c = b.shape
    s = max(1 / n, 1 / c) / prior.max()
    torch.testing.assert_close(a, b * (prior + s) / (1 + s * c))


def test_deterministic_for_a_seed_and_reset_returns_to_the_source(bn_model: nn.Module) -> None:
    outs = []
    for _ in range(2):
        torch.manual_seed(0)
        adapted = tta.adapt(bn_model, "cora", source_data=_clean())
        outs.append(torch.cat([adapted(_batch(s, shift=0.3 * (s % 2))) for s in range(4)]))
    assert torch.equal(outs[0], outs[1])
    first = adapted(_batch(9))
    adapted.reset()
    fresh = tta.adapt(bn_model, "cora", source_data=_clean())
    torch.testing.assert_close(adapted(_batch(9)), fresh(_batch(9)))
    assert not torch.equal(first, fresh(_batch(9)))


@pytest.mark.parametrize("immediate", [True, False])
def test_a_shifted_batch_gets_its_new_context_at_once_only_with_immediate(bn_model: nn.Module, immediate: bool) -> None:
    adapted = tta.adapt(bn_model, "cora", immediate=immediate, source_data=_clean())
    used: list[torch.Tensor] = []
    router = adapted.model.router
    adapted.model.layers()[0].register_forward_hook(lambda m, i, o: used.append(router.weights.argmax(1)))
    dark = torch.zeros(32, 3, 16, 16) + 0.02 * _batch(5, n=32)  # nearly black images: far from the source
    adapted(dark)
    assert bool((used[-1] > 0).all()) == immediate  # the batch's new context routed it
    assert bool((used[-1] == 0).all()) != immediate  # or it waited at the source, its context decided
    adapted(dark)
    assert router.num_contexts > 1 and bool((used[-1] > 0).all())  # the domain's next batch has its context


@pytest.mark.parametrize(("key", "value", "message"), [
    ("stats_memory", -1.0, "stats_memory"), ("source_prior", float("nan"), "source_prior"),
    ("contexts", "oracle", "contexts"), ("max_contexts", 1, "max_contexts"), ("src_momentum", 1.5, "src_momentum"),
])
def test_bad_settings_are_refused(key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CoraConfig(**{key: value})


def test_needs_clean_source_data_and_a_batchnorm_model(bn_model: nn.Module, gn_model: nn.Module) -> None:
    with pytest.raises(tta.ConfigError, match="source data"):
        tta.adapt(bn_model, "cora")
    with pytest.raises(tta.ModelError, match="use a"):
        tta.adapt(gn_model, "cora", source_data=_clean())


def test_imagenet_preset_uses_roids_imagenet_optimiser(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "cora", preset="imagenet", source_data=_clean())
    assert isinstance(adapted.optimizer, torch.optim.SGD) and adapted.config.lr == 2.5e-4
    adapted(_batch(2))
    assert adapted.counters.updates == 1


def test_the_source_context_keeps_the_source_affine_and_target_contexts_share_the_adapted_one() -> None:
    layer = _layer(memory=8.0, source_prior=float("inf"))
    layer.source_affine = True
    with torch.no_grad():
        layer.weight.mul_(3.0).add_(0.5)  # an adapted shared affine, unlike the source's
        layer.bias.add_(1.0)
    x = torch.randn(8, 3, 5, 5)
    _route(layer, 8, 0)
    source = nn.functional.batch_norm(x, layer.source_mean, layer.source_var, layer.source_weight, layer.source_bias,
                                      False, 0.0, layer.eps)
    torch.testing.assert_close(layer(x), source)  # source images: the source BatchNorm exactly
    _route(layer, 8, 1)
    out = layer(x)
    mean, var = layer.ctx_mean[1].float(), layer.ctx_var[1].float()
    target = nn.functional.batch_norm(x, mean, var, layer.weight.detach(), layer.bias.detach(), False, 0.0, layer.eps)
    torch.testing.assert_close(out, target)  # a target context: its statistics and the adapted affine
    layer.source_affine = False
    _route(layer, 8, 0)
    assert (layer(x) - source).abs().max() > 0.1  # without it the source context takes the adapted affine


def test_with_source_affine_source_like_batches_keep_the_source_model(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "cora", lr=1e-2, source_prior=float("inf"), use_prior_correction=False,
                        source_affine=True, source_data=_clean())
    shifted = torch.zeros(32, 3, 16, 16) + 0.02 * _batch(5, n=32)
    adapted(shifted)  # a shifted batch decides its context, which routes the domain's next batch: a step
    adapted(shifted)
    assert adapted.counters.updates == 2 and not torch.equal(adapted.model.layers()[0].weight,
                                                             adapted.model.layers()[0].source_weight)
    x = _clean(16)[0]  # source images: routed to the source context, which keeps the source BatchNorm
    torch.testing.assert_close(adapted(x), bn_model.eval()(x), atol=1e-5, rtol=1e-5)


def test_a_batch_that_is_one_cloud_of_descriptors_is_one_domain_and_two_clouds_are_not() -> None:
    from tta.context.assign import ContextAssigner, calibrate

    g = torch.Generator().manual_seed(0)
    assigner = ContextAssigner(calibrate(torch.randn(400, 8, generator=g)))
    one = torch.randn(64, 8, generator=g) + 3.0  # one shifted domain
    two = torch.cat([torch.randn(32, 8, generator=g) + 3.0, torch.randn(32, 8, generator=g) - 3.0])
    assert assigner.one_domain(one)
    assert not assigner.one_domain(two[torch.randperm(64, generator=g)])
    assert not assigner.one_domain(one[:8])  # too few images to tell


@pytest.mark.parametrize("whole_batch", [True, False])
def test_a_one_cloud_batch_is_routed_whole_to_one_context(bn_model: nn.Module, whole_batch: bool) -> None:
    adapted = tta.adapt(bn_model, "cora", whole_batch=whole_batch, source_data=_clean(256))
    seen: list[torch.Tensor] = []
    router = adapted.model.router
    adapted.model.layers()[0].register_forward_hook(lambda m, i, o: seen.append(router.weights.clone()))
    mild = _clean(64)[0] * 0.9 + 0.05  # one mildly shifted domain: per image, soft responsibilities
    adapted(mild)  # decides the contexts that route the next batch
    adapted(mild)
    one = seen[-1]
    dark = torch.zeros(32, 3, 16, 16) + 0.02 * _batch(5, n=32)
    adapted(torch.cat([dark, _clean(32)[0]]))  # two domains in one batch: routed image by image
    two = seen[-1]
    assert not torch.equal(two, two[:1].expand_as(two))
    whole = torch.equal(one, one[:1].expand_as(one)) and bool(((one == 0) | (one == 1)).all())
    assert whole == whole_batch
