"""UnMix-TNS: K statistics components per BatchNorm, mixed per image, moved only by the images assigned to them."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import tta
from tta.norm.robust_bn import RobustBN
from tta.norm.unmix_tns import UnMixSettings, UnMixTNS, convert_to_unmix_tns


def _bn(c: int = 6, seed: int = 0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn


def _features(n: int, c: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, 5, 5, generator=g) * (torch.rand(n, c, 1, 1, generator=g) + 0.5) \
        + torch.randn(n, c, 1, 1, generator=g) * 2


def _naive(layer: UnMixTNS, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's mixing written out over (B, K, C): the output and the components after the update."""
    s = layer.settings
    m, v = x.mean((2, 3)), x.var((2, 3), unbiased=False)
    mu, var = layer.means.clone(), layer.variances.clone()
    sim = torch.nn.functional.normalize(m, dim=1) @ torch.nn.functional.normalize(mu, dim=1).T
    p = (sim / s.temperature).softmax(1).unsqueeze(-1)  # (B, K, 1)
    mix_mean = (1 - p) * mu + p * m.unsqueeze(1)
    mix_var = (1 - p) * var + p * v.unsqueeze(1)
    mean = mix_mean.mean(1)
    variance = mix_var.mean(1) + mix_mean.square().mean(1) - mean.square()
    out = (x - mean[..., None, None]) / torch.sqrt(variance[..., None, None] + layer.eps)
    out = out * layer.weight[:, None, None] + layer.bias[:, None, None]
    rate = 1 - (1 - s.momentum) ** (x.shape[0] / s.reference_batch)
    new_mu = mu + rate * (p * (m.unsqueeze(1) - mu)).mean(0)
    new_var = var + rate * (p * (v.unsqueeze(1) - var)).mean(0)
    return out, new_mu, new_var


@pytest.mark.parametrize(("k", "n"), [(1, 4), (4, 1), (16, 9)])
def test_the_layer_is_the_papers_mixture_and_update(k: int, n: int) -> None:
    layer = UnMixTNS(_bn(), UnMixSettings(components=k), torch.Generator().manual_seed(0))
    x = _features(n).double()
    layer = layer.double()
    out_expected, mu, var = _naive(layer, x)
    torch.testing.assert_close(layer(x), out_expected)
    torch.testing.assert_close(layer.means, mu)
    torch.testing.assert_close(layer.variances, var)


def test_components_move_only_with_the_images_assigned_to_them() -> None:
    layer = UnMixTNS(_bn(4), UnMixSettings(components=3, temperature=1e-3), torch.Generator().manual_seed(0))
    with torch.no_grad():  # three components pointing in clearly different directions
        layer.means.copy_(torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 0, 5.0]]))
    before = (layer.means.clone(), layer.variances.clone())
    x = torch.randn(8, 4, 5, 5, generator=torch.Generator().manual_seed(2)) * 0.1
    x[:, 0] += 3.0  # every image points along the first component's direction
    layer(x)
    assert not torch.equal(layer.means[0], before[0][0]) and not torch.equal(layer.variances[0], before[1][0])
    for k in (1, 2):  # nobody assigned: bit-identical
        assert torch.equal(layer.means[k], before[0][k]) and torch.equal(layer.variances[k], before[1][k])
    # the assigned component moved towards the images' statistics, by the batch-size dependent rate
    rate = 1 - 0.9 ** (8 / 64)
    torch.testing.assert_close(layer.means[0], before[0][0] + rate * (x.mean((2, 3)).mean(0) - before[0][0]))


def test_an_image_is_normalised_independently_of_its_batch_mates() -> None:
    layer = UnMixTNS(_bn(), UnMixSettings(components=8), torch.Generator().manual_seed(0)).double()
    x = _features(5).double()
    alone = [copy.deepcopy(layer)(x[i:i + 1]) for i in range(5)]
    torch.testing.assert_close(layer(x), torch.cat(alone))


def test_initial_components_keep_the_source_moments() -> None:
    bn = _bn(32)
    layer = UnMixTNS(bn, UnMixSettings(components=4096), torch.Generator().manual_seed(0))
    mixture_mean = layer.means.mean(0)
    mixture_var = layer.variances.mean(0) + layer.means.var(0, unbiased=False)
    std = bn.running_var.sqrt()
    assert float(((mixture_mean - bn.running_mean) / std).abs().max()) < 0.1
    assert float((mixture_var / bn.running_var - 1).abs().max()) < 0.1
    single = UnMixTNS(bn, UnMixSettings(components=1))
    assert torch.equal(single.means[0], bn.running_mean) and torch.equal(single.variances[0], bn.running_var)


