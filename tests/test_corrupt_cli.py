"""`tta corrupt` and `tta adapt --generate` end to end through click's test runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner

from tta.cli import cli
from tta.data.cifar_c import CifarCFiles
from tta.data.stream import Domain
from tta.models import cifar_resnet


@pytest.fixture
def clean(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "clean.npz"
    np.savez(path, x=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, 20))
    return path


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "r20.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in cifar_resnet("resnet20").state_dict().items()}}, path)
    return path


def test_corrupt_writes_the_layout_and_resumes(tmp_path: Path, clean: Path) -> None:
    out = tmp_path / "data"
    args = ["corrupt", "--source", f"npz:{clean}", "--out", str(out), "--corruptions", "fog,jpeg_compression",
            "--device", "cpu", "--no-progress"]
    result = CliRunner().invoke(cli, [*args, "--severities", "1,2"])
    assert result.exit_code == 0, result.output
    assert "fog.npy waits for severities 3,4,5" in result.output
    assert not (out / "CIFAR-10-C" / "fog.npy").exists()
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "3 files (fog.npy, jpeg_compression.npy, labels.npy)" in result.output
    files = CifarCFiles(out / "CIFAR-10-C")
    x, y = files.load(Domain("jpeg_compression", 5), np.arange(20))
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(y, torch.from_numpy(np.load(clean)["y"]))
    result = CliRunner().invoke(cli, [*args, "--seed", "4"])
    assert result.exit_code != 0 and "seed 0 -> 4" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(("extra", "message"), [
    (["--corruptions", "rain"], "unknown corruption(s) 'rain'"),
    (["--severities", "6"], "severities must be integers from 1 to 5"),
    (["--source", "imagenet"], "unknown clean source 'imagenet'"),
])
def test_corrupt_user_errors(tmp_path: Path, clean: Path, extra: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, ["corrupt", "--source", f"npz:{clean}", "--out", str(tmp_path), *extra])
    assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output


def test_adapt_generate_matches_adapt_on_the_written_files(tmp_path: Path, clean: Path, checkpoint: Path) -> None:
    data = tmp_path / "data"
    result = CliRunner().invoke(cli, ["corrupt", "--source", f"npz:{clean}", "--out", str(data), "--corruptions",
                                      "gaussian_noise,fog", "--seed", "2", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    common = ["adapt", "--method", "tent", "--checkpoint", str(checkpoint), "--arch", "resnet20", "--data-dir",
              str(data), "--corruptions", "gaussian_noise,fog", "--severities", "5,1", "--batch-size", "8",
              "--device", "cpu", "--no-progress"]
    result = CliRunner().invoke(cli, [*common, "--out", str(tmp_path / "files.csv")])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, [*common, "--generate", "--data-seed", "2", "--source", f"npz:{clean}",
                                      "--out", str(tmp_path / "gen.csv")])
    assert result.exit_code == 0, result.output
    files, gen = pd.read_csv(tmp_path / "files.csv"), pd.read_csv(tmp_path / "gen.csv")
    assert list(files.columns) == list(gen.columns)
    assert (files.data == "tta-corrupt:2").all() and (gen.data == "generated:2").all()  # never confused
    same = ["method", "model", "corruption", "severity", "n", "accuracy", "error", "seed", "batch_size", "reset"]
    pd.testing.assert_frame_equal(files[same], gen[same])
    resolved = yaml.safe_load((tmp_path / "gen.yaml").read_text())
    assert resolved["data"] == "generated:2" and resolved["clean_source"] == f"npz:{clean}"


def test_adapt_generate_offline_needs_only_the_clean_set(tmp_path: Path, checkpoint: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    class Offline:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            raise RuntimeError("Dataset not found") if not download else OSError("Network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    result = CliRunner().invoke(cli, ["adapt", "--generate", "--checkpoint", str(checkpoint), "--arch", "resnet20",
                                      "--data-dir", str(tmp_path), "--corruptions", "fog", "--no-progress"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert "cifar-10-python.tar.gz" in result.output and "CIFAR-10-C" not in result.output


def test_tta_corrupt_is_exported_lazily() -> None:
    import tta

    x = torch.rand(2, 3, 8, 8)
    out = tta.corrupt(x, "contrast", 5)
    torch.testing.assert_close(out, (x - x.mean((2, 3), keepdim=True)) * 0.15 + x.mean((2, 3), keepdim=True))
