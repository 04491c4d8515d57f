"""`tta adapt` end to end through click's test runner on a fake CIFAR-10-C in the real layout."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner

from tta.cli import cli
from tta.models import cifar_resnet
from tta.run.engine import COLUMNS


@pytest.fixture
def setup(tmp_path: Path, fake_cifar_c: Callable[..., Path]) -> tuple[Path, list[str]]:
    data_dir = fake_cifar_c(("gaussian_noise", "fog"), per_severity=12)
    checkpoint = tmp_path / "r20.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in cifar_resnet("resnet20").state_dict().items()}},
               checkpoint)
    args = ["--checkpoint", str(checkpoint), "--arch", "resnet20", "--data-dir", str(data_dir),
            "--corruptions", "gaussian_noise,fog", "--batch-size", "8", "--no-progress", "--device", "cpu"]
    return tmp_path, args


@pytest.mark.parametrize("method", ["source", "adabn", "tent"])
def test_adapt_writes_ten_rows_with_the_right_columns(setup: tuple[Path, list[str]], method: str) -> None:
    tmp_path, args = setup
    out = tmp_path / "results" / f"{method}.csv"
    result = CliRunner().invoke(cli, ["adapt", "--method", method, *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out, dtype={"config_hash": str})
    assert list(df.columns) == COLUMNS
    assert len(df) == 10
    assert set(zip(df.corruption, df.severity, strict=True)) == {(c, s) for c in ("gaussian_noise", "fog")
                                                                 for s in range(1, 6)}
    assert (df.method == method).all() and (df.n == 12).all() and (df.batch_size == 8).all()
    assert (df.data == "files").all() and df.config_hash.nunique() == 1
    resolved = yaml.safe_load(out.with_suffix(".yaml").read_text())
    assert resolved["method"] == method and resolved["config_hash"] == df.config_hash[0]
    assert "sev 5" in result.output and "gaussian_noise" in result.output and "mean accuracy" in result.output


def test_set_and_config_reach_the_method(setup: tuple[Path, list[str]]) -> None:
    tmp_path, args = setup
    config = tmp_path / "tent.yaml"
    config.write_text("lr: 0.01\n")
    out = tmp_path / "r.csv"
    result = CliRunner().invoke(cli, ["adapt", *args, "--config", str(config), "--set", "steps=2",
                                      "--severities", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    settings = yaml.safe_load(out.with_suffix(".yaml").read_text())["settings"]
    assert settings["lr"] == 0.01 and settings["steps"] == 2
    assert len(pd.read_csv(out)) == 2


@pytest.mark.parametrize(("extra", "message"), [
    (["--method", "tnet"], "unknown method 'tnet'"),
    (["--set", "lrr=1"], "unknown key(s) 'lrr'"),
    (["--corruptions", "fgo"], "unknown corruption(s) 'fgo'"),
    (["--severities", "0"], "severities must be integers from 1 to 5"),
    (["--severities", "five"], "expected comma-separated integers"),
    (["--arch", "resnet21"], "unknown architecture 'resnet21'"),
    (["--corruption", "cifar11c"], "unknown corruption benchmark 'cifar11c'"),
])
def test_user_errors_exit_non_zero_without_traceback(setup: tuple[Path, list[str]], extra: list[str],
                                                     message: str) -> None:
    _, args = setup
    result = CliRunner().invoke(cli, ["adapt", *args, *extra])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)


def test_unknown_model(tmp_path: Path, fake_cifar_c: Callable[..., Path]) -> None:
    data_dir = fake_cifar_c(("fog",))
    result = CliRunner().invoke(cli, ["adapt", "--model", "Standart", "--data-dir", str(data_dir),
                                      "--corruptions", "fog", "--no-progress"])
    assert result.exit_code != 0 and "unknown model 'Standart'" in result.output


def test_tent_on_a_model_without_norm_layers(tmp_path: Path) -> None:
    import tta

    with pytest.raises(tta.ModelError, match="affine norm layers"):
        tta.adapt(torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1)), "tent")


def test_methods_lists_defaults() -> None:
    result = CliRunner().invoke(cli, ["methods"])
    assert result.exit_code == 0
    assert "tent" in result.output and "lr=0.001" in result.output


@pytest.mark.parametrize("method", ["adabn", "tent"])
def test_batch_size_one_adapts_on_a_sliding_window(setup: tuple[Path, list[str]], method: str) -> None:
    tmp_path, args = setup
    args = [a if a != "8" else "1" for a in args]  # --batch-size 1
    out = tmp_path / f"{method}1.csv"
    result = CliRunner().invoke(cli, ["adapt", "--method", method, *args, "--severities", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out)
    assert (df.batch_size == 1).all() and (df.n == 12).all()
    assert yaml.safe_load(out.with_suffix(".yaml").read_text())["window"] == 64


def test_stream_stats_at_batch_size_one_needs_no_window(setup: tuple[Path, list[str]]) -> None:
    """stream-stats adapts image by image itself: batch size 1 runs without the sliding window, and equals batch 8."""
    tmp_path, args = setup
    rows = {}
    for batch in ("1", "8"):
        out = tmp_path / f"stream{batch}.csv"
        run = [a if a != "8" else batch for a in args]
        result = CliRunner().invoke(cli, ["adapt", "--method", "stream-stats", *run, "--severities", "5", "--out",
                                          str(out)])
        assert result.exit_code == 0, result.output
        assert yaml.safe_load(out.with_suffix(".yaml").read_text())["window"] == 0
        rows[batch] = pd.read_csv(out).accuracy.tolist()
    assert rows["1"] == rows["8"]


def test_correlated_setting_and_source_data_reach_the_run(setup: tuple[Path, list[str]]) -> None:
    tmp_path, args = setup
    out = tmp_path / "corr.csv"
    result = CliRunner().invoke(cli, ["adapt", "--method", "tent", *args, "--severities", "5", "--setting",
                                      "correlated", "--dirichlet", "0.5", "--reset", "never", "--out", str(out)])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(out.with_suffix(".yaml").read_text())
    assert resolved["setting"] == "correlated" and resolved["dirichlet"] == 0.5
    assert set(pd.read_csv(out).setting) == {"correlated"}
    bad = CliRunner().invoke(cli, ["adapt", "--method", "tent", *args, "--source-data", "nope", "--out",
                                   str(tmp_path / "x.csv")])
    assert bad.exit_code != 0 and "unknown clean source 'nope'" in bad.output


def test_a_model_with_the_wrong_number_of_classes_is_refused(setup: tuple[Path, list[str]]) -> None:
    tmp_path, args = setup
    checkpoint = tmp_path / "r20_100.th"
    torch.save({"state_dict": cifar_resnet("resnet20", num_classes=100).state_dict()}, checkpoint)
    args = [a if a != str(tmp_path / "r20.th") else str(checkpoint) for a in args]
    result = CliRunner().invoke(cli, ["adapt", "--method", "source", *args, "--out", str(tmp_path / "x.csv")])
    assert result.exit_code != 0
    assert "predicts 100 classes but cifar10c has 10" in result.output


def test_provenance_is_recorded_and_hashed(setup: tuple[Path, list[str]]) -> None:
    import hashlib

    tmp_path, args = setup
    out = tmp_path / "prov.csv"
    assert CliRunner().invoke(cli, ["adapt", "--method", "source", *args, "--out", str(out)]).exit_code == 0
    resolved = yaml.safe_load(out.with_suffix(".yaml").read_text())
    assert resolved["checkpoint_sha256"] == hashlib.sha256((tmp_path / "r20.th").read_bytes()).hexdigest()
    assert resolved["versions"]["torch"] == torch.__version__ and resolved["data_dir"].endswith("data")