def test_conversion_is_seeded_and_in_module_order(bn_model: nn.Module) -> None:
    a, b, c = (copy.deepcopy(bn_model) for _ in range(3))
    assert convert_to_unmix_tns(a) == convert_to_unmix_tns(b) == 3  # two BatchNorm2d and one BatchNorm1d
    convert_to_unmix_tns(c, UnMixSettings(seed=1))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in a.modules())
    assert torch.equal(a.features[1].means, b.features[1].means)
    assert not torch.equal(a.features[1].means, c.features[1].means)
    x = torch.rand(6, 3, 16, 16)  # the BatchNorm1d layer normalises with the source statistics
    feats = bn_model.features[:-1](x)
    torch.testing.assert_close(a.features[-1](feats), bn_model.features[-1](feats))


def test_unmix_tns_alone_adapts_single_images_without_training(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "unmix-tns")
    assert adapted.optimizer is None and not adapted.params()
    layer = adapted.model.features[1]
    before = layer.means.clone()
    out = adapted(torch.rand(1, 3, 16, 16))
    assert out.shape == (1, 10) and not torch.equal(layer.means, before)
    with pytest.raises(tta.ConfigError, match="window"):
        tta.adapt(bn_model, "unmix-tns", window=8)


@pytest.mark.parametrize("method", ["tent", "roid", "rotta"])
def test_norm_unmix_tns_plugs_under_methods_that_train(bn_model: nn.Module, method: str) -> None:
    adapted = tta.adapt(bn_model, method, norm="unmix-tns", norm_components=4)
    layers = [m for m in adapted.model.modules() if isinstance(m, UnMixTNS)]
    assert len(layers) == 3 and layers[0].means.shape == (4, 8)
    assert not any(isinstance(m, (nn.modules.batchnorm._BatchNorm, RobustBN)) for m in adapted.model.modules())
    trained = {id(p) for p in adapted.params()}
    assert trained == {id(p) for m in layers for p in (m.weight, m.bias)}
    before = [p.clone() for p in adapted.params()]
    means = layers[0].means.clone()
    for seed in range(2):
        adapted(torch.rand(64, 3, 16, 16, generator=torch.Generator().manual_seed(seed)))
    assert not torch.equal(layers[0].means, means)
    assert any(not torch.equal(p, q) for p, q in zip(adapted.params(), before, strict=True))


def test_norm_unmix_tns_on_a_model_without_batchnorm_is_refused(gn_model: nn.Module) -> None:
    with pytest.raises(tta.ModelError, match="norm=batch"):
        tta.adapt(gn_model, "tent", norm="unmix-tns")
    with pytest.raises(tta.ModelError, match="no BatchNorm2d"):
        tta.adapt(gn_model, "unmix-tns")
    with pytest.raises(tta.ConfigError, match="norm_components"):
        tta.adapt(gn_model, "tent", norm_components=0)


def test_the_update_rate_follows_the_batch_size(bn_model: nn.Module) -> None:
    layer = UnMixTNS(_bn(), UnMixSettings(momentum=0.1, reference_batch=64))
    assert math.isclose(layer.update_rate(64), 0.1)
    assert math.isclose(1 - layer.update_rate(32), math.sqrt(0.9))
    assert math.isclose(1 - layer.update_rate(200), 0.9 ** (200 / 64))
    fixed = UnMixTNS(_bn(), UnMixSettings(batch_size=200))  # the official rule: one rate for every forward pass
    assert math.isclose(fixed.update_rate(37), layer.update_rate(200))
    with pytest.raises(tta.ConfigError, match="norm_batch_size"):
        tta.adapt(bn_model, "tent", norm="unmix-tns", norm_batch_size=-1)


@pytest.mark.parametrize("method", ["tent", "roid", "rotta"])
def test_methods_with_unmix_tns_reset_save_and_reject_as_any_method(bn_model: nn.Module, method: str) -> None:
    adapted = tta.adapt(bn_model, method, norm="unmix-tns", update_every=8, memory_size=8) if method == "rotta" \
        else tta.adapt(bn_model, method, norm="unmix-tns")
    x = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    first = adapted(x)
    for seed in range(1, 3):
        adapted(torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(seed)))
    state = copy.deepcopy(adapted.state_dict())
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(tta.InputError):
        adapted(bad)
    assert all(torch.equal(v, state[k]) for k, v in adapted.state_dict().items() if isinstance(v, torch.Tensor))
    fresh = tta.adapt(bn_model, method, **adapted.config.__dict__)
    fresh.load_state_dict(state)
    torch.manual_seed(1)
    resumed = fresh(x)
    torch.manual_seed(1)
    torch.testing.assert_close(resumed, adapted(x), atol=0, rtol=0)
    adapted.reset()
    torch.manual_seed(0)
    torch.testing.assert_close(adapted(x), first, atol=0, rtol=0)
