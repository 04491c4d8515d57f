"""The offline first run: scikit-learn's digits, the demo CNN trained at first use and cached, corrupted by our
generator and adapted, with the per-severity table and CSV."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from tta.cli import cli
from tta.data.cifar_c import BENCHMARK_CORRUPTIONS
from tta.data.digits import digits_stream, load_digits_split
from tta.models import digits as digits_model
from tta.models import load_model

pytest.importorskip("sklearn")


@pytest.fixture
def quick_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    """One epoch instead of fifteen: the tests check caching and wiring, not accuracy."""
    monkeypatch.setitem(digits_model.RECIPE, "epochs", 1)


def test_split_is_class_balanced_disjoint_and_upscaled() -> None:
    x_train, _ = load_digits_split(train=True)
    x_test, y_test = load_digits_split(train=False)
    assert x_train.shape == (1297, 32, 32, 3) and x_test.shape == (500, 32, 32, 3) and x_test.dtype == np.uint8
    assert np.bincount(y_test).tolist() == [50] * 10
    assert np.array_equal(x_test[..., 0], x_test[..., 2])  # grey in three channels
    train_rows = {row.tobytes() for row in x_train}
    assert sum(row.tobytes() in train_rows for row in x_test) <= 5  # only the few duplicate digits of the set
    assert np.array_equal(load_digits_split(train=False)[0], x_test)  # seeded


def test_model_is_trained_once_then_cached(tmp_path: Path, quick_recipe: None, monkeypatch: pytest.MonkeyPatch,
                                           one_thread: None) -> None:
    model = load_model("digits-cnn", dataset="digits", data_dir=tmp_path)
    cache = tmp_path / "models" / "digits" / "digits-cnn.pt"
    assert cache.is_file() and not cache.with_name("digits-cnn.pt.tmp").exists()
    monkeypatch.setattr(digits_model, "train_digits_cnn", lambda *a: pytest.fail("must load from the cache"))
    again = load_model("digits-cnn", dataset="digits", data_dir=tmp_path)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), again(x))


def test_corrupt_cache_or_changed_recipe_retrains(tmp_path: Path, quick_recipe: None,
                                                  monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    cache = tmp_path / "models" / "digits" / "digits-cnn.pt"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"truncated")
    trained = []
    real = digits_model.train_digits_cnn
    monkeypatch.setattr(digits_model, "train_digits_cnn", lambda *a: trained.append(1) or real(*a))
    digits_model.load_digits_cnn(tmp_path)
    monkeypatch.setitem(digits_model.RECIPE, "lr", 5e-3)
    digits_model.load_digits_cnn(tmp_path)
    assert trained == [1, 1]


def test_stream_runs_on_one_thread_and_restores_it() -> None:
    threads = torch.get_num_threads()
    stream = digits_stream(["fog"], [5], n_examples=20, batch_size=10)
    seen = [torch.get_num_threads() for _ in stream]
    assert seen == [1, 1] and torch.get_num_threads() == threads


def test_first_run_end_to_end(tmp_path: Path, quick_recipe: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["adapt", "--method", "tent", "--corruption", "digits", "--no-progress",
                                      "--corruptions", "fog,contrast", "--severities", "5,1", "--n-examples", "100"])
    assert result.exit_code == 0, result.output
    assert "tent on digits-cnn: accuracy (%)" in result.output and "sev 5" in result.output
    [csv] = (tmp_path / "results").glob("tent_digits-cnn_*.csv")
    df = pd.read_csv(csv)
    assert len(df) == 4 and set(df.n) == {100} and set(df.data) == {"generated:0"}
    assert set(BENCHMARK_CORRUPTIONS) >= set(df.corruption)
