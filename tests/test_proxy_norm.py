"""Proxy Normalization: PN-Act's moments, the BN -> norm -> PN-Act converter, batch independence, the warm-up."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from click.testing import CliRunner
from torch import nn

import tta
import tta.warmup.train as warmup_module
from tta.cli import cli
from tta.errors import ConfigError, ModelError
from tta.methods.tent import norm_affine_params
from tta.models import cifar_resnet, load_model
from tta.norm.proxy_norm import (
    ACTIVATIONS,
    PNAct,
    calibrate_proxy_norm,
    convert_to_proxy_norm,
    normal_quantiles,
    pn_layers,
    quadrature_moments,
    relu_moments,
)
from tta.warmup import Warmup, warmup


# ------------------------------------------------------------------------------------------------- PN-Act
def test_relu_closed_form_matches_quadrature() -> None:
    g = torch.Generator().manual_seed(0)
    m = torch.randn(200, generator=g, dtype=torch.float64) * 2
    s = torch.rand(200, generator=g, dtype=torch.float64) * 3 + 0.05
    mean, var = relu_moments(m, s)
    q_mean, q_var = quadrature_moments(F.relu, m, s, normal_quantiles())
    # In units of the spread: 256 quantiles truncate the tails at |u| < 2.9, worth a few thousandths.
    assert ((mean - q_mean).abs() / s).max() < 2e-3
    assert ((var - q_var).abs() / s**2).max() < 1e-2


def test_relu_moments_at_zero_spread_are_the_deterministic_limit() -> None:
    m = torch.tensor([-1.0, 0.0, 2.0])
    mean, var = relu_moments(m, torch.zeros(3))
    assert torch.equal(mean, torch.tensor([0.0, 0.0, 2.0])) and torch.equal(var, torch.zeros(3))


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu", "tanh"])
def test_output_is_standardised_for_standard_normal_input(activation: str) -> None:
    g = torch.Generator().manual_seed(1)
    layer = PNAct(6, activation)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0, generator=g)
        layer.bias.uniform_(-1.0, 1.0, generator=g)
    y = torch.randn(100_000, 6, generator=g)
    with torch.no_grad():
        out = layer(y)
    assert out.mean(0).abs().max() < 0.02
    assert (out.var(0) - 1).abs().max() < 0.03
    # With no normalisation it would be neither: the proxy does the work.
    raw = ACTIVATIONS[activation](layer.weight * y + layer.bias)
    assert raw.mean(0).abs().max() > 0.1 or (raw.var(0) - 1).abs().max() > 0.1


def test_pnact_rejects_bad_input_and_settings() -> None:
    with pytest.raises(ValueError, match="expects"):
        PNAct(4)(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="unknown activation"):
        PNAct(4, "swishy")


# --------------------------------------------------------------------------------------------- conversion
class Residual(nn.Module):
    """BN -> nn.ReLU, BN -> F.relu, and two BNs feeding one addition then a tensor-method relu."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv3, self.bn3 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.short, self.bn_short = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(h)))
        out = (self.bn3(self.conv3(out)) + self.bn_short(self.short(h))).relu()
        return self.head(out.mean((2, 3)))


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
    return model.eval()


@pytest.mark.parametrize("build", [lambda: cifar_resnet("resnet20"), Residual, torchvision.models.resnet18],
                         ids=["cifar-resnet20", "residual", "torchvision-resnet18"])
