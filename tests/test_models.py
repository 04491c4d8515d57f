"""Model loading: CIFAR ResNet checkpoints, the robustbench zoo (offline), torchvision names, timm:NAME, bad input."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import tta
from tta.compat import alias_autoattack, import_robustbench
from tta.errors import ConfigError, DownloadError, ModelError
from tta.models import cifar_resnet, load_model, zoo


def _save_akamaster(net: torch.nn.Module, path: Path) -> Path:
    torch.save({"best_prec1": 90.0, "state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return path


@pytest.mark.parametrize(("arch", "params"), [("resnet20", 0.27e6), ("resnet32", 0.46e6)])
def test_cifar_resnet_sizes(arch: str, params: float) -> None:
    assert sum(p.numel() for p in cifar_resnet(arch).parameters()) == pytest.approx(params, rel=0.02)


def test_checkpoint_round_trip_with_normalisation_inside(tmp_path: Path) -> None:
    net = cifar_resnet("resnet20").eval()
    model = load_model(checkpoint=_save_akamaster(net, tmp_path / "r20.th"), arch="resnet20")
    x = torch.rand(4, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net((x - mean) / std))
    assert not model.training


def test_checkpoint_errors(tmp_path: Path) -> None:
    path = _save_akamaster(cifar_resnet("resnet20"), tmp_path / "r20.th")
    with pytest.raises(ModelError, match="does not fit --arch resnet32"):
        load_model(checkpoint=path, arch="resnet32")
    with pytest.raises(ConfigError, match="unknown architecture 'resnet21'"):
        load_model(checkpoint=path, arch="resnet21")
    with pytest.raises(ModelError, match="does not exist"):
        load_model(checkpoint=tmp_path / "none.th", arch="resnet20")
    (tmp_path / "bad.th").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="could not be read"):
        load_model(checkpoint=tmp_path / "bad.th", arch="resnet20")
    with pytest.raises(ConfigError, match="holds plain weights; say their architecture with --arch"):
        load_model(checkpoint=path)
    with pytest.raises(ConfigError, match="needs --checkpoint PATH"):
        load_model(arch="resnet20")


def test_robustbench_shim_makes_autoattack_importable() -> None:
    alias_autoattack()
    import autoattack

    assert hasattr(autoattack, "AutoAttack")
    assert "autoattack.state" in sys.modules
    assert import_robustbench().__name__ == "robustbench"


def test_robustbench_model_offline_says_where_to_put_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tta.data.download

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Failed to resolve 'drive.google.com'")

    monkeypatch.setattr(tta.data.download, "fetch", offline)
    with pytest.raises(DownloadError) as info:
        load_model("Standard", dataset="cifar10c", data_dir=tmp_path)
    message = str(info.value)
    assert "drive.google.com/uc?id=" in message
    assert str(tmp_path / "models" / "cifar10" / "corruptions" / "Standard.pt") in message


def test_robustbench_model_loads_from_the_cache_layout(tmp_path: Path) -> None:
    # A small zoo entry written where robustbench looks (<data_dir>/models/<dataset>/corruptions/<name>.pt).
    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    name = "Hendrycks2020AugMix_WRN"
    net = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.corruptions][name]["model"]()
    target = tmp_path / "models" / "cifar10" / "corruptions" / f"{name}.pt"
    target.parent.mkdir(parents=True)
    torch.save({"state_dict": net.state_dict()}, target)
    model = load_model(name, dataset="cifar10", data_dir=tmp_path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net.eval()(x))


def test_unknown_model_names_the_zoo() -> None:
    with pytest.raises(ConfigError, match=r"unknown model 'Standart'.*Hendrycks2020AugMix_WRN"):
        load_model("Standart", dataset="cifar10")


def test_torchvision_name_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(DownloadError, match="torchvision weights for 'resnet18'"):
        zoo.load_model("resnet18", dataset="imagenet")


def test_public_loader_is_exported() -> None:
    assert tta.load_model is load_model


# --- timm:NAME ---------------------------------------------------------------------------------------------------
# timm's test_vit: a 0.4M-parameter ViT whose pretrained config (mean = std = 0.5, 160x160, crop 0.875, bicubic)
# differs from ImageNet's defaults, built with random weights (nothing can be downloaded in tests).
TIMM_VIT = "test_vit"


def _timm_vit(**kwargs: object) -> torch.nn.Module:
    return load_model(f"timm:{TIMM_VIT}", pretrained=False, model_kwargs=kwargs or None)


def test_timm_model_takes_unit_images_with_its_own_normalisation() -> None:
    import timm

    cfg = timm.models.get_pretrained_cfg(TIMM_VIT)
    assert cfg.mean != zoo.IMAGENET_NORM[0] and cfg.std != zoo.IMAGENET_NORM[1]
    torch.manual_seed(0)
    model = _timm_vit()
    assert not model.training and isinstance(model[1], timm.models.VisionTransformer)
    x = torch.rand(2, 3, 160, 160)
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model[1]((x - mean) / std))


def test_timm_geometry_comes_from_its_pretrained_config() -> None:
    from tta.models.preprocess import CIFAR, Preprocess, preprocess_for

    # 160 / 0.875 = 182.9: resized to 182, centre-cropped to 160, bicubic; for every benchmark, CIFAR's included
    assert preprocess_for(f"timm:{TIMM_VIT}", "cifar10c") == preprocess_for(f"timm:{TIMM_VIT}", "imagenetc") \
        == Preprocess(182, 160, "bicubic")
    assert preprocess_for("timm:inception_v3", "cifar10c") == Preprocess(341, 299, "bicubic")
    assert preprocess_for(TIMM_VIT, "cifar10c") == CIFAR  # a bare name on a CIFAR benchmark keeps 32x32


def test_unknown_timm_name_is_one_sentence() -> None:
    for name in ("timm:vit_tiny_patch16_2244", "timm:"):
        with pytest.raises(ConfigError) as info:
            load_model(name)
        message = str(info.value)
        assert message.startswith("unknown timm model") and message.count(". ") == 0 and "\n" not in message
    from tta.models.preprocess import preprocess_for

    with pytest.raises(ConfigError, match="unknown timm model 'vit_tiny_patch16_2244'"):
        preprocess_for("timm:vit_tiny_patch16_2244", "imagenetc")
    with pytest.raises(ConfigError, match="unknown timm model 'vit_tiny_patch16_2244'"):  # before any data is read
        tta.RunSpec.from_options({"method": "tent", "model": "timm:vit_tiny_patch16_2244"}, "the test")


def test_timm_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="timm cannot build 'test_vit' with model_kwargs"):
        _timm_vit(bogus=1)
    with pytest.raises(ConfigError, match="apply to timm:NAME models only"):
        load_model("resnet18", pretrained=False)
    with pytest.raises(ConfigError, match="--arch resnet20 is for CIFAR ResNet checkpoints"):
        load_model(f"timm:{TIMM_VIT}", arch="resnet20")


def test_timm_offline_says_what_to_fetch_and_how_to_pass_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(DownloadError) as info:
        load_model(f"timm:{TIMM_VIT}")
    message = str(info.value)
    assert "https://huggingface.co/timm/test_vit.r160_in1k" in message
    assert f"--model timm:{TIMM_VIT} --checkpoint FILE" in message


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_local_weight_file(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(1)
    net = _timm_vit(num_classes=5)[1]
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(net.state_dict(), path)
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    model = load_model(f"timm:{TIMM_VIT}", checkpoint=path)  # 5 classes, read from the file's head
    x = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        torch.testing.assert_close(model(x), net.eval()((x - 0.5) / 0.5))
    with pytest.raises(ModelError, match=f"does not fit timm:{TIMM_VIT} .*size mismatch"):
        load_model(f"timm:{TIMM_VIT}", checkpoint=path, model_kwargs={"num_classes": 7})
    with pytest.raises(ModelError, match=r"does not fit timm:test_byobnet \(\d+ missing keys"):
        load_model("timm:test_byobnet", checkpoint=path)
    with pytest.raises(ModelError, match="does not exist"):
        load_model(f"timm:{TIMM_VIT}", checkpoint=tmp_path / "none.pth")


# Filters opened wide: a randomly initialised model is unsure of everything, so the defaults would skip every sample.
OPEN_FILTERS: dict[str, dict[str, float]] = {"eta": {"e_margin": 1.0}, "sar": {"e_margin": 1.0},
                                             "deyo": {"margin": 1.0, "plpd_threshold": -1.0}}


@pytest.mark.parametrize("method", ["tent", "eta", "sar", "deyo", "roid"])
def test_timm_vit_layernorm_affine_is_what_adapts(method: str) -> None:
    torch.manual_seed(2)
    model = _timm_vit(num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = tta.adapt(model, method, lr=0.05, **OPEN_FILTERS.get(method, {}))
    x = torch.rand(8, 3, 160, 160)
    adapted(x)
    adapted(x)
    after = adapted.model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    norms = {f"{n}.{p}" for n, m in adapted.model.named_modules() if isinstance(m, torch.nn.LayerNorm)
             for p in ("weight", "bias")}
    assert changed and changed <= norms, sorted(changed - norms)
    assert any(".blocks.0.norm1." in k for k in changed)  # the first block's LayerNorm, which every method adapts


def test_cli_timm_model_with_local_weights_resizes_user_images(tmp_path: Path) -> None:
    import numpy as np
    import pandas as pd
    from click.testing import CliRunner
    from PIL import Image
    from safetensors.torch import save_file

    from tta.cli import cli

    rng = np.random.default_rng(0)
    for label in ("0", "1"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for k in range(3):  # 40x36 images: only the model's own resize and crop make them fit its 160x160 input
            pixels = rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / label / f"{k}.png")
    torch.manual_seed(3)
    save_file(_timm_vit()[1].state_dict(), tmp_path / "w.safetensors")
    out = tmp_path / "r.csv"
    result = CliRunner().invoke(cli, ["adapt", "--method", "tent", "--model", f"timm:{TIMM_VIT}", "--checkpoint",
                                      str(tmp_path / "w.safetensors"), "--data", f"folder:{tmp_path / 'imgs'}",
                                      "--batch-size", "3", "--device", "cpu", "--no-progress", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert pd.read_csv(out).n.tolist() == [6]


def test_images_of_another_size_than_a_timm_vit_takes_are_one_sentence(tmp_path: Path) -> None:
    import numpy as np

    from tta.data.sources import check_num_classes

    np.savez(tmp_path / "d.npz", x=np.zeros((4, 32, 32, 3), np.uint8), y=np.arange(4))  # arrays are not resized
    model = _timm_vit()
    with pytest.raises(ConfigError, match=r"cannot take this stream's \(3, 32, 32\) images \(Input height \(32\)"):
        check_num_classes(tta.npz_stream(tmp_path / "d.npz"), model)
    assert not model.training
