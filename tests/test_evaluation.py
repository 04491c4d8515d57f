"""Evaluation that tells the truth: counted costs, the online protocol, recurring and CCC-style long streams, and
long runs that resume after a kill to exactly the rows of an uninterrupted run."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import tta
from tta.data.ccc import CCCStream, walk
from tta.data.recurring import RecurringStream
from tta.data.stream import Domain, Stream
from tta.errors import ConfigError
from tta.run.cost import PassCounter, counted_cost
from tta.run.engine import Protocol, evaluate
from tta.run.online import OnlineClock, skipped_after

CHEAP = ("gaussian_noise", "brightness", "contrast")
COUNTED = ["accuracy", "n", "forward_passes", "backward_passes", "relative_cost", "batches", "adapted_batches",
           "source_accuracy", "collapse"]


class RandomSource:
    """Seeded random images and labels, the same for the same (domain, index)."""

    label = "random"

    def __init__(self, n: int, side: int = 8) -> None:
        self.n, self.side = n, side

    def size(self, domain: Domain) -> int:
        return self.n

    def load(self, domain: Domain, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(sum(map(ord, domain.name)))
        x = torch.rand(self.n, 3, self.side, self.side, generator=g)
        y = torch.randint(0, 10, (self.n,), generator=g)
        idx = torch.as_tensor(index)
        return x[idx], y[idx]


def _stream(n: int = 40, batch_size: int = 8, names: tuple[str, ...] = ("a", "b")) -> Stream:
    return Stream(RandomSource(n), [Domain(name=c) for c in names], batch_size=batch_size)


def test_counted_cost_weighs_a_backward_pass_as_two_forward_passes(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, method="tent")
    counter = PassCounter()
    with counter.attached(adapted, adapted.num_classes):
        adapted(torch.rand(8, 3, 8, 8))
    assert (counter.forward, counter.backward) == (8, 8)
    assert counted_cost(counter.forward, counter.backward, 8) == 3.0
    source = tta.adapt(bn_model, method="source")
    counter = PassCounter()
    with counter.attached(source, source.num_classes):
        source(torch.rand(8, 3, 8, 8))
    assert (counter.forward, counter.backward) == (8, 0)
    guarded = tta.adapt(bn_model, method="tent", guard="monitor")
    counter = PassCounter()
    with counter.attached(guarded, guarded.num_classes):
        guarded(torch.rand(8, 3, 8, 8))
    assert counter.forward > 8 and counter.backward == 8  # the guard's source model predicts too


@pytest.mark.parametrize(("speed", "adapted_batches"), [(1.0, [0, 3, 6, 9]), (2.0, [0, 6]), (0.5, [0, 2, 4, 6, 8]),
                                                        (1 / 3, list(range(10)))])
def test_online_skip_count_follows_the_counted_cost(bn_model: nn.Module, speed: float,
                                                    adapted_batches: list[int]) -> None:
    """Tent costs 3 forward passes per step: ceil(ETA * 3) - 1 batches pass unadapted after each step."""
    adapted = tta.adapt(bn_model, method="tent")
    stream = _stream(n=40, batch_size=8)  # 10 batches, two domains of 5
    df = evaluate(adapted, stream, "never", device="cpu", seed=0,
                  protocol=Protocol("online", speed, reference=bn_model))
    assert df["batches"].tolist() == [5, 5]
    assert df["adapted_batches"].sum() == len(adapted_batches) == adapted.counters.updates
    assert df["adapted_batches"].tolist() == [sum(b < 5 for b in adapted_batches),
                                              sum(b >= 5 for b in adapted_batches)]
    assert df["forward_passes"].tolist() == [1.0, 1.0]
    assert df["backward_passes"].sum() * 5 == pytest.approx(len(adapted_batches))
    assert skipped_after(3.0, speed) == {1.0: 2, 2.0: 5, 0.5: 1, 1 / 3: 0}[speed]


def test_online_clock_state() -> None:
    clock = OnlineClock("online", 1.0)
    clock.stepped(5.0)
    assert [clock.adapts() for _ in range(6)] == [False] * 4 + [True, True]
    offline = OnlineClock("offline", 1.0)
    offline.stepped(5.0)
    assert offline.adapts()


@pytest.mark.parametrize("method", ["source", "adabn", "lame"])
@pytest.mark.parametrize("cost", ["counted", "timed"])
def test_online_equals_offline_for_methods_that_never_update(bn_model: nn.Module, method: str, cost: str) -> None:
    stream = _stream(n=40, batch_size=8)
    offline = evaluate(tta.adapt(bn_model, method=method), stream, "never", device="cpu", seed=0,
                       protocol=Protocol(reference=bn_model))
    online = evaluate(tta.adapt(bn_model, method=method), stream, "never", device="cpu", seed=0,
                      protocol=Protocol("online", 1.0, cost, reference=bn_model))
    assert online["accuracy"].tolist() == offline["accuracy"].tolist()
    assert (offline["source_accuracy"] == online["source_accuracy"]).all()
    if cost == "counted":  # one forward pass per step: nothing is ever skipped
        assert online["adapted_batches"].tolist() == online["batches"].tolist()


def test_rows_carry_cost_and_source_columns(bn_model: nn.Module) -> None:
    df = evaluate(tta.adapt(bn_model, method="source"), _stream(), "domain", device="cpu", seed=0,
                  protocol=Protocol(reference=bn_model))
    assert (df["accuracy"] == df["source_accuracy"]).all() and not df["collapse"].any()
    assert (df["relative_cost"] == 1.0).all() and (df["peak_memory_mb"] > 0).all()
    assert (df["reference_seconds"] > 0).all() and (df["time_relative_cost"] > 0).all()
    with pytest.raises(ConfigError, match="protocol"):
        evaluate(tta.adapt(bn_model, method="source"), _stream(), protocol=Protocol("sometimes"))
    with pytest.raises(ConfigError, match="timed cost"):
        evaluate(tta.adapt(bn_model, method="source"), _stream(), protocol=Protocol("online", cost="timed"))


def test_recurring_rows_per_visit_without_reset(bn_model: nn.Module) -> None:
    stream = RecurringStream(_stream(n=16, batch_size=8), visits=3)
    adapted = tta.adapt(bn_model, method="tent")
    df = evaluate(adapted, stream, "domain", device="cpu", seed=0, protocol=Protocol(reference=bn_model))
    assert df[["corruption", "visit"]].values.tolist() == [[c, v] for v in (1, 2, 3) for c in ("a", "b")]
    assert adapted.counters.resets == 0 and adapted.counters.updates == 12  # never reset between visits
    assert set(df["reset"]) == {"never"}
    assert df.groupby("corruption")["source_accuracy"].nunique().eq(1).all()  # the same images every visit
    with pytest.raises(ConfigError, match="visits"):
        RecurringStream(_stream(), visits=0)


def _images(n: int = 64, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 10, n)


def _ccc(model: nn.Module, tmp_path: Path, seed: int = 0, length: int = 400) -> CCCStream:
    x, y = _images()
    return CCCStream(x, y, model, length=length, baseline=20, speed=100, batch_size=50, window=100, seed=seed,
                     corruptions=CHEAP, cache=tmp_path)


def test_ccc_stream_is_a_pure_function_of_its_inputs(bn_model: nn.Module, tmp_path: Path) -> None:
    first = list(_ccc(bn_model, tmp_path))
    again = list(_ccc(bn_model, tmp_path / "other-cache"))  # calibrated afresh: the same table
    other = list(_ccc(bn_model, tmp_path, seed=1))
    assert len(first) == 8 and all(a.x.dtype == torch.uint8 for a in first)
    assert all(torch.equal(a.x, b.x) and torch.equal(a.y, b.y) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a.x, b.x) for a, b in zip(first, other, strict=True))
    assert _ccc(bn_model, tmp_path).identity == _ccc(bn_model, tmp_path / "x").identity
    assert _ccc(bn_model, tmp_path).identity != _ccc(bn_model, tmp_path, seed=1).identity
    resumed = list(_ccc(bn_model, tmp_path).iter_from(5))
    assert all(torch.equal(a.x, b.x) for a, b in zip(first[5:], resumed, strict=True))
    assert [b.segment for b in first] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert list((tmp_path).glob("ccc-calibration-*.json"))  # cached with the model's fingerprint


def test_ccc_walk_moves_one_step_at_a_time() -> None:
    grid = np.add.outer(np.linspace(90, 10, 21), -np.linspace(0, 80, 21))
    path = walk(grid, 12, 7, 20.0)
    assert path[0] == (12, 0) and path[-1] == (0, 7) and len(path) == 12 + 7 + 1
    assert all(abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1 for a, b in itertools.pairwise(path))


def test_ccc_rejects_bad_settings(bn_model: nn.Module) -> None:
    x, y = _images()
    with pytest.raises(ConfigError, match="baseline"):
        CCCStream(x, y, bn_model, baseline=30, corruptions=CHEAP)
    with pytest.raises(ConfigError, match="multiple of the batch size"):
        CCCStream(x, y, bn_model, speed=150, batch_size=100, corruptions=CHEAP)


class AlwaysZero(nn.Module):
    """Predicts class 0 for every image, however corrupted."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(x), 10).index_fill_(1, torch.tensor([0]), 1.0)


