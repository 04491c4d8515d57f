"""Guards and monitors (tta.monitor): signals, ATC calibration, actions on unhealthy batches, CSV columns."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import tta
from tta.monitor import PRESETS, Guard, GuardConfig, atc_threshold, batch_signals, make_guard


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Calibrations are cached on disk: keep them out of the user's cache."""
    monkeypatch.setenv("TTA_CACHE", str(tmp_path / "cache"))


def _source(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.rand(n, 3, 16, 16, generator=g) * 0.8 + 0.1, torch.randint(0, 10, (n,), generator=g)


def _state(module: nn.Module) -> dict:
    return copy.deepcopy(module.state_dict())


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else repr(a[k]) == repr(b[k]) for k in a)


def test_atc_threshold_puts_the_source_accuracy_above_it() -> None:
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(1000, generator=g)
    for k in (0, 1, 370, 999, 1000):
        correct = torch.zeros(1000, dtype=torch.bool)
        correct[:k] = True
        assert int((conf > atc_threshold(conf, correct)).sum()) == k


def test_signals_detect_a_prediction_collapsed_onto_one_class() -> None:
    spread = torch.eye(10).repeat(3, 1) * 50
    collapsed = torch.zeros(30, 10)
    collapsed[:, 3] = 50
    s, c = batch_signals(spread, spread, 0.5), batch_signals(collapsed, spread, 0.5)
    assert float(s["marginal_entropy"]) == pytest.approx(1.0, abs=1e-4) and float(c["marginal_entropy"]) < 1e-3
    assert float(s["agreement"]) == 1.0 and float(c["agreement"]) == pytest.approx(0.1)
    assert float(s["confidence"]) == pytest.approx(float(c["confidence"]))  # confidence alone cannot tell


def test_monitor_preset_changes_nothing(bn_model: nn.Module) -> None:
    plain = tta.adapt(bn_model, "tent", lr=0.05)
    watched = tta.adapt(bn_model, "tent", lr=0.05, guard="monitor", source_data=_source())
    for i in range(6):
        x = torch.rand(16, 3, 16, 16) * (0.2 + 0.1 * i)
        assert torch.equal(plain(x), watched(x))
        assert set(watched.guard.signals) >= {"entropy", "confidence", "marginal_entropy", "agreement",
                                              "estimated_accuracy", "source_estimated_accuracy"}
    assert _equal(_state(plain), _state(watched))
    assert watched.guard.averages.values["entropy"] == pytest.approx(watched.guard.averages.values["entropy"])


def test_unhealthy_batches_fall_back_and_roll_back(bn_model: nn.Module) -> None:
    """A learning rate that wrecks the model: every unhealthy batch is answered by the source model and leaves the
    state of the last healthy batch; enough of them in a row reset the model."""
    adapted = tta.adapt(bn_model, "tent", optimizer="sgd", lr=50.0, guard=Guard(reset_after=3),
                        source_data=_source())
    source = copy.deepcopy(bn_model).eval()
    g = torch.Generator().manual_seed(2)
    last_healthy_start = _state(adapted)
    unhealthy = 0
    for _ in range(12):
        x = torch.rand(16, 3, 16, 16, generator=g) * 0.5
        before, resets = _state(adapted), adapted.counters.resets
        out = adapted(x)
        if adapted.guard.unhealthy:
            unhealthy += 1
            with torch.no_grad():
                assert torch.equal(out, source(x))  # fallback
            if adapted.counters.resets == resets:  # rolled back (or skipped before any healthy batch)
                assert _equal(_state(adapted), last_healthy_start)
        else:
            last_healthy_start = before
    c = adapted.counters
    assert unhealthy > 0 and c.fallbacks == unhealthy and c.skipped == unhealthy
    assert c.rollbacks + c.resets > 0


def test_guard_settings_and_names_are_checked() -> None:
    with pytest.raises(tta.ConfigError, match="unknown guard"):
        make_guard("paranoid")
    with pytest.raises(tta.ConfigError, match="collapse_ratio"):
        GuardConfig(collapse_ratio=float("nan"))
    with pytest.raises(tta.ConfigError, match="reset_after"):
        Guard(reset_after=0)
    with pytest.raises(tta.ConfigError, match="unknown guard setting"):
        Guard(colapse_ratio=0.5)


def test_cli_guard_choices_are_the_presets() -> None:
    from tta.cli import adapt_command

    option = next(p for p in adapt_command.params if p.name == "guard")
    assert list(option.type.choices) == list(PRESETS)  # type: ignore[attr-defined]


def test_guard_without_source_data_still_guards_collapse(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "tent", guard="default")
    adapted(torch.rand(8, 3, 16, 16))
    assert adapted.guard.stats is None and "estimated_accuracy" not in adapted.guard.signals
    assert "marginal_entropy" in adapted.guard.signals


def test_benchmark_rows_carry_the_estimate_and_counts(fake_cifar_c, tmp_path: Path, bn_model: nn.Module,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from tta.data.cifar_c import cifar_c_stream
    from tta.engine import evaluate

    data = fake_cifar_c(size=16)
    stream = cifar_c_stream("cifar10c", data, ["gaussian_noise", "fog"], [5], None, 10, download=False)
    guarded = tta.adapt(bn_model, "tent", guard="default", source_data=_source())
    df = evaluate(guarded, stream, "never", device="cpu")
    assert list(df.columns[-5:]) == ["estimated_accuracy", "skipped", "rollbacks", "resets", "fallbacks"]
    assert df["estimated_accuracy"].between(0, 100).all()
    plain = evaluate(tta.adapt(bn_model, "tent"), stream, "domain", device="cpu")
    assert plain["estimated_accuracy"].isna().all() and (plain[["skipped", "rollbacks", "resets"]] == 0).all().all()


def test_cli_guard_runs_and_fills_the_columns(tmp_path: Path, fake_cifar_c) -> None:
    import numpy as np
    import pandas as pd
    from click.testing import CliRunner

    from tta.cli import cli
    from tta.models import cifar_resnet

    data_dir = fake_cifar_c(("gaussian_noise",), per_severity=8)
    checkpoint = tmp_path / "r20.th"
    torch.save({"state_dict": {f"module.{k}": v for k, v in cifar_resnet("resnet20").state_dict().items()}},
               checkpoint)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "clean.npz", x=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
             y=rng.integers(0, 10, 20))
    out = tmp_path / "guarded.csv"
    result = CliRunner().invoke(cli, [
        "adapt", "--method", "tent", "--guard", "default", "--source-data", f"npz:{tmp_path / 'clean.npz'}",
        "--checkpoint", str(checkpoint), "--arch", "resnet20", "--data-dir", str(data_dir), "--corruptions",
        "gaussian_noise", "--severities", "5", "--batch-size", "4", "--no-progress", "--device", "cpu",
        "--out", str(out)])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out)
    assert df["estimated_accuracy"].between(0, 100).all() and len(df) == 1
