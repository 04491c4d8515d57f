"""Guards and monitors (tta.monitor): signals, ATC calibration, actions on unhealthy batches, CSV columns."""

from __future__ import annotations

import copy
import math
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


def test_collapse_batches_fall_back_and_roll_back(bn_model: nn.Module) -> None:
    """A learning rate that wrecks the model (the disagreement answers off: random weights have no meaningful
    calibration): every unhealthy batch, and the batch after a collapse (probation), is
    answered by the source model; a collapse batch leaves the state of the last healthy batch (``rollback``);
    enough of them in a row reset the model."""
    guard = Guard(reset_after=3, rollback=True, near_source=0.0, mild=0.0)
    adapted = tta.adapt(bn_model, "tent", optimizer="sgd", lr=50.0, guard=guard, source_data=_source())
    source = copy.deepcopy(bn_model).eval()
    g = torch.Generator().manual_seed(2)
    last_healthy_start = _state(adapted)
    collapsed = on_probation = probation = 0
    for _ in range(12):
        x = torch.rand(16, 3, 16, 16, generator=g) * 0.5
        before, resets = _state(adapted), adapted.counters.resets
        out = adapted(x)
        with torch.no_grad():
            expected = source(x)
        if "collapse" in adapted.guard.unhealthy:
            collapsed += 1
            probation = 1
            assert torch.equal(out, expected)  # fallback
            if adapted.counters.resets == resets:  # rolled back (or skipped before any healthy batch)
                assert _equal(_state(adapted), last_healthy_start)
        else:
            last_healthy_start = before
            if probation:
                on_probation += 1
                probation = 0
                assert torch.equal(out, expected)
    c = adapted.counters
    assert collapsed > 0 and on_probation > 0 and c.skipped == collapsed
    assert c.fallbacks == collapsed + on_probation
    assert c.rollbacks + c.resets > 0


def test_probation_zero_trusts_the_first_healthy_batch_again(bn_model: nn.Module) -> None:
    guard = Guard(reset_after=3, probation=0, near_source=0.0, mild=0.0)
    adapted = tta.adapt(bn_model, "tent", optimizer="sgd", lr=50.0, guard=guard, source_data=_source())
    g = torch.Generator().manual_seed(2)
    unhealthy = 0
    for _ in range(12):
        adapted(torch.rand(16, 3, 16, 16, generator=g) * 0.5)
        unhealthy += bool(adapted.guard.unhealthy)
    assert 0 < unhealthy < 12 and adapted.counters.fallbacks == unhealthy


def test_guard_settings_and_names_are_checked() -> None:
    with pytest.raises(tta.ConfigError, match="unknown guard"):
        make_guard("paranoid")
    with pytest.raises(tta.ConfigError, match="collapse_ratio"):
        GuardConfig(collapse_ratio=float("nan"))
    with pytest.raises(tta.ConfigError, match="reset_after"):
        Guard(reset_after=0)
    with pytest.raises(tta.ConfigError, match="probation"):
        Guard(probation=-1)
    with pytest.raises(tta.ConfigError, match="unknown guard setting"):
        Guard(colapse_ratio=0.5)


def test_cli_guard_choices_are_the_presets() -> None:
    from tta.cli import adapt_command

    option = next(p for p in adapt_command.params if p.name == "guard")
    assert list(option.type.choices) == list(PRESETS)  # type: ignore[attr-defined]


def test_guard_without_source_data_still_guards_collapse(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "tent", guard="default")
    adapted(torch.rand(8, 3, 16, 16))
    assert adapted.guard.stats is None and adapted.guard.above is None
    assert adapted.guard.signals["estimated_accuracy"] != adapted.guard.signals["estimated_accuracy"]  # NaN
    assert adapted.guard.estimate_note == "no calibration data"
    assert "marginal_entropy" in adapted.guard.signals