def test_conversion_keeps_structure_and_copies_affine(build: Callable[[], nn.Module]) -> None:
    model = _randomise_bn(build())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_to_proxy_norm(model, norm="group", groups=4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the original is untouched
    bns = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    modules = dict(converted.named_modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    for name, bn in bns.items():
        norm = modules[name]  # every BN's slot now holds a per-image norm of the same width
        assert isinstance(norm, nn.GroupNorm) and norm.num_channels == bn.num_features and norm.num_groups == 4
        pn = modules.get(f"{name}_act")
        if pn is not None and torch.equal(pn.weight, bn.weight):  # BN -> act: BN's affine moved into the PNAct
            assert torch.equal(pn.bias, bn.bias) and torch.equal(norm.weight, torch.ones_like(norm.weight))
        else:  # BN -> addition -> act: the norm kept BN's affine
            assert torch.equal(norm.weight, bn.weight) and torch.equal(norm.bias, bn.bias)
    for layer in pn_layers(converted):
        assert not layer.proxy_beta.any() and not layer.proxy_gamma.any()
    # Every other weight is the same, under the same name.
    state = converted.state_dict()
    for k, v in before.items():
        if k.rsplit(".", 1)[0] not in bns:
            assert torch.equal(state[k], v), k
    x = torch.rand(2, 3, 32, 32)
    assert converted(x).shape == model(x).shape


def test_conversion_counts_on_known_architectures() -> None:
    r20 = convert_to_proxy_norm(cifar_resnet("resnet20"))
    assert len(pn_layers(r20)) == 19  # stem + 9 blocks x (inner pair + after the addition)
    r18 = convert_to_proxy_norm(torchvision.models.resnet18())
    assert len(pn_layers(r18)) == 17  # stem + 8 blocks x 2; the 3 downsample BNs share their block's PNAct
    assert sum(isinstance(m, nn.GroupNorm) for m in r18.modules()) == 20


def test_unsupported_models_are_a_model_error(no_norm_model: nn.Module, bn_model: nn.Module) -> None:
    with pytest.raises(ModelError, match="has none"):
        convert_to_proxy_norm(no_norm_model)
    with pytest.raises(ModelError, match="BatchNorm1d"):
        convert_to_proxy_norm(bn_model)  # TinyBNNet ends with a BatchNorm1d
    with pytest.raises(ModelError, match="followed by call_module"):
        convert_to_proxy_norm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3)))

    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.bn(x)) if x.sum() > 0 else x

    with pytest.raises(ModelError, match=r"torch\.fx"):
        convert_to_proxy_norm(DataDependent())


# ---------------------------------------------------------------------------------------- batch independence
@pytest.fixture
def converted() -> nn.Module:
    torch.manual_seed(0)
    base = load_model_from(cifar_resnet("resnet20"))
    net = convert_to_proxy_norm(base)
    return calibrate_proxy_norm(net, base, torch.rand(16, 3, 8, 8))


def load_model_from(net: nn.Module) -> nn.Module:
    from tta.models.zoo import CIFAR_RESNET_NORM, normalized

    return _randomise_bn(normalized(net, *CIFAR_RESNET_NORM))


def test_eval_logits_do_not_depend_on_the_rest_of_the_batch(converted: nn.Module) -> None:
    x = torch.rand(6, 3, 8, 8)
    with torch.no_grad():
        together = converted(x)
        alone = torch.cat([converted(x[i:i + 1]) for i in range(6)])
        permuted = converted(x.flip(0)).flip(0)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(together, permuted, rtol=1e-4, atol=1e-4)


def test_tent_adapts_norm_and_proxy_parameters_and_stays_batch_independent(converted: nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.rand(1, 3, 8, 8, generator=g) for _ in range(3))
    trained = {id(p) for p in norm_affine_params(converted)}
    for layer in pn_layers(converted):
        assert {id(p) for p in (layer.weight, layer.bias, layer.proxy_beta, layer.proxy_gamma)} <= trained
    first, second = tta.adapt(converted, "tent"), tta.adapt(converted, "tent")
    with_b, with_c = first(torch.cat([a, b])), second(torch.cat([a, c]))
    torch.testing.assert_close(with_b[:1], with_c[:1], rtol=1e-4, atol=1e-4)
    # One image at a time: each prediction is that image's alone, given the state the stream left.
    single = tta.adapt(converted, "tent")
    for x in (a, b, c):
        with torch.no_grad():
            expected = single.model(x)
        torch.testing.assert_close(single(x), expected, rtol=1e-4, atol=1e-4)
    assert not torch.equal(single.model.state_dict()["1.bn1_act.proxy_beta"],
                           converted.state_dict()["1.bn1_act.proxy_beta"])  # tent moved the proxy


