"""stream-stats: per-channel statistics accumulated one image at a time, for BN and per-image-norm models."""

from __future__ import annotations

import pytest
import torch
from conftest import TinyBNNet, TinyGNNet, _with_source_stats
from torch import nn

import tta
from tta.errors import ConfigError, ModelError
from tta.models import cifar_resnet
from tta.norm.proxy_norm import calibrate_proxy_norm, convert_to_proxy_norm
from tta.norm.stream_stats import StreamStats, sequential_moments, source_moments


def _source(n: int = 48, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g) * 0.8 + 0.1, torch.randint(0, 10, (n,), generator=g)


def test_closed_form_update_equals_the_image_by_image_loop() -> None:
    g = torch.Generator().manual_seed(0)
    m, q = torch.randn(150, 5, generator=g, dtype=torch.float64), torch.rand(150, 5, generator=g, dtype=torch.float64)
    mean, sq = torch.randn(5, generator=g, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64) + 1
    for prior, memory in ((16.0, 40.0), (3.0, 1e6), (0.5, 2.0)):
        got_m, got_q, got_n = sequential_moments(m, q, mean, sq, torch.tensor(prior, dtype=torch.float64), memory)
        r_m, r_q, n = mean.clone(), sq.clone(), prior
        for t in range(len(m)):
            n = min(n + 1, memory)
            r_m, r_q = r_m + (m[t] - r_m) / n, r_q + (q[t] - r_q) / n
            torch.testing.assert_close(got_m[t], r_m)
            torch.testing.assert_close(got_q[t], r_q)
        assert float(got_n) == n


def _pn_model() -> nn.Module:
    torch.manual_seed(0)
    base = cifar_resnet("resnet20").eval()
    return calibrate_proxy_norm(convert_to_proxy_norm(base), base, torch.rand(16, 3, 16, 16))


@pytest.mark.parametrize("kind", ["bn", "pn"])
def test_a_batch_equals_its_images_one_at_a_time(kind: str) -> None:
    model = _with_source_stats(TinyBNNet()) if kind == "bn" else _pn_model()
    x = torch.rand(7, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    together, alone = (tta.adapt(model, "stream-stats", source_data=_source()) for _ in range(2))
    out = together(x)
    one_by_one = torch.cat([alone(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(out, one_by_one, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(together.model.state_dict(), alone.model.state_dict(), rtol=1e-5, atol=1e-5)


def test_an_image_depends_on_the_images_before_it_only() -> None:
    model = _pn_model()
    g = torch.Generator().manual_seed(3)
    head, tail_a, tail_b = torch.rand(3, 3, 16, 16, generator=g), *torch.rand(2, 2, 3, 16, 16, generator=g)
    first, second = (tta.adapt(model, "stream-stats", source_data=_source()) for _ in range(2))
    a, b = first(torch.cat([head, tail_a])), second(torch.cat([head, tail_b]))
    torch.testing.assert_close(a[:3], b[:3])
    earlier = tta.adapt(model, "stream-stats", source_data=_source())
    earlier(tail_a)
    assert not torch.allclose(earlier(head), a[:3], atol=1e-4)  # the stream before an image does matter


def test_bn_first_image_is_adabn_prior_and_the_statistics_follow_the_stream() -> None:
    """BatchNorm: the first image is normalised with the source prior blended with its own statistics; after many
    images of a shifted stream the running statistics are that stream's (the source prior forgotten)."""
    model = _with_source_stats(TinyBNNet())
    adapted = tta.adapt(model, "stream-stats", prior_n=4.0, memory=64.0)
    layer = next(m for m in adapted.model.modules() if isinstance(m, StreamStats))
    bn = layer.layer
    x = torch.rand(1, 3, 16, 16) * 0.2 + 0.8
    feats: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, inp, _o: feats.append(inp[0].detach()))
    adapted(x)
    z = feats[0].double()
    m, q = z.mean((0, 2, 3)), z.square().mean((0, 2, 3))
    src_sq = bn.running_var.double() + bn.running_mean.double().square()
    torch.testing.assert_close(layer.mean, (4 * bn.running_mean.double() + m) / 5)
    torch.testing.assert_close(layer.sq, (4 * src_sq + q) / 5)
    for _ in range(40):
        adapted(torch.rand(16, 3, 16, 16) * 0.2 + 0.8)
    handle.remove()
    pooled = torch.cat(feats[-8:]).double()
    assert float(layer.count) == 64.0
    torch.testing.assert_close(layer.mean, pooled.mean((0, 2, 3)), rtol=0.05, atol=0.05)


def test_per_image_norm_statistics_are_the_identity_on_clean_data() -> None:
    """A GroupNorm model on more of the same clean distribution it was calibrated on keeps its predictions."""
    torch.manual_seed(0)
    model = TinyGNNet().eval()
    x, y = _source(400)
    adapted = tta.adapt(model, "stream-stats", source_data=(x[:200], y[:200]), source_images=200)
    with torch.no_grad():
        plain = model(x[200:])
    out = adapted(x[200:])
    assert float((out.argmax(1) == plain.argmax(1)).float().mean()) > 0.9
    moments = source_moments(model, x[:200])
    assert set(moments) == {"net.1", "net.4"}
    mean, var = moments["net.1"]
    assert mean.shape == var.shape == (8,) and bool((var > 0).all())


def test_reset_returns_to_the_source_statistics() -> None:
    adapted = tta.adapt(_pn_model(), "stream-stats", source_data=_source())
    x = torch.rand(2, 3, 16, 16)
    first = adapted(x)
    adapted(torch.rand(5, 3, 16, 16))
    adapted.reset()
    torch.testing.assert_close(adapted(x), first)


def test_settings_and_models_are_checked() -> None:
    gn = TinyGNNet().eval()
    with pytest.raises(ConfigError, match="source_data"):
        tta.adapt(gn, "stream-stats")
    with pytest.raises(ConfigError, match="window=0"):
        tta.adapt(_with_source_stats(TinyBNNet()), "stream-stats", window=16)
    for bad in ({"prior_n": 0.0}, {"memory": 1.0}, {"prior_n": float("nan")}, {"source_images": 0}):
        with pytest.raises(ConfigError):
            tta.adapt(_with_source_stats(TinyBNNet()), "stream-stats", **bad)
    untracked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(),
                              nn.LazyLinear(10))
    with pytest.raises(ModelError, match="running statistics"):
        tta.adapt(untracked, "stream-stats")