def test_benchmark_rows_carry_the_estimate_and_counts(fake_cifar_c, tmp_path: Path, bn_model: nn.Module,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from tta.data.cifar_c import cifar_c_stream
    from tta.run.engine import evaluate

    data = fake_cifar_c(size=16)
    stream = cifar_c_stream("cifar10c", data, ["gaussian_noise", "fog"], [5], None, 10, download=False)
    guarded = tta.adapt(bn_model, "tent", guard="default", source_data=_source())
    df = evaluate(guarded, stream, "never", device="cpu")
    assert list(df.columns[-5:]) == ["estimated_accuracy", "skipped", "rollbacks", "resets", "fallbacks"]
    assert (df["estimated_accuracy"].isna() | df["estimated_accuracy"].between(0, 100)).all()
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
    estimate = df["estimated_accuracy"]  # random weights: maybe outside the calibrated range (NaN, "not estimated")
    assert (estimate.isna() | estimate.between(0, 100)).all() and len(df) == 1


def test_calibration_on_images_the_model_always_gets_right_warns(bn_model: nn.Module) -> None:
    images = _source()[0]
    with torch.no_grad():
        labels = bn_model.eval()(images).argmax(1)  # 100 % right: what training images look like
    with pytest.warns(UserWarning, match="held-out"):
        tta.adapt(bn_model, "tent", guard="default", source_data=(images, labels))


def test_collapse_is_judged_against_the_first_batch_since_reset(bn_model: nn.Module) -> None:
    """The collapse reference is the adapted model's own marginal entropy on the first batch since its last reset
    (its prediction before any update; the batch holds ``collapse_images``), kept until the next reset; no
    reset-model copy is run."""
    adapted = tta.adapt(bn_model, "tent", lr=0.05, guard=Guard(GuardConfig(skip=False, fallback=False,
                                                                            reset=False, collapse_images=16)))
    fresh = copy.deepcopy(adapted)
    fresh.guard = None
    g = torch.Generator().manual_seed(3)
    batches = [torch.rand(16, 3, 16, 16, generator=g) for _ in range(4)]
    first = float(batch_signals(fresh.predict(batches[0], None))["marginal_entropy"])
    for x in batches:
        adapted(x)
        assert adapted.guard.signals["reference_marginal_entropy"] == pytest.approx(first, abs=1e-6)
    adapted.reset()
    adapted(batches[1])
    again = float(batch_signals(fresh.predict(batches[1], None))["marginal_entropy"])
    assert adapted.guard.signals["reference_marginal_entropy"] == pytest.approx(again, abs=1e-6)


def test_small_batches_are_judged_for_collapse_over_collapse_images(bn_model: nn.Module) -> None:
    """Batches of 16 with ``collapse_images`` 48: the reference is the marginal entropy of the first three batches'
    predictions together, and each batch's is pooled with the two before it."""
    adapted = tta.adapt(bn_model, "tent", lr=0.05, guard=Guard(GuardConfig(skip=False, fallback=False,
                                                                            reset=False, collapse_images=48)))
    g = torch.Generator().manual_seed(3)
    outputs = [adapted(torch.rand(16, 3, 16, 16, generator=g)).detach() for _ in range(5)]

    def pooled(batches: list[torch.Tensor]) -> float:
        return float(batch_signals(torch.cat(batches))["marginal_entropy"])

    assert adapted.guard.signals["reference_marginal_entropy"] == pytest.approx(pooled(outputs[:3]), abs=1e-5)
    assert adapted.guard.signals["pooled_marginal_entropy"] == pytest.approx(pooled(outputs[2:]), abs=1e-5)
    assert adapted.guard.signals["marginal_entropy"] == pytest.approx(pooled(outputs[4:]), abs=1e-5)


def test_a_healthy_stream_in_small_batches_is_not_called_a_collapse(overconfident) -> None:
    """Ten clean images per batch: one batch's marginal entropy scatters around the first batch's by chance, and
    compared batch by batch (``collapse_images`` 10) some fall below 0.9 times it; pooled over 50 images (the
    default) none does, while a real collapse is still caught (``test_collapse_*``)."""
    model, calibration, _ = overconfident
    x, _ = _prototype_images(400, torch.Generator().manual_seed(11))
    x = x[torch.randperm(400, generator=torch.Generator().manual_seed(12))]
    called = {}
    for images in (10, 50):
        guarded = tta.adapt(model, "tent", guard=Guard(skip=False, fallback=False, reset=False,
                                                        collapse_images=images), source_data=calibration)
        called[images] = 0
        for xb in x.split(10):
            guarded(xb)
            called[images] += guarded.guard.unhealthy == ["collapse"]
    assert called[10] > 0 and called[50] == 0


def test_the_source_model_reads_a_subsample_and_nothing_for_the_source_method(bn_model: nn.Module) -> None:
    """The guard's cost: on a healthy batch the source copy sees ``source_fraction`` (a quarter) of the images;
    guarding the source model itself runs no second model at all."""
    seen: list[int] = []
    adapted = tta.adapt(bn_model, "tent", guard="monitor", source_data=_source())
    adapted.guard.source_model.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    adapted(torch.rand(40, 3, 16, 16))
    assert seen == [10]  # a quarter of 40
    plain = tta.adapt(bn_model, "source", guard="default", source_data=_source())
    plain.guard.source_model.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    plain(torch.rand(40, 3, 16, 16))
    assert seen == [10] and plain.guard.signals["agreement"] == 1.0
    assert 0.0 <= plain.guard.signals["estimated_accuracy"] <= 1.0


class _ClassFromPixel(nn.Module):
    """A source model that reads its class from each image's first pixel (confidently) and records the rows it
    saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[list[int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x[:, 1, 0, 0].long().tolist())
        return 6.0 * nn.functional.one_hot(x[:, 0, 0, 0].long(), 10).float()


@pytest.mark.parametrize("collapsed", [False, True])
def test_a_subsample_that_looks_concentrated_is_retested_on_the_whole_batch(bn_model: nn.Module,
                                                                             collapsed: bool) -> None:
    """The source model reads a quarter of the batch (10 of 40 evenly spaced images). Here the adapted model puts
    exactly those 10 into two classes, where the source model spreads them over eight: on the subsample the adapted
    marginal entropy is well below 0.9 times the source model's. A healthy adapted model spreads the other 30 over
    the remaining classes, so on the whole batch the comparison passes: the guard reads the source model on the
    whole batch and lets the adapted model answer. A collapsed one puts every image into the same two classes: the
    whole batch confirms the collapse and the source model answers, read once."""
    n, sub = 40, torch.linspace(0, 39, 10).round().long()  # the guard's evenly spaced subsample
    x = torch.zeros(n, 3, 16, 16)
    x[:, 0, 0, 0] = torch.arange(n) % 10  # the source model's classes: spread on the subsample too
    x[:, 1, 0, 0] = torch.arange(n).float()  # each image's row, for the record of what the source model read
    adapted_classes = torch.arange(n) % 8 + 2  # the 30 other images in classes 2..9
    adapted_classes[sub] = torch.arange(10) % 2  # the subsample in classes 0 and 1
    if collapsed:
        adapted_classes = torch.arange(n) % 2
    logits = 6.0 * nn.functional.one_hot(adapted_classes, 10).float()
    adapted = tta.adapt(bn_model, "tent")
    guard = Guard(PRESETS["default"])
    guard.attach(adapted, _ClassFromPixel())
    source = guard.source_model  # the guard's frozen copy
    on_subsample = batch_signals(logits[sub])["marginal_entropy"]
    assert on_subsample < 0.5 * batch_signals(source(x[sub]))["marginal_entropy"]  # the subsample alone: collapse
    source.seen.clear()
    update = guard.before_update(adapted, x, None, tta.core.base.StepOutput(logits=logits))
    returned = guard.after_batch(adapted, tta.core.base.StepOutput(logits=logits)).logits
    assert source.seen == [sub.tolist(), list(range(n))]  # the subsample, then the whole batch, once
    if collapsed:
        assert guard.unhealthy == ["collapse"] and guard.answer == "source" and not update
        assert torch.equal(returned.argmax(1), torch.arange(n) % 10) and adapted.counters.fallbacks == 1
    else:
        assert guard.unhealthy == [] and guard.answer == "adapted" and update
        assert torch.equal(returned, logits) and adapted.counters.fallbacks == 0
    assert guard.signals["source_rows"] == n


def test_guard_state_round_trips_through_save(bn_model: nn.Module, tmp_path: Path) -> None:
    """Saved mid-stream and loaded onto the same source model, a guarded model goes on exactly as the original:
    same snapshot, same run of unhealthy batches, same averages, same predictions and actions."""
    settings = {"optimizer": "sgd", "lr": 5.0}
    adapted = tta.adapt(bn_model, "tent", guard=Guard(reset_after=4, decay=0.5), source_data=_source(), **settings)
    g = torch.Generator().manual_seed(5)
    batches = [torch.rand(16, 3, 16, 16, generator=g) * 0.6 for _ in range(10)]
    for x in batches[:5]:
        adapted(x)
    adapted.save(tmp_path / "guarded.pt")
    loaded = tta.load_adapted(tmp_path / "guarded.pt", bn_model, source_data=_source())
    assert loaded.guard is not None and loaded.guard.config == adapted.guard.config
    assert loaded.guard.averages.values == adapted.guard.averages.values
    for x in batches[5:]:
        assert torch.equal(adapted(x), loaded(x))
        assert adapted.guard.unhealthy == loaded.guard.unhealthy
    assert _equal(_state(adapted), _state(loaded))
    with pytest.raises(tta.ConfigError, match="other guard settings"):
        Guard(reset_after=2).load_state_dict(adapted.guard.state_dict())


@pytest.mark.realdata
def test_healthy_adaptation_on_a_real_shift_is_not_blocked(shared: Path) -> None:
    """ResNet-20, Tent's defaults, the first 400 exact test images with Gaussian noise (severity 3), the guard
    calibrated on other (held-out) test images: Tent gains on the source model and the guard lets every batch
    through unchanged."""
    import numpy as np

    from tta.corruptions import corrupt

    model = tta.load_model(checkpoint=shared / "models" / "cifar10_resnet20.th", arch="resnet20")
    head = np.load(shared / "data" / "cifar10" / "test_exact_head.npz")
    held_out = np.load(shared / "data" / "cifar10" / "test_jpeg.npz")
    calibration = (held_out["x"][5000:7000], held_out["y"][5000:7000])
    images = torch.from_numpy(head["x"][:400]).permute(0, 3, 1, 2).float() / 255
    labels = torch.from_numpy(head["y"][:400])
    noisy = corrupt(images, "gaussian_noise", 3, torch.Generator().manual_seed(0))
    plain = tta.adapt(model, "tent")
    guarded = tta.adapt(model, "tent", guard="default", source_data=calibration)
    right = {"source": 0, "tent": 0}
    for x, y in zip(noisy.split(200), labels.split(200), strict=True):
        out = guarded(x)
        assert not guarded.guard.unhealthy and torch.equal(out, plain(x))
        right["tent"] += int((out.argmax(1) == y).sum())
        with torch.no_grad():
            right["source"] += int((guarded.guard.source_model(x).argmax(1) == y).sum())
    assert right["tent"] > right["source"] + 40  # adaptation gains more than 10 points here, and keeps them
    assert guarded.counters.fallbacks == guarded.counters.skipped == 0


class _Overconfident(nn.Module):
    """BatchNorm over three channels, then a linear classifier of the 4x4 pixels."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(x).flatten(1))


def _prototype_images(n: int, g: torch.Generator, shift: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy copies of ten fixed 3x4x4 prototypes; ``shift`` washes them out (``0.1 x + 0.9``, per channel)."""
    prototypes = torch.rand(10, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(n) % 10
    x = (0.25 + 0.5 * prototypes[y] + 0.3 * torch.randn(n, 3, 4, 4, generator=g)).clamp(0, 1)
    return (0.1 * x + 0.9 if shift else x), y


@pytest.fixture
def overconfident() -> tuple[nn.Module, tuple, tuple]:
    """A model that is 86 % right on held-out clean images and, under the shift, puts every image into one class
    with 99.9 % confidence (10 % right); batch statistics undo the shift exactly, so Tent's gain is large."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    model = _Overconfident()
    x, y = _prototype_images(2000, g)
    model.train()
    model.bn.momentum = None
    with torch.no_grad():
        model.bn(x)  # the clean statistics
    model.eval()
    optimizer = torch.optim.Adam(model.head.parameters(), lr=0.05)
    for _ in range(200):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.requires_grad_(False), _prototype_images(500, g), _prototype_images(400, g, shift=True)


@pytest.mark.parametrize("rule", ["fixed", "learned"])
def test_an_overconfident_source_model_cannot_block_healthy_adaptation(overconfident, rule: str) -> None:
    """The source model is confidently wrong under the shift (its own ATC estimate: 100 %, for 10 % right): a rule
    trusting it would fall back on every batch. The guard lets every batch of a healthy Tent through unchanged,
    and says that the shift is outside the range where its accuracy estimate was measured (NaN, with a note).
    The same with thresholds learned on synthetic shifts."""
    model, calibration, (x, y) = overconfident
    with torch.no_grad():
        source = model(x)
    assert (source.argmax(1) == y).float().mean() <= 0.15 and source.argmax(1).unique().numel() == 1
    assert source.softmax(1).amax(1).mean() > 0.99
    plain = tta.adapt(model, "tent")
    guarded = tta.adapt(model, "tent", guard=GuardConfig(rule=rule, shift_images=100), source_data=calibration)
    right = 0
    for xb, yb in zip(x.split(50), y.split(50), strict=True):
        out = guarded(xb)
        assert torch.equal(out, plain(xb)) and not guarded.guard.unhealthy
        assert guarded.guard.signals["source_estimated_accuracy"] > 0.95  # what the source model believes
        assert math.isnan(guarded.guard.signals["estimated_accuracy"]) and "range" in guarded.guard.estimate_note
        right += int((out.argmax(1) == yb).sum())
    assert right / len(y) > 0.8 and guarded.counters.fallbacks == 0


def test_a_collapse_on_an_overconfident_model_is_refused(overconfident) -> None:
    """Tent at Adam lr 1 collapses the same model's predictions onto fewer classes: the guard sees it against the
    adapted model's own first batch (not against the source model, which predicts one class), answers those batches
    with the source model and skips their updates."""
    model, calibration, (x, _) = overconfident
    guarded = tta.adapt(model, "tent", lr=1.0, guard="default", source_data=calibration)
    with torch.no_grad():
        source = model(x)
    collapsed = 0
    for xb, sb in zip(x.split(50), source.split(50), strict=True):
        out = guarded(xb)
        if "collapse" in guarded.guard.unhealthy:
            collapsed += 1
            assert torch.equal(out, sb)
            assert guarded.guard.signals["marginal_entropy"] < 0.9 * guarded.guard.signals[
                "reference_marginal_entropy"]
    assert collapsed > 0 and guarded.counters.skipped >= collapsed
    assert guarded.counters.fallbacks >= collapsed


def test_the_learned_rule_answers_with_the_source_model_where_adaptation_hurts(overconfident) -> None:
    """Tent at Adam lr 1 loses to this model's source model on the synthetic shifts of its calibration images. On
    contrast 3 (other images) the fixed rule lets it answer (its disagreement with the source model looks like a
    strong shift); the learned rule, fitted on those synthetic shifts, answers every batch with the source model,
    and not because of a collapse."""
    from tta.corruptions import corrupt_indexed

    model, calibration, _ = overconfident
    x, y = _prototype_images(200, torch.Generator().manual_seed(7))
    x = corrupt_indexed(x, 0, "contrast", 3, 5)
    plain = tta.adapt(model, "tent", lr=1.0)
    fixed = tta.adapt(model, "tent", lr=1.0, guard="default", source_data=calibration)
    learned = tta.adapt(model, "tent", lr=1.0, guard=GuardConfig(rule="learned", shift_images=100),
                        source_data=calibration)
    assert learned.guard.rule is not None and learned.guard.thresholds[0] > fixed.guard.thresholds[1]
    right = {"plain": 0, "learned": 0}
    for i, (xb, yb) in enumerate(zip(x.split(50), y.split(50), strict=True)):
        out = learned(xb)
        fixed(xb)
        if i == 0:
            assert fixed.guard.answer == "adapted"
        assert learned.guard.answer == "source" and not learned.guard.unhealthy
        with torch.no_grad():
            assert torch.equal(out, model(xb))
        right["learned"] += int((out.argmax(1) == yb).sum())
        right["plain"] += int((plain(xb).argmax(1) == yb).sum())
    assert learned.counters.skipped == 4 and right["learned"] >= right["plain"] + 6


def test_the_guide_and_its_tables_match_the_committed_results() -> None:
    """docs/guides/guards.md's tables and the summary CSVs are what benchmarks/guard_tables.py makes of the
    committed result files (run it after a new benchmark run)."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("guard_tables", root / "benchmarks" / "guard_tables.py")
    assert spec is not None and spec.loader is not None
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    assert tables.stale() == [], "run `python benchmarks/guard_tables.py` and commit the result"
    text = (root / "docs" / "guides" / "guards.md").read_text(encoding="utf-8")
    for name in ("guard_promise.csv", "guard_estimator.csv", "guard_collapse_table.csv", "guard_cost_ratio.csv"):
        assert f"<!-- table: docs/results/{name} -->\n|" in text  # every table is on the page, filled


def test_a_domain_with_an_unestimated_batch_has_no_estimate(bn_model: nn.Module) -> None:
    """One spelling for "not estimated": NaN in the row as soon as any batch of the domain had no estimate."""
    from tta.monitor.tally import GuardTally

    adapted = tta.adapt(bn_model, "tent", guard="monitor", source_data=_source())
    tally = GuardTally(adapted, 2, torch.device("cpu"))
    for d, note in ((0, ""), (0, "outside"), (1, ""), (1, "")):
        tally.start()
        adapted(torch.rand(8, 3, 16, 16))
        if note:
            adapted.guard.above = None  # what the guard leaves when it declines to estimate a batch
        tally.add(torch.full((8,), d))
    assert math.isnan(tally.row(0)["estimated_accuracy"])
    assert 0.0 <= tally.row(1)["estimated_accuracy"] <= 100.0


def test_near_source_batches_are_answered_by_the_source_model_without_an_update(overconfident) -> None:
    """Where the adapted and source models disagree no more than on the clean calibration images (here: clean
    images, with ``near_source`` raised so that this counts as near), the source model answers and the update is
    skipped: adapting with batch statistics buys nothing there."""
    model, calibration, _ = overconfident
    x, _ = _prototype_images(100, torch.Generator().manual_seed(7))
    guarded = tta.adapt(model, "tent", guard=Guard(near_source=3.0, mild=3.0), source_data=calibration)
    before = _state(guarded)
    for xb in x.split(50):
        out = guarded(xb)
        assert guarded.guard.answer == "source" and guarded.guard.signals["disagreement"] < 3.0
        with torch.no_grad():
            assert torch.equal(out, model(xb))
    assert guarded.counters.skipped == 2 and guarded.counters.updates == 0 and _equal(_state(guarded), before)
    assert guarded.counters.fallbacks == 2


def test_a_mild_shift_is_answered_by_the_ensemble_of_both_models(overconfident) -> None:
    """A disagreement ratio between ``near_source`` and ``mild``: the answer is the average of the two models'
    probabilities, which returns the common class wherever the two agree; the update is skipped."""
    from tta.monitor.calibrate import mixture

    model, calibration, _ = overconfident
    x, _ = _prototype_images(100, torch.Generator().manual_seed(7))
    plain = tta.adapt(model, "tent")
    guarded = tta.adapt(model, "tent", guard=Guard(near_source=0.0, mild=3.0), source_data=calibration)
    for xb in x.split(50):
        adapted_out = plain.predict(xb, None)  # the model as reset: the guarded one skipped its updates
        out = guarded(xb)
        assert guarded.guard.answer == "mix"
        with torch.no_grad():
            source = model(xb)
        assert torch.allclose(out, mixture(adapted_out, source), atol=1e-5)
        same = adapted_out.argmax(1) == source.argmax(1)
        assert torch.equal(out.argmax(1)[same], source.argmax(1)[same])
        assert 0.0 <= guarded.guard.signals["estimated_accuracy"] <= 1.0
    assert guarded.counters.updates == 0 and guarded.counters.skipped == 2


def test_roid_is_estimated_from_its_logits_before_the_prior_correction(overconfident) -> None:
    """ROID returns prior-corrected (flattened) logits; the guard reads and calibrates the logits before that
    correction, so its estimate is neither saturated nor missing on clean-like data, and close to the truth."""
    model, calibration, _ = overconfident
    model = copy.deepcopy(model)
    model.head.weight.mul_(0.2)  # moderate confidences, which the prior correction flattens to near 1/C
    model.head.bias.mul_(0.2)
    x, y = _prototype_images(300, torch.Generator().manual_seed(8))
    guarded = tta.adapt(model, "roid", guard=Guard(near_source=0.0, mild=0.0), source_data=calibration)
    stream = [(xb, yb) for xb, yb in zip(x.split(50), y.split(50), strict=True)]
    right = above = 0
    for xb, yb in stream:
        out = guarded(xb)
        assert guarded.guard.answer == "adapted"
        assert guarded.guard.estimate_note == "" and guarded.guard.above is not None
        right += int((out.argmax(1) == yb).sum())
        above += int(guarded.guard.above.sum())
    assert abs(above - right) / len(y) < 0.1


def _drifted(model: nn.Module, calibration: tuple, drift_every: int, reset: bool = False,
             drift_images: int = 0) -> tta.AdaptedModel:
    """Tent on ``model`` whose BatchNorm affine parameters were then moved far from the source model's, as a long
    continual run at a high learning rate moves them: on clean images it now disagrees with the source model on
    many images, although the images are not shifted at all."""
    guard = Guard(near_source=5.0, mild=5.0, drift_every=drift_every, drift_images=drift_images, reset=reset)
    guarded = tta.adapt(model, "tent", guard=guard, source_data=calibration)
    with torch.no_grad():
        bn = next(m for m in guarded.modules() if isinstance(m, nn.BatchNorm2d))
        bn.weight.copy_(torch.tensor([0.6, 1.6, 1.0]))
        bn.bias.copy_(torch.tensor([0.3, -0.3, 0.1]))
    return guarded


def test_a_stream_of_small_batches_is_compared_with_clean_batches_of_its_size(overconfident) -> None:
    """Batch statistics of 8 images are noisier than of 64: on clean images the adapted model then disagrees with
    the source model more often, so the guard calibrates the model as reset again in batches of the stream's first
    batch when that is less than half of ``calibration_batch``, and clean batches of 8 read as clean (ratio near
    1); a stream of batches of 40 keeps the calibration in batches of 64."""
    from tta.monitor.calibrate import calibrate_adapted
    from tta.source import as_source_data

    model, calibration, _ = overconfident
    x, _ = _prototype_images(160, torch.Generator().manual_seed(13))
    by_size = {}
    for size in (8, 40):
        guarded = tta.adapt(model, "tent", guard=Guard(skip=False, fallback=False, reset=False),
                            source_data=calibration)
        ratios = []
        for xb in x.split(size):
            guarded(xb)
            ratios.append(guarded.guard.signals["disagreement"])
        by_size[size] = guarded.guard.adapted_stats.agreement, sum(ratios) / len(ratios)
    source = as_source_data(calibration)
    in_8 = calibrate_adapted(tta.adapt(model, "tent"), model, source, 2000, 8).agreement
    in_64 = calibrate_adapted(tta.adapt(model, "tent"), model, source, 2000, 64).agreement
    assert in_8 < in_64  # the premise: more disagreement in small batches
    assert by_size[8][0] == pytest.approx(in_8) and by_size[40][0] == pytest.approx(in_64)
    assert 0.5 < by_size[8][1] < 1.5
    ahead = tta.adapt(model, "tent", guard="default", source_data=calibration)
    ahead.guard.calibrate_for_batch(ahead, 8)  # before the stream: the first batch then has nothing to do
    assert ahead.guard.adapted_stats.agreement == pytest.approx(in_8)
    with pytest.raises(tta.ConfigError, match="batch size"):
        ahead.guard.calibrate_for_batch(ahead, 0)


def test_a_drifted_model_does_not_pass_clean_batches_for_a_shift(overconfident) -> None:
    """The drifted model disagrees with the source model on clean batches far more often than the model as reset
    did: without the drift check that reads as a strong shift and the drifted model answers. Every second batch the
    guard measures the drifted model on clean calibration images and, that rate being clearly higher than as reset,
    measures the disagreement against it (``reset=False``: the model is kept): the clean batches then look clean
    and the source model answers them."""
    model, calibration, _ = overconfident
    x, _ = _prototype_images(300, torch.Generator().manual_seed(9))
    blind, checked = _drifted(model, calibration, 0), _drifted(model, calibration, 2)
    answers = {"blind": [], "checked": []}
    for xb in x.split(50):
        blind(xb)
        out = checked(xb)
        answers["blind"].append(blind.guard.answer)
        answers["checked"].append(checked.guard.answer)
    assert answers["blind"] == ["adapted"] * 6 and blind.guard.signals["drift"] == 1.0
    assert checked.guard.signals["drift"] > 2.0
    assert answers["checked"] == ["adapted"] + ["source"] * 5  # from the first check (second batch) on
    with torch.no_grad():
        assert torch.equal(out, model(xb))
    assert checked.counters.resets == 0 and checked.guard.unhealthy == ["drift"]  # the sixth batch is a check


def test_small_batches_are_checked_for_drift_no_sooner_than_drift_images(overconfident) -> None:
    """The check reads as many clean images as ``calibration_batch``: with batches of 10 and ``drift_images`` 45
    the first check comes at the fifth batch (50 images), not the second, and the next one five batches later."""
    model, calibration, _ = overconfident
    x, _ = _prototype_images(100, torch.Generator().manual_seed(9))
    checked = _drifted(model, calibration, 2, drift_images=45)
    checks = []
    for xb in x.split(10):
        checked(xb)
        checks.append(checked.guard.unhealthy == ["drift"])
    assert checks == [False] * 4 + [True] + [False] * 4 + [True]


def test_a_drifted_model_is_reset(overconfident) -> None:
    """With ``reset`` (the default) the check batch that finds drift is answered by the source model without an
    update, and the model is reset: from then on it is the model as reset, which on clean batches disagrees with
    the source model about as on the calibration images, and the source model answers the clean batches (one
    subsample's single disagreement aside)."""
    model, calibration, _ = overconfident
    x, _ = _prototype_images(300, torch.Generator().manual_seed(9))
    guarded = _drifted(model, calibration, 2, reset=True)
    answers, drift = [], []
    for xb in x.split(50):
        guarded(xb)
        answers.append(guarded.guard.answer)
        drift.append("drift" in guarded.guard.unhealthy)
    assert drift == [False, True, False, False, False, False] and guarded.counters.resets == 1
    assert answers[:2] == ["adapted", "source"] and answers[3:] == ["source"] * 3
    bn = next(m for m in guarded.modules() if isinstance(m, nn.BatchNorm2d))
    assert torch.allclose(bn.weight, torch.ones(3), atol=0.01)  # as reset (and at most one small update since)
    assert guarded.guard.signals["drift"] == 1.0


def test_the_drift_check_starts_afresh_after_a_reset(overconfident) -> None:
    """A reset returns the model to the state the check compares with: the factor goes back to 1 and the count of
    batches since the reset restarts (a stream reset every few batches is never checked)."""
    model, calibration, _ = overconfident
    x, _ = _prototype_images(200, torch.Generator().manual_seed(9))
    guarded = _drifted(model, calibration, 2)
    for xb in x.split(50)[:2]:
        guarded(xb)
    assert guarded.guard.signals["drift"] > 2.0
    saved = guarded.guard.state_dict()
    restored = _drifted(model, calibration, 2)
    restored.guard.load_state_dict(saved)
    assert restored.guard._drift == guarded.guard._drift
    guarded.reset()
    guarded(x[:50])
    assert guarded.guard.signals["drift"] == 1.0 and guarded.guard._since_check == [1, 50]