def test_sliding_window_updates_on_the_window_and_predicts_each_image_alone(converted: nn.Module) -> None:
    """At batch size 1 with a window, the update averages over the last images while every prediction stays the
    image's own: equal to the adapted network applied to that image alone, never to the window."""
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(1, 3, 8, 8, generator=g) for _ in range(7)]
    windowed = tta.adapt(converted, "tent", window=3)
    start = copy.deepcopy(windowed.model.state_dict())
    for i, x in enumerate(images):
        with torch.no_grad():
            expected = windowed.model(x)
        torch.testing.assert_close(windowed(x), expected, rtol=1e-4, atol=1e-4)
        moved = not torch.equal(windowed.model.state_dict()["1.bn1_act.proxy_beta"], start["1.bn1_act.proxy_beta"])
        assert moved == (i >= 2)  # the first update comes with the window's third image
    assert windowed.counters.batches == 2  # one step per 3 images


def test_a_bn_model_under_tent_is_batch_dependent() -> None:
    """The property above can fail: with BatchNorm, image a's logits change with its batch-mate."""
    base = load_model_from(cifar_resnet("resnet20"))
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.rand(1, 3, 8, 8, generator=g) for _ in range(3))
    out_b, out_c = tta.adapt(base, "tent")(torch.cat([a, b])), tta.adapt(base, "tent")(torch.cat([a, c]))
    assert not torch.allclose(out_b[:1], out_c[:1], rtol=1e-3, atol=1e-3)


def test_calibration_brings_the_converted_model_close_to_its_bn_original() -> None:
    torch.manual_seed(0)
    base = load_model_from(cifar_resnet("resnet20"))
    x = torch.rand(32, 3, 8, 8)
    with torch.no_grad():
        target = base(x)
        raw = convert_to_proxy_norm(base)(x)
        calibrated = calibrate_proxy_norm(convert_to_proxy_norm(base), base, x)(x)
    err_raw, err_cal = (float((out - target).pow(2).mean() / target.var()) for out in (raw, calibrated))
    assert err_cal < 0.5 * err_raw


