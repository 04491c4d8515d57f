"""The engine: accounting per (corruption, severity), reset policies, incremental results."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import tta
from tta.data.stream import Batch, Domain, Stream
from tta.errors import ConfigError
from tta.run.engine import COLUMNS, evaluate, resolve_device
from tta.run.report import CsvWriter, accuracy_table


class ArraySource:
    """Images whose first pixel encodes the label, so a fixed model's accuracy is known exactly."""

    label = "files"

    def __init__(self, n: int, wrong_every: dict[str, int]) -> None:
        self.n, self.wrong_every = n, wrong_every

    def size(self, domain: Domain) -> int:
        return self.n

    def load(self, domain: Domain, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.as_tensor(index % 10, dtype=torch.long)
        x = torch.zeros(len(index), 3, 4, 4)
        code = y.clone()
        every = self.wrong_every[domain.corruption] + domain.severity
        code[torch.as_tensor(index) % every == 0] += 1  # these images are predicted wrongly
        x[:, 0, 0, 0] = (code % 10).float() / 10
        return x, y


class Decoder(nn.Module):
    """Predicts the class written in the first pixel; has a BN so that every method accepts it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.register_buffer("proto", torch.arange(10).float() / 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.bn(self.conv(x))  # exercised, not used: the decision only reads the pixel
        return -(x[:, 0, 0, 0, None] - self.proto).abs() * 100 + 0 * self.conv.weight.sum() + 0 * self.bn.weight.sum()


def _stream(n: int = 23, batch_size: int = 5) -> Stream:
    domains = [Domain(c, s) for s in (5, 2) for c in ("a", "b")]
    return Stream(ArraySource(n, {"a": 2, "b": 4}), domains, batch_size=batch_size)


def _expected(n: int, corruption: str, severity: int) -> float:
    every = {"a": 2, "b": 4}[corruption] + severity
    wrong = sum(1 for i in range(n) if i % every == 0)
    return 100.0 * (n - wrong) / n


@pytest.mark.parametrize("method", ["source", "adabn", "tent"])
def test_accuracy_is_tallied_per_domain(method: str) -> None:
    df = evaluate(tta.adapt(Decoder(), method), _stream(), model_name="decoder", device="cpu", seed=3)
    assert list(df.columns[: len(COLUMNS)]) == COLUMNS
    assert list(zip(df.corruption, df.severity, strict=True)) == [("a", 5), ("b", 5), ("a", 2), ("b", 2)]
    assert (df.n == 23).all() and (df.method == method).all() and (df.model == "decoder").all()
    for row in df.itertuples():
        assert row.accuracy == pytest.approx(_expected(23, row.corruption, row.severity))
        assert row.error == pytest.approx(100 - row.accuracy)
        assert row.seconds > 0 and row.images_per_second > 0


@pytest.mark.parametrize(("policy", "expected"), [("domain", 4), ("batch", 20), ("never", 0)])
def test_reset_policies(policy: str, expected: int, monkeypatch: pytest.MonkeyPatch) -> None:
    adapted = tta.adapt(Decoder(), "tent")
    calls = []
    original = adapted.reset
    monkeypatch.setattr(adapted, "reset", lambda: (calls.append(1), original()))
    evaluate(adapted, _stream(n=25), reset=policy, device="cpu")  # 4 domains x 5 batches
    assert len(calls) == expected


def test_unknown_reset_policy_and_device() -> None:
    with pytest.raises(ConfigError, match="unknown reset policy 'sometimes'"):
        evaluate(tta.adapt(Decoder(), "source"), _stream(), reset="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
        assert resolve_device("auto") == torch.device("cpu")


class Interrupting(Stream):
    """Raises after ``stop`` batches, as a killed run would stop."""

    def __init__(self, stream: Stream, stop: int) -> None:
        self.__dict__.update(stream.__dict__)
        self.stop = stop

    def __iter__(self) -> Iterator[Batch]:
        for i, batch in enumerate(super().__iter__()):
            if i == self.stop:
                raise KeyboardInterrupt
            yield batch


def test_interrupted_run_keeps_finished_rows(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    writer = CsvWriter(out)
    with pytest.raises(KeyboardInterrupt):
        evaluate(tta.adapt(Decoder(), "source"), Interrupting(_stream(n=10), stop=5), device="cpu", on_result=writer)
    rows = pd.read_csv(out)
    assert list(rows.columns) == COLUMNS
    assert list(zip(rows.corruption, rows.severity, strict=True)) == [("a", 5), ("b", 5)]  # the domains that ended
    assert rows.accuracy.tolist() == pytest.approx([_expected(10, "a", 5), _expected(10, "b", 5)])


def test_accuracy_table_has_means() -> None:
    df = evaluate(tta.adapt(Decoder(), "source"), _stream(), device="cpu")
    table = accuracy_table(df)
    assert list(table.columns) == ["sev 5", "sev 2", "mean"]
    assert list(table.index) == ["a", "b", "mean"]
    assert table.loc["mean", "mean"] == pytest.approx(df.accuracy.mean())


def test_results_file_with_other_columns_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    out.write_text("method,accuracy\ntent,50.0\n")
    with pytest.raises(ConfigError, match="already holds results with other columns"):
        CsvWriter(out)
    assert out.read_text() == "method,accuracy\ntent,50.0\n"  # the earlier results are untouched


def test_results_file_with_the_same_columns_is_appended(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    for _ in range(2):
        evaluate(tta.adapt(Decoder(), "source"), _stream(), device="cpu", on_result=CsvWriter(out))
    assert len(pd.read_csv(out)) == 8


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"batch_size": 0}, "batch size must be >= 1"),
    ({"n_examples": 0}, "n_examples must be >= 1"),
    ({"domains": []}, "no domains"),
])
def test_bad_stream_parameters(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"domains": [Domain("a", 5)], **kwargs}
    with pytest.raises(ConfigError, match=message):
        Stream(ArraySource(10, {"a": 2}), **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("setting", ["per-domain", "mixed", "gradual"])
def test_per_batch_accuracy_adds_up_to_the_domain_rows(setting: str) -> None:
    from tta.data.settings import SettingStream
    from tta.run.schema import BATCH_COLUMNS

    stream = SettingStream(ArraySource(23, {"a": 2, "b": 4}), ["a", "b"], [5, 2], setting=setting, batch_size=5)
    calls: list[list[dict]] = []
    df = evaluate(tta.adapt(Decoder(), "source"), stream, device="cpu", on_batches=calls.append)
    batches = pd.DataFrame([row for call in calls for row in call])
    assert list(batches.columns) == BATCH_COLUMNS
    assert batches["batch"].tolist() == list(range(len(stream)))
    assert len(calls) == len({b.segment for b in stream})  # read back once per segment, not per batch
    assert all(len({row["segment"] for row in call}) == 1 for call in calls)
    hits = (batches["accuracy"] * batches["n"] / 100).sum()
    assert hits == pytest.approx((df["accuracy"] * df["n"] / 100).sum())
    assert batches["n"].sum() == df["n"].sum()
    if setting == "mixed":
        assert (batches["corruption"] == "mixed").any()
    else:
        per_domain = batches.assign(hits=batches["accuracy"] * batches["n"] / 100).groupby(
            ["corruption", "severity"])["hits"].sum()
        for row in df.itertuples():
            assert per_domain[(row.corruption, row.severity)] == pytest.approx(row.accuracy * row.n / 100)


def test_a_row_cut_short_by_a_kill_is_dropped_on_reopening(tmp_path: Path) -> None:
    out = tmp_path / "r.csv"
    evaluate(tta.adapt(Decoder(), "source"), _stream(), device="cpu", on_result=CsvWriter(out))
    text = out.read_text()
    out.write_text(text + text.splitlines()[1][:17])  # a kill in the middle of writing a row
    CsvWriter(out)
    assert out.read_text() == text
    assert len(pd.read_csv(out)) == 4
