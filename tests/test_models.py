"""Model loading: CIFAR ResNet checkpoints, the robustbench zoo (offline), torchvision names, bad input."""

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