# ----------------------------------------------------------------------------------------------- warm-up
def _source(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiny images: a CIFAR ResNet takes any size, and 8 x 8 keeps the warm-up tests fast."""
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g), torch.randint(0, 10, (n,), generator=g)


def _resnet_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "r20.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in cifar_resnet("resnet20").state_dict().items()}}, path)
    return path


def test_resume_after_an_interruption_gives_the_uninterrupted_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_model(checkpoint=_resnet_file(tmp_path), arch="resnet20")
    x, y = _source()
    kwargs = {"epochs": 2, "batch_size": 4, "progress": False, "device": "cpu", "calibrate": 4}
    full = warmup(model, x, y, "proxy-norm", **kwargs)
    resume = tmp_path / "warm.pt.resume"
    real = warmup_module._write_resume

    def interrupt(path: Path, state: dict[str, object]) -> None:
        real(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(warmup_module, "_write_resume", interrupt)
    with pytest.raises(KeyboardInterrupt):
        warmup(model, x, y, "proxy-norm", resume=resume, **kwargs)
    assert torch.load(resume, weights_only=True)["epoch"] == 1
    monkeypatch.setattr(warmup_module, "_write_resume", real)
    resumed = warmup(model, x, y, "proxy-norm", resume=resume, **kwargs)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    state = resumed.model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in full.model.state_dict().items())
    with pytest.warns(UserWarning, match="other data or settings"):  # a stale file is not silently reused
        warmup(model, x, y, "proxy-norm", resume=resume, **{**kwargs, "epochs": 1})


def test_saved_model_loads_without_arch_and_reproduces_logits_exactly(tmp_path: Path) -> None:
    model = load_model(checkpoint=_resnet_file(tmp_path), arch="resnet20")
    x, y = _source()
    warm = warmup(model, x, y, "proxy-norm", epochs=1, batch_size=4, progress=False, device="cpu", calibrate=4,
                  build={"arch": "resnet20", "num_classes": 10})
    path = warm.save(tmp_path / "warm.pt")
    loaded = tta.load_model(checkpoint=path)
    batch = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(batch), warm.model(batch))
    with pytest.raises(ConfigError, match="drop --arch"):
        load_model(checkpoint=path, arch="resnet32")


def test_warmup_settings_are_checked(bn_model: nn.Module) -> None:
    x, y = _source(4)
    with pytest.raises(ConfigError, match="unknown proxy-norm warm-up setting"):
        warmup(bn_model, x, y, "proxy-norm", settings={"lambda_init": "paper"})
    with pytest.raises(ConfigError, match="no source warm-up"):
        warmup(bn_model, x, y, "tent")
    with pytest.raises(ConfigError, match="loss"):
        warmup(bn_model, x, y, "proxy-norm", loss="mse")


# ------------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def source_npz(tmp_path: Path) -> Path:
    g = np.random.default_rng(0)
    path = tmp_path / "src.npz"
    np.savez(path, x=g.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8), y=g.integers(0, 10, 8, dtype=np.int64))
    return path


@pytest.mark.parametrize("method", ["afn", "proxy-norm"])
def test_cli_checks_out_before_reading_anything(method: str, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    args = ["warmup", "--method", method, "--source", f"npz:{tmp_path / 'missing.npz'}", "--checkpoint",
            str(tmp_path / "missing.th"), "--arch", "resnet20", "--no-progress"]
    for out, why in ((tmp_path / "file" / "warm.pt", "cannot write --out"), (tmp_path, "is a directory")):
        result = CliRunner().invoke(cli, [*args, "--out", str(out)])
        assert result.exit_code != 0 and why in result.output, result.output


@pytest.mark.parametrize("method", ["afn", "proxy-norm"])
def test_cli_warmup_then_adapt_from_the_checkpoint_alone(
    method: str, source_npz: Path, tmp_path: Path, fake_cifar_c: Callable[..., Path]
) -> None:
    out = tmp_path / "warm.pt"
    result = CliRunner().invoke(cli, ["warmup", "--method", method, "--source", f"npz:{source_npz}", "--checkpoint",
                                      str(_resnet_file(tmp_path)), "--arch", "resnet20", "--epochs", "1",
                                      "--batch-size", "4", "--calibrate", "4", "--device", "cpu", "--no-progress",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and not (tmp_path / "warm.pt.resume").exists()
    hint = "--method afn" if method == "afn" else f"--method stream-stats --batch-size 1 --source-data npz:{source_npz}"
    assert f"use it with: tta adapt --checkpoint {out} {hint}" in result.output
    saved = torch.load(out, weights_only=True)
    assert saved["method"] == method and saved["build"] == {"arch": "resnet20", "num_classes": 10}
    data_dir = fake_cifar_c(("fog",), per_severity=4)
    adapt = "afn" if method == "afn" else "tent"
    result = CliRunner().invoke(cli, ["adapt", "--method", adapt, "--checkpoint", str(out), "--data-dir",
                                      str(data_dir), "--corruptions", "fog", "--severities", "5", "--batch-size", "1",
                                      "--n-examples", "3", "--no-progress", "--device", "cpu", "--no-download",
                                      "--out", str(tmp_path / "r.csv")])
    assert result.exit_code == 0, result.output


def test_warmup_object_round_trips_its_provenance(tmp_path: Path) -> None:
    model = load_model(checkpoint=_resnet_file(tmp_path), arch="resnet20")
    x, y = _source(8)
    warm = warmup(copy.deepcopy(model), x, y, "proxy-norm", epochs=0, progress=False, device="cpu", calibrate=0,
                  base="resnet20:r20.th", build={"arch": "resnet20", "num_classes": 10})
    assert isinstance(warm, Warmup)
    ckpt = torch.load(warm.save(tmp_path / "w.pt"), weights_only=True)
    assert ckpt["base"] == "resnet20:r20.th" and ckpt["settings"]["norm"] == "layer"