def test_ccc_says_when_its_target_cannot_be_reached(caplog: pytest.LogCaptureFixture) -> None:
    x, _ = _images()
    y = np.zeros(len(x), dtype=np.int64)  # AlwaysZero is right on every image at every severity
    with caplog.at_level("WARNING", logger="tta.data.ccc"):
        CCCStream(x, y, AlwaysZero(), baseline=0, speed=100, batch_size=50, window=100, corruptions=CHEAP)
    assert "no lower than 100.0 %" in caplog.text and "hard target" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="tta.data.ccc"):
        CCCStream(x, np.ones_like(y), AlwaysZero(), baseline=0, speed=100, batch_size=50, window=100,
                  corruptions=CHEAP)  # never right: 0 % is reached
    assert "no corruption" not in caplog.text


def _resident_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident size from /proc (Linux)")
def test_ccc_memory_stays_flat_with_length(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 10)).eval()
    x, y = _images(256, size=8)
    stream = CCCStream(x, y, model, length=200_000, speed=2000, batch_size=1000, window=1000, corruptions=CHEAP,
                       cache=tmp_path)
    adapted = tta.adapt(model, method="source")
    resident = {}
    with torch.no_grad():
        for i, batch in enumerate(stream):
            adapted(batch.x.float() / 255)
            if i + 1 in (10, 200):
                resident[(i + 1) * 1000] = _resident_mb()
    assert resident[200_000] - resident[10_000] < 16, resident


