"""AFN: the layer (docs/methods/afn.md), the BN-to-AFN converter, the ``afn`` method and the source warm-up."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner
from torch import nn

import tta
from tta.cli import cli
from tta.config import resolve_config
from tta.errors import ConfigError, DownloadError, ModelError
from tta.methods import get_method
from tta.methods.afn import AFNConfig, AFNMethod
from tta.models import cifar_resnet
from tta.models.fingerprint import model_fingerprint
from tta.norm.afn import AFN, afn_layers, afn_parameters, convert_to_afn
from tta.warmup import load_afn_checkpoint, load_source, warmup_afn
from tta.warmup.train import _random_crop_flip

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _bn(c: int = 8) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1.0, 1.0)
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def _zero_lambdas(layer: AFN) -> None:
    with torch.no_grad():
        layer.w_mu.fill_(-math.inf)  # sigmoid(-inf) = 0 exactly
        layer.w_sigma.fill_(-math.inf)
        layer.l_beta.zero_()
        layer.l_gamma.zero_()


def _features(n: int = 8, c: int = 8, hw: int = 16) -> torch.Tensor:
    return torch.randn(n, c, hw, hw) * 2.0 + torch.linspace(-1, 3, c)[None, :, None, None]


def _train_bn2d(model: nn.Module) -> nn.Module:
    """``model`` in eval mode except its BatchNorm2d layers, which use batch statistics (what AFN replaces)."""
    model = copy.deepcopy(model).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
    return model


# ------------------------------------------------------------------------------------------------ the layer
def test_lambdas_zero_equal_train_mode_bn_up_to_eps_placement() -> None:
    bn = _bn()
    layer = AFN.from_bn(bn, identity_init=False)  # random decoders: with lambdas 0 they must have no effect
    _zero_lambdas(layer)
    x = _features().requires_grad_(True)
    y = layer.train()(x)
    # Exactly the AFN layer's definition with l = 0: unbiased variance, eps 1e-6 added to the standard deviation.
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=1)
    ref = (x - mean[None, :, None, None]) / (var.sqrt() + 1e-6)[None, :, None, None]
    ref = ref * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    # Gradients flow through the batch statistics exactly as in the reference.
    (gx,) = torch.autograd.grad((y * torch.arange(y.numel()).view_as(y).sin()).sum(), x)
    (gr,) = torch.autograd.grad((ref * torch.arange(y.numel()).view_as(y).sin()).sum(), x)
    torch.testing.assert_close(gx, gr, atol=1e-4, rtol=1e-4)
    # And train-mode BN differs only by biased-vs-unbiased variance and where eps goes (n = 2048 per channel).
    torch.testing.assert_close(y, bn.train()(x), atol=3e-3, rtol=0)


def test_lambda_init_paper_and_official() -> None:
    paper, official = AFN(4, lambda_init="paper"), AFN(4, lambda_init="official")
    assert float(paper.lambdas()["mu"].detach()) == pytest.approx(1 / (1 + math.exp(3)), abs=1e-6)  # ~0.047
    # official: sigmoid(sigmoid(-3)) ~ 0.512
    assert float(official.lambdas()["sigma"].detach()) == pytest.approx(1 / (1 + math.exp(-1 / (1 + math.exp(3)))))
    assert float(official.lambdas()["mu"].detach()) == pytest.approx(0.5119, abs=1e-4)
    for layer in (paper, official):
        assert float(layer.l_beta.detach()) == pytest.approx(1 / (1 + math.exp(5)), abs=1e-7)
        assert float(layer.l_gamma.detach()) == pytest.approx(1 / (1 + math.exp(5)), abs=1e-7)
    with pytest.raises(ValueError, match="lambda_init"):
        AFN(4, lambda_init="both")  # type: ignore[arg-type]


def test_identity_init_formula() -> None:
    bn = _bn()
    layer = AFN.from_bn(bn, identity_init=True).eval()
    x = _features()
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=1)
    lam = 1 / (1 + math.exp(3))
    # Zero decoders: mu_hat = beta_hat = 0, gamma_hat = sigmoid(0) = 0.5, sigma_hat = 1e-3 (kept trainable).
    gamma = bn.weight + 0.5 / (1 + math.exp(5))
    sigma = lam * 1e-3 + (1 - lam) * (var.sqrt() + 1e-6)
    ref = (x - (1 - lam) * mean[None, :, None, None]) / sigma[None, :, None, None]
    ref = ref * gamma[None, :, None, None] + bn.bias[None, :, None, None]
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


def test_dropout_on_statistics_in_training_only() -> None:
    layer = AFN(8, identity_init=False, lambda_init="official")  # lambdas ~0.5: the estimates matter
    no_drop = copy.deepcopy(layer)
    no_drop.drop.p = 0.0
    x = _features()
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), no_drop.train()(x), atol=0, rtol=0)
        assert torch.equal(layer(x), layer(x))
        layer.train()
        assert not torch.equal(layer(x), layer(x))


def test_source_prior_limits() -> None:
    bn = _bn()
    x = _features()
    layers = {n: AFN.from_bn(bn, source_prior_n=n).eval() for n in (0.0, 16.0, math.inf)}
    plain = AFN.from_bn(bn).eval()
    for layer in (*layers.values(), plain):
        _zero_lambdas(layer)
    with torch.no_grad():
        torch.testing.assert_close(layers[0.0](x), plain(x), atol=1e-6, rtol=0)
        # N = inf: the source statistics, i.e. eval-mode BN up to where eps goes.
        torch.testing.assert_close(layers[math.inf](x), bn.eval()(x), atol=1e-4, rtol=0)
        var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=1)
        w = 16.0 / (16.0 + x.shape[0])
        m = w * bn.running_mean + (1 - w) * mean
        s = (w * bn.running_var + (1 - w) * var).sqrt() + 1e-6
        ref = (x - m[None, :, None, None]) / s[None, :, None, None] * bn.weight[None, :, None, None]
        torch.testing.assert_close(layers[16.0](x), ref + bn.bias[None, :, None, None], atol=1e-5, rtol=1e-5)


def test_rejects_non_2d_input() -> None:
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        AFN(4)(torch.randn(3, 4))


# -------------------------------------------------------------------------------------------- the converter
def test_convert_replaces_batchnorm2d_only_and_copies_affine(bn_model: nn.Module) -> None:
    model = copy.deepcopy(bn_model)
    bn2d = [m for m in bn_model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert convert_to_afn(model) == len(bn2d) == 2
    layers = afn_layers(model)
    assert [layer.num_features for layer in layers] == [8, 16]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 1  # BN1d is left alone
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for layer, bn in zip(layers, bn2d, strict=True):
        assert torch.equal(layer.gamma_bias, bn.weight) and torch.equal(layer.beta_bias, bn.bias)
        assert torch.equal(layer.source_mean, bn.running_mean) and torch.equal(layer.source_var, bn.running_var)


def test_conversion_stays_close_to_train_mode_bn_with_identity_init(bn_model: nn.Module) -> None:
    x = torch.rand(64, 3, 16, 16) * 0.8 + 0.1
    with torch.no_grad():
        ref = _train_bn2d(bn_model)(x)
        outputs = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = copy.deepcopy(bn_model)
            convert_to_afn(model, identity_init=True)
            outputs.append(model.eval()(x))
        # The output does not depend on the random encoders, and the default lambdas (sigmoid(-3) ~ 0.047) only
        # shift it a little from train-mode BN (the tiny model's BatchNorm1d then amplifies it).
        assert torch.equal(outputs[0], outputs[1])
        assert float((outputs[0] - ref).norm() / ref.norm()) < 0.2
        # With the lambdas at 0 as well, the converted model is train-mode BN up to the eps placement.
        for layer in afn_layers(model):
            _zero_lambdas(layer)
        torch.testing.assert_close(model(x), ref, atol=2e-3, rtol=0)


# ----------------------------------------------------------------------------------------------- the method
def test_config_file_matches_dataclass() -> None:
    assert resolve_config(AFNConfig, CONFIGS / "afn.yaml") == AFNConfig()


def test_rejects_models_without_batchnorm2d(ln_model: nn.Module, no_norm_model: nn.Module) -> None:
    for model in (ln_model, no_norm_model):
        with pytest.raises(ModelError, match="BatchNorm2d"):
            get_method("afn")(model)


def test_prior_needs_running_statistics() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten(),
                          nn.LazyLinear(10))
    with pytest.raises(ModelError, match="running statistics"):
        AFNMethod(model, AFNConfig(source_prior_n=16.0))


@pytest.mark.parametrize("trainable", ["affine", "all"])
def test_only_the_trainable_set_changes(bn_model: nn.Module, trainable: str) -> None:
    adapted = AFNMethod(bn_model, AFNConfig(trainable=trainable))  # type: ignore[arg-type]
    names = {n for n, p in adapted.model.named_parameters() if p.requires_grad}
    affine = {"gamma_bias", "beta_bias", "w_mu", "w_sigma", "l_beta", "l_gamma"}
    assert {n.rsplit(".", 1)[-1] for n in names} == (affine if trainable == "affine" else affine | {"weight", "bias"})
    assert all(".features.1." in f".{n}" or ".features.4." in f".{n}" for n in names)  # AFN layers only
    assert len(adapted.params()) == len(names)
    before = copy.deepcopy(adapted.model.state_dict())
    x = torch.rand(32, 3, 16, 16)
    for _ in range(2):  # the encoders get gradients from the second step on (the decoders start at zero)
        adapted(x)
    after = adapted.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # l_beta multiplies beta_hat, which is 0 under identity_init until dec_beta trains: only `all` can move it.
    assert changed == (names if trainable == "all" else names - {"features.1.l_beta", "features.4.l_beta"})
    assert not adapted.model.training and all(not m.training for m in adapted.model.modules())


def test_returns_logits_before_the_update_and_reset_restores_everything(bn_model: nn.Module) -> None:
    adapted = get_method("afn")(bn_model, AFNConfig(trainable="all"))
    snapshot = copy.deepcopy(adapted.model.state_dict())
    x = torch.rand(16, 3, 16, 16)
    with torch.no_grad():
        expected = adapted.model(x)
    first = adapted(x)
    assert torch.equal(first, expected)
    second = adapted(x)
    assert not torch.equal(first, second)
    assert adapted.optimizer is not None and adapted.optimizer.state
    adapted.reset()
    assert all(torch.equal(v, snapshot[k]) for k, v in adapted.model.state_dict().items())
    assert not adapted.optimizer.state
    assert torch.equal(adapted(x), first)


def test_reset_every_update_is_episodic(bn_model: nn.Module) -> None:
    adapted = AFNMethod(bn_model, AFNConfig(reset_every=1))
    x = torch.rand(16, 3, 16, 16)
    assert torch.equal(adapted(x), adapted(x))


def test_leaves_the_callers_model_alone(bn_model: nn.Module) -> None:
    before = copy.deepcopy(bn_model.state_dict())
    AFNMethod(bn_model)(torch.rand(8, 3, 16, 16))
    assert all(torch.equal(v, before[k]) for k, v in bn_model.state_dict().items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn_model.modules()) == 2


# ----------------------------------------------------------------------------------------------- the warm-up
def _source(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8), torch.randint(0, 10, (n,),
                                                                                                generator=g)


def test_warmup_trains_only_afn_parameters_and_is_seeded(bn_model: nn.Module) -> None:
    x, y = _source()
    warm = warmup_afn(bn_model, x, y, epochs=2, batch_size=32, lr=1e-2, progress=False)
    again = warmup_afn(bn_model, x, y, epochs=2, batch_size=32, lr=1e-2, progress=False)
    start = bn_model.state_dict()
    end = warm.model.state_dict()
    prefixes = tuple(f"{name}." for name, m in warm.model.named_modules() if isinstance(m, AFN))
    afn_params = {k for k, _ in warm.model.named_parameters() if k.startswith(prefixes)}
    assert len(afn_params) == 2 * 18  # per layer: 6 linear layers (weight, bias) and 6 affine scalars or vectors
    for k, v in end.items():
        if k in afn_params:
            assert k not in start, k  # every AFN parameter is new ...
        elif not k.startswith(prefixes):
            assert torch.equal(v, start[k]), k  # ... and every pretrained weight and statistic is untouched
    torch.manual_seed(0)
    fresh = copy.deepcopy(bn_model)
    convert_to_afn(fresh)
    init = fresh.state_dict()
    # ... and the AFN parameters train (weights behind a ReLU that is dead for these statistics may not).
    always = ("gamma_bias", "beta_bias", "w_mu", "w_sigma", "l_gamma", "dec_mu.bias", "dec_sigma.bias",
              "dec_beta.bias", "dec_gamma.bias")
    assert all(not torch.equal(init[k], end[k]) for k in afn_params if k.endswith(always))
    assert sum(not torch.equal(init[k], end[k]) for k in afn_params) > len(afn_params) * 2 // 3
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in end.items())
    assert [h["epoch"] for h in warm.history] == [1, 2]
    assert warm.base_fingerprint == model_fingerprint(bn_model)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn_model.modules()) == 2  # the caller's model is untouched


def test_warmup_lowers_the_source_loss(bn_model: nn.Module) -> None:
    x, y = _source(128)
    warm = warmup_afn(bn_model, x, y, epochs=6, batch_size=64, lr=1e-2, augment=False, progress=False)
    assert warm.history[-1]["loss"] < warm.history[0]["loss"]


def test_saved_warmup_reproduces_logits_exactly(bn_model: nn.Module, tmp_path: Path) -> None:
    x, y = _source()
    warm = warmup_afn(bn_model, x.permute(0, 2, 3, 1).numpy(), y.numpy(), epochs=1, batch_size=32, progress=False,
                      base="tiny")  # numpy NHWC, as tta.data.clean.load_clean returns
    path = warm.save(tmp_path / "sub" / "afn.pt")
    assert load_afn_checkpoint(path)["warmup"]["epochs"] == 1
    batch = torch.rand(16, 3, 16, 16)
    with torch.no_grad():
        expected = warm.model(batch)
    adapted = tta.adapt(bn_model, "afn", afn_checkpoint=str(path))  # the public API
    assert torch.equal(adapted(batch), expected)
    adapted.reset()
    assert all(torch.equal(v, warm.model.state_dict()[k]) for k, v in adapted.model.state_dict().items())


def test_checkpoint_errors(bn_model: nn.Module, tmp_path: Path) -> None:
    x, y = _source(32)
    path = warmup_afn(bn_model, x, y, epochs=0, progress=False, base="tiny:seed0").save(tmp_path / "afn.pt")
    other = copy.deepcopy(bn_model)
    with torch.no_grad():
        other.head.bias.add_(1e-3)
    with pytest.raises(ModelError, match=r"different model \(tiny:seed0\)"):
        AFNMethod(other, AFNConfig(afn_checkpoint=str(path)))
    with pytest.raises(ConfigError, match="does not exist"):
        AFNMethod(bn_model, AFNConfig(afn_checkpoint=str(tmp_path / "missing.pt")))
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for bad in ("plain.pt", "text.pt"):
        with pytest.raises(ModelError, match="tta warmup --out"):
            AFNMethod(bn_model, AFNConfig(afn_checkpoint=str(tmp_path / bad)))


def test_warmup_rejects_bad_settings(bn_model: nn.Module, no_norm_model: nn.Module) -> None:
    x, y = _source(8)
    with pytest.raises(ConfigError, match="batch_size"):
        warmup_afn(bn_model, x, y, batch_size=1, progress=False)
    with pytest.raises(ModelError, match="BatchNorm2d"):
        warmup_afn(no_norm_model, x, y, progress=False)


def test_random_crop_flip_moves_pixels_only() -> None:
    x = torch.rand(6, 3, 8, 8)
    out = _random_crop_flip(x, torch.Generator().manual_seed(0), pad=0)
    for a, b in zip(out, x, strict=True):
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))
    shifted = _random_crop_flip(x, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    assert F.pad(x, (4, 4, 4, 4)).sum(dim=(2, 3)).ge(shifted.sum(dim=(2, 3)) - 1e-4).all()


def test_afn_parameters_rejects_unknown_set(bn_model: nn.Module) -> None:
    with pytest.raises(ValueError, match="affine"):
        afn_parameters(bn_model, "bias")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------- the CLI
@pytest.fixture
def resnet_checkpoint(tmp_path: Path) -> Path:
    """A randomly initialised CIFAR ResNet-20 in the layout of the shared checkpoints (``module.`` prefixes)."""
    torch.manual_seed(0)
    path = tmp_path / "r20.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in cifar_resnet("resnet20").state_dict().items()}}, path)
    return path


def test_cli_adapt_loads_a_warmup_checkpoint(
    resnet_checkpoint: Path, tmp_path: Path, fake_cifar_c: Callable[..., Path]
) -> None:
    model = tta.load_model(checkpoint=resnet_checkpoint, arch="resnet20")
    x, y = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (16,))
    warm = warmup_afn(model, x, y, epochs=1, batch_size=8, progress=False).save(tmp_path / "warm.pt")
    data_dir = fake_cifar_c(("fog",), per_severity=8)
    args = ["adapt", "--checkpoint", str(resnet_checkpoint), "--arch", "resnet20", "--data-dir", str(data_dir),
            "--corruptions", "fog", "--severities", "5", "--batch-size", "8", "--no-progress", "--device", "cpu",
            "--no-download"]
    out = tmp_path / "afn.csv"
    result = CliRunner().invoke(cli, [*args, "--method", "afn", "--afn-checkpoint", str(warm), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(out.with_suffix(".yaml").read_text())["settings"]["afn_checkpoint"] == str(warm)
    result = CliRunner().invoke(cli, [*args, "--method", "tent", "--afn-checkpoint", str(warm)])
    assert result.exit_code != 0 and "--afn-checkpoint applies to --method afn" in result.output
    other = tmp_path / "other.th"
    torch.manual_seed(1)
    torch.save({"state_dict": {f"module.{k}": v for k, v in cifar_resnet("resnet20").state_dict().items()}}, other)
    args[2] = str(other)
    result = CliRunner().invoke(cli, [*args, "--method", "afn", "--afn-checkpoint", str(warm)])
    assert result.exit_code != 0 and "warmed up on a different model" in result.output


def test_cli_warmup_from_npz(resnet_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("tta.data.clean", reason="npz:PATH sources are read by tta.data.clean.load_clean (issue 3)")
    g = np.random.default_rng(0)
    np.savez(tmp_path / "src.npz", x=g.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8),
             y=g.integers(0, 10, 24, dtype=np.int64))
    out = tmp_path / "warm.pt"
    result = CliRunner().invoke(cli, ["warmup", "--method", "afn", "--source", f"npz:{tmp_path / 'src.npz'}",
                                      "--checkpoint", str(resnet_checkpoint), "--arch", "resnet20", "--epochs", "2",
                                      "--batch-size", "8", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "epoch 2: loss" in result.output and f"tta adapt --checkpoint {out} --method afn" in result.output
    ckpt = load_afn_checkpoint(out)
    assert ckpt["warmup"]["epochs"] == 2 and ckpt["warmup"]["n_images"] == 24 and ckpt["base"] == "resnet20:r20.th"
    model = tta.load_model(checkpoint=resnet_checkpoint, arch="resnet20")
    assert ckpt["base_fingerprint"] == model_fingerprint(model)


def test_training_split_offline_is_a_download_error(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match=r"cifar-10-python\.tar\.gz"):
        load_source("cifar10", tmp_path, download=False)


# ---------------------------------------------------------------------------------------------- real data
@pytest.mark.realdata
@pytest.mark.slow
def test_converted_resnet20_stays_close_to_batch_statistics_bn(shared: Path) -> None:
    """Identity-initialised AFN on the pretrained ResNet-20 predicts like train-mode BN (adabn batch) on real images.

    Measured on the 1,017 exact test images, batch 200: train-mode BN 87.5%, converted AFN 87.0%; 97.7% of the
    predictions agree.
    """
    model = tta.load_model(checkpoint=shared / "models" / "cifar10_resnet20.th", arch="resnet20")
    with np.load(shared / "data" / "cifar10" / "test_exact_head.npz") as data:
        x, y = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(data["y"])
    converted = copy.deepcopy(model)
    convert_to_afn(converted)
    bn, afn = _train_bn2d(model), converted.eval()
    with torch.no_grad():
        pred_bn = torch.cat([bn(x[i:i + 200]).argmax(1) for i in range(0, len(y), 200)])
        pred_afn = torch.cat([afn(x[i:i + 200]).argmax(1) for i in range(0, len(y), 200)])
    acc_bn, acc_afn = (100 * float((p == y).float().mean()) for p in (pred_bn, pred_afn))
    assert acc_bn == pytest.approx(87.5, abs=0.3)
    assert abs(acc_afn - acc_bn) < 2.0
    assert float((pred_bn == pred_afn).float().mean()) > 0.9
