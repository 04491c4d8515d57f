"""Your own data never hides its order: folder, csv and npz domains shuffled with the seed by default, a seeded
random ``n_examples`` subset, ``order="file"`` on request, and one warning line when labels follow each other."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tta.data.arrays import array_stream, npz_stream
from tta.data.images import folder_stream
from tta.data.order import THRESHOLD, order_score, same_neighbour_z, trend_z
from tta.data.sources import data_stream
from tta.errors import ConfigError


def class_folder(root: Path, classes: int = 4, per_class: int = 10) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        for k in range(per_class):
            (root / str(c)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / str(c) / f"{k}.png")
    return root


def labels(stream: object) -> list[int]:
    return [int(v) for b in stream for v in b.y]


def images(stream: object) -> list[bytes]:
    return [x.numpy().tobytes() for b in stream for x in b.x]


def test_folder_shuffled_by_default_and_bit_identical_for_one_seed(tmp_path: Path) -> None:
    root = class_folder(tmp_path / "set")
    first = folder_stream(root, batch_size=8, workers=0, seed=3)
    again = folder_stream(root, batch_size=8, workers=0, seed=3)
    other = folder_stream(root, batch_size=8, workers=0, seed=4)
    assert images(first) == images(again) and labels(first) == labels(again)
    assert labels(first) != labels(other) and sorted(labels(first)) == sorted(labels(other))
    assert labels(first) != sorted(labels(first))
    assert labels(folder_stream(root, batch_size=8, workers=0, order="file")) == sorted(labels(first))


def test_n_examples_is_a_seeded_random_subset(tmp_path: Path) -> None:
    root = class_folder(tmp_path / "set", classes=5, per_class=8)
    subsets = [set(labels(data_stream(f"folder:{root}", "cifar10c", None, n_examples=10, batch_size=5, seed=s)))
               for s in range(4)]
    assert all(len(s) >= 3 for s in subsets)  # the first two classes only, in file order
    assert set(labels(data_stream(f"folder:{root}", "cifar10c", None, n_examples=10, order="file"))) == {0, 1}


def test_npz_and_csv_shuffled_by_default(tmp_path: Path) -> None:
    y = np.repeat(np.arange(5), 12)
    x = np.random.default_rng(0).integers(0, 256, (60, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    shuffled = npz_stream(tmp_path / "d.npz", batch_size=7, seed=1)
    assert labels(shuffled) != y.tolist() and sorted(labels(shuffled)) == y.tolist()
    assert images(shuffled) == images(npz_stream(tmp_path / "d.npz", batch_size=7, seed=1))
    assert labels(npz_stream(tmp_path / "d.npz", batch_size=7, order="file")) == y.tolist()
    root = class_folder(tmp_path / "imgs", classes=3, per_class=8)
    rows = "\n".join(f"{p.relative_to(tmp_path)},{p.parent.name}" for p in sorted(root.rglob("*.png")))
    (tmp_path / "list.csv").write_text(rows + "\n")
    from_csv = folder_stream(tmp_path / "list.csv", batch_size=5, workers=0, seed=2)
    assert labels(from_csv) != sorted(labels(from_csv))


def test_correlated_order_is_reported_in_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = class_folder(tmp_path / "set", classes=4, per_class=10)
    with caplog.at_level(logging.WARNING, logger="tta.data.order"):
        folder_stream(root, batch_size=8, workers=0, order="file")
    [record] = caplog.records
    assert "order that follows their labels" in record.getMessage() and "\n" not in record.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tta.data.order"):
        folder_stream(root, batch_size=8, workers=0)  # shuffled
        folder_stream(root, batch_size=8, workers=0, order="file", setting="correlated")  # asked for
    assert not caplog.records


def test_order_score_separates_sorted_from_shuffled_streams() -> None:
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(3000):  # random label sets, balanced or not, in random order: never above the threshold
        k = int(rng.integers(2, 20))
        y = rng.choice(k, size=int(rng.integers(20, 400)), p=rng.dirichlet(np.full(k, 0.3)))
        worst = max(worst, order_score(y))
    assert worst < THRESHOLD / 1.5
    assert order_score(np.sort(np.arange(40) % 10)) > THRESHOLD  # 40 images of 10 classes, class by class
    assert order_score(np.arange(200) % 10) < THRESHOLD  # round robin: balanced batches, nothing to warn about
    drift = np.clip(np.round(np.linspace(0, 9, 300) + rng.normal(0, 2.5, 300)), 0, 9)  # slowly through the classes
    assert trend_z(drift) > THRESHOLD


def test_same_neighbour_z_has_the_null_moments() -> None:
    rng = np.random.default_rng(1)
    y = np.repeat([0, 1, 2, 3], [5, 10, 20, 40])
    z = np.array([same_neighbour_z(rng.permutation(y)) for _ in range(3000)])
    assert abs(z.mean()) < 0.08 and 0.9 < z.std() < 1.1


def test_bad_order_and_array_stream_default(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown order 'random'"):
        npz_stream(tmp_path / "x.npz", order="random")
    y = np.arange(30) % 3
    stream = array_stream(np.zeros((30, 4, 4, 3), np.uint8), y, batch_size=4)
    assert labels(stream) == y.tolist()  # in-memory arrays: the order they are passed in
    assert sorted(labels(array_stream(np.zeros((30, 4, 4, 3), np.uint8), y, order="shuffle"))) == sorted(y)


def test_the_documented_folder_order_results_show_the_collapse_that_shuffling_prevents() -> None:
    """The committed measurement behind the README's folder table (the table itself is checked by test_docs)."""
    import pandas as pd

    results = pd.read_csv(Path(__file__).resolve().parents[1] / "docs" / "results" / "folder_order.csv", comment="#")
    accuracy = results.groupby(["method", "order"]).accuracy.mean()
    assert accuracy[("tent", "file")] < 50 < accuracy[("tent", "shuffle")]