RESUME_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np, torch
    from torch import nn
    import tta
    from tta.data.ccc import CCCStream
    from tta.run.engine import Protocol, evaluate
    from tta.run.report import CsvWriter, batches_path
    from tta.run.schema import BATCH_COLUMNS

    out, checkpoint = Path(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10)).eval()
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (128, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, 128)
    stream = CCCStream(x, y, model, length=1500, speed=100, batch_size=10, window=50, corruptions={cheap},
                       cache=out.parent)
    writer = CsvWriter(out, replace_hash="run")
    batches = CsvWriter(batches_path(out), BATCH_COLUMNS, replace_hash="run")
    evaluate(tta.adapt(model, method="tent"), stream, "never", device="cpu", seed=3, on_result=writer,
             on_batches=batches.write_rows, metadata={{"config_hash": "run"}},
             protocol=Protocol("online", 1.0, reference=model,
                               checkpoint=Path(checkpoint) if checkpoint != "-" else None, checkpoint_every=0))
""").format(cheap=CHEAP)


def test_a_killed_long_run_resumes_to_the_rows_of_an_uninterrupted_one(tmp_path: Path) -> None:
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    whole, killed, ckpt = tmp_path / "whole.csv", tmp_path / "killed.csv", tmp_path / "run.ckpt"
    subprocess.run([sys.executable, str(script), str(whole), "-"], env=env, check=True, timeout=300)
    proc = subprocess.Popen([sys.executable, str(script), str(killed), str(ckpt)], env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.exists() and killed.exists() and len(killed.read_text().splitlines()) > 8:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make the stream longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(pd.read_csv(killed))
    assert 0 < partial < 30
    subprocess.run([sys.executable, str(script), str(killed), str(ckpt)], env=env, check=True, timeout=300)
    a, b = pd.read_csv(whole), pd.read_csv(killed)
    assert len(a) == 30 and a["window"].tolist() == list(range(30))
    pd.testing.assert_frame_equal(a[["window", *COUNTED]], b[["window", *COUNTED]])
    columns = ["batch", "accuracy"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "whole.batches.csv")[columns],
                                  pd.read_csv(tmp_path / "killed.batches.csv")[columns])
    assert not ckpt.exists()  # a finished run removes its checkpoint


def test_batches_of_a_stream_stay_on_their_window(bn_model: nn.Module, tmp_path: Path) -> None:
    stream = _ccc(bn_model, tmp_path)
    df = evaluate(tta.adapt(bn_model, method="tent"), stream, device="cpu", seed=0,
                  protocol=Protocol(reference=bn_model))
    assert df["window"].tolist() == [0, 1, 2, 3] and (df["n"] == 100).all()
    assert (df["stream_id"] == stream.identity).all() and set(df["reset"]) == {"never"}


def test_report_shows_costs_visits_online_and_accuracy_over_time(bn_model: nn.Module, tmp_path: Path) -> None:
    from tta.run.report import write_report

    stream = RecurringStream(_stream(n=16, batch_size=8), visits=2)
    for protocol in ("offline", "online"):
        df = evaluate(tta.adapt(bn_model, method="tent"), stream, device="cpu", seed=0, model_name="tiny",
                      metadata={"config_hash": protocol}, protocol=Protocol(protocol, reference=bn_model))
        df.to_csv(tmp_path / f"{protocol}.csv", index=False)
    report = write_report([tmp_path / "offline.csv", tmp_path / "online.csv"], tmp_path / "report")
    text = report.read_text()
    for heading in ("### Error per visit", "### Cost", "### Offline and online"):
        assert heading in text
    assert "| tent protocol=online | 1.0 | 0.4 | 1.8 |" in text  # 3 of 8 batches adapted: 1 + 2 x 3 / 8
    assert (tmp_path / "report" / "over_time_tiny_recurring_named.png").is_file()


def test_online_single_images_on_a_sliding_window(bn_model: nn.Module) -> None:
    """A window step costs its whole window: the images that arrive meanwhile pass unadapted, predicted with the
    window as context (the tiny model's BatchNorm1d cannot normalise a single image on its own)."""
    adapted = tta.adapt(bn_model, method="tent", window=4)
    df = evaluate(adapted, _stream(n=20, batch_size=1), "never", device="cpu", seed=0,
                  protocol=Protocol("online", 1.0, reference=bn_model))
    assert df["batches"].sum() == 40 and 0 < df["adapted_batches"].sum() < 40
    assert adapted.counters.updates >= 1
