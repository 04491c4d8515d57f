"""Your own data: image folders (one domain or a domain level), CSV lists, .npz with domains, `--data`, class
checks against the model, and the lazy `tta.*_stream` exports."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import tta
from tta.api import run_benchmark
from tta.cli import cli
from tta.data.arrays import npz_stream
from tta.data.images import csv_files, folder_files, folder_stream
from tta.errors import ConfigError, DataError
from tta.models import cifar_resnet
from tta.models.preprocess import CIFAR

METHODS = ["source", "adabn", "tent", "dsbn", "context-norm", "afn"]
pytestmark = pytest.mark.usefixtures("one_thread")


def image(path: Path, seed: int, size: tuple[int, int] = (32, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def class_folder(root: Path, classes: list[str], per_class: int = 3, size: tuple[int, int] = (32, 32)) -> Path:
    for c_i, c in enumerate(classes):
        for k in range(per_class):
            image(root / c / f"{k}.png", 100 * c_i + k, size)
    return root


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "r20.th"
    torch.save({"state_dict": cifar_resnet("resnet20").state_dict()}, path)
    return path


def test_class_folder_is_one_domain_with_sorted_class_labels(tmp_path: Path) -> None:
    root = class_folder(tmp_path / "camera", ["cat", "airplane", "dog"], per_class=2)
    files = folder_files(root)
    assert list(files) == ["camera"]
    assert Counter(label for _, label in files["camera"]) == {0: 2, 1: 2, 2: 2}  # airplane, cat, dog
    assert all(("airplane" in p) == (label == 0) for p, label in files["camera"])


def test_domain_level_and_class_name_kinds(tmp_path: Path) -> None:
    class_folder(tmp_path / "shift" / "day", ["0", "10", "2"], per_class=1)
    class_folder(tmp_path / "shift" / "night", ["2"], per_class=2)
    files = folder_files(tmp_path / "shift")
    assert list(files) == ["day", "night"]
    assert sorted(label for _, label in files["day"]) == [0, 2, 10]  # integer names are the labels themselves
    assert [label for _, label in files["night"]] == [2, 2]
    class_folder(tmp_path / "inet", ["n01443537", "n01440764"], per_class=1)
    assert sorted(label for _, label in folder_files(tmp_path / "inet")["inet"]) == [0, 1]  # ImageNet indices
    class_folder(tmp_path / "inet2", ["n15075141"], per_class=1)
    assert [label for _, label in folder_files(tmp_path / "inet2")["inet2"]] == [999]


def test_csv_with_header_names_relative_paths_and_domains(tmp_path: Path) -> None:
    for k in range(4):
        image(tmp_path / "imgs" / f"{k}.jpg", k)
    (tmp_path / "list.csv").write_text("path,label,domain\nimgs/0.jpg,dog,a\nimgs/1.jpg,cat,b\n"
                                       f"{tmp_path / 'imgs/2.jpg'},dog,a\n\nimgs/3.jpg,cat,a\n")
    files = csv_files(tmp_path / "list.csv")
    assert {d: [(Path(p).name, y) for p, y in f] for d, f in files.items()} == {
        "a": [("0.jpg", 1), ("2.jpg", 1), ("3.jpg", 0)], "b": [("1.jpg", 0)]}
    (tmp_path / "one.csv").write_text("imgs/0.jpg,3\nimgs/1.jpg,5\n")
    assert list(csv_files(tmp_path / "one.csv")) == ["one"]


@pytest.mark.parametrize(("text", "message"), [
    ("imgs/0.jpg\n", "rows path,label or path,label,domain"),
    ("imgs/missing.jpg,1\n", "lists 1 file.*that do not exist.*missing.jpg"),
    ("", "it holds none"),
])
def test_bad_csv(tmp_path: Path, text: str, message: str) -> None:
    image(tmp_path / "imgs" / "0.jpg", 0)
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        csv_files(tmp_path / "bad.csv")


def test_bad_folders(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is not a directory"):
        folder_files(tmp_path / "nope")
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="has no images in class sub-folders"):
        folder_files(tmp_path / "empty")


def test_folder_stream_resizes_mixed_sizes_in_workers(tmp_path: Path) -> None:
    root = tmp_path / "data"
    image(root / "a" / "0.png", 0, (50, 40))
    image(root / "a" / "1.png", 1, (20, 64))
    image(root / "b" / "0.png", 2, (32, 32))
    with pytest.raises(DataError, match="the images of one batch have 3 sizes"):
        list(folder_stream(root, batch_size=3, workers=0))
    for workers in (0, 2):
        [batch] = list(folder_stream(root, CIFAR, batch_size=3, workers=workers))
        assert batch.x.shape == (3, 3, 32, 32) and sorted(batch.y.tolist()) == [0, 0, 1]


def test_npz_with_a_domain_column_in_every_setting(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    y, domain = rng.integers(0, 10, 30), np.array(["b", "a", "c"] * 10)
    np.savez(tmp_path / "d.npz", x=x, y=y, domain=domain)
    for setting in ("per-domain", "continual", "mixed", "gradual"):
        stream = npz_stream(tmp_path / "d.npz", batch_size=4, setting=setting, seed=2)
        assert [d.name for d in stream.domains] == ["a", "b", "c"]
        seen = sorted((stream.domains[d].name, int(lbl)) for b in stream
                      for d, lbl in zip(b.domain.tolist(), b.y.tolist(), strict=True))
        assert seen == sorted(zip(domain.tolist(), y.tolist(), strict=True))


def test_streams_are_exported_lazily_from_tta() -> None:
    code = ("import sys, tta; assert 'tta.data.images' not in sys.modules; "
            "import numpy as np; s = tta.array_stream(np.zeros((3, 4, 4, 3), np.uint8), np.arange(3)); "
            "print(len(list(s)), tta.npz_stream.__module__, tta.folder_stream.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(tta.__file__).parents[1])
    assert out.stdout.split() == ["1", "tta.data.arrays", "tta.data.images"]


@pytest.mark.parametrize("method", METHODS)
def test_data_folder_runs_every_method(tmp_path: Path, checkpoint: Path, method: str) -> None:
    class_folder(tmp_path / "shift" / "day", ["0", "1", "2"], per_class=3, size=(40, 36))
    class_folder(tmp_path / "shift" / "night", ["0", "1"], per_class=3, size=(24, 24))
    df, out = run_benchmark(method, checkpoint=checkpoint, arch="resnet20", data=f"folder:{tmp_path / 'shift'}",
                            batch_size=4, setting="mixed", device="cpu", out=tmp_path / "r.csv")
    assert list(zip(df.corruption, df.n, strict=True)) == [("day", 9), ("night", 6)]
    assert pd.read_csv(out).severity.isna().all()  # folder domains are named, they have no severity


def test_more_classes_than_the_model_predicts(tmp_path: Path, checkpoint: Path) -> None:
    class_folder(tmp_path / "many", [f"c{k:02d}" for k in range(12)], per_class=1)
    with pytest.raises(DataError, match=r"labels up to 11 \(12 classes\) but the model predicts 10 classes"):
        run_benchmark("source", checkpoint=checkpoint, arch="resnet20", data=f"folder:{tmp_path / 'many'}",
                      device="cpu", out=tmp_path / "r.csv")


def test_cli_data_csv_and_npz(tmp_path: Path, checkpoint: Path) -> None:
    for k in range(6):
        image(tmp_path / "imgs" / f"{k}.png", k, (48, 48))
    (tmp_path / "l.csv").write_text("".join(f"imgs/{k}.png,{k % 3},{'ab'[k % 2]}\n" for k in range(6)))
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 32, 32, 3), np.uint8), y=np.arange(5))
    common = ["adapt", "--method", "tent", "--checkpoint", str(checkpoint), "--arch", "resnet20", "--no-progress",
              "--device", "cpu", "--batch-size", "4"]
    for spec, rows in ((f"csv:{tmp_path / 'l.csv'}", ["a", "b"]), (f"folder:{tmp_path / 'l.csv'}", ["a", "b"]),
                       (f"npz:{tmp_path / 'd.npz'}", ["d"])):
        out = tmp_path / f"{spec.partition(':')[0]}{len(rows)}{spec[-3:]}.csv"
        result = CliRunner().invoke(cli, [*common, "--data", spec, "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert pd.read_csv(out).corruption.tolist() == rows
    result = CliRunner().invoke(cli, [*common, "--data", "zip:x"])
    assert result.exit_code == 2 and "not one of folder:PATH, csv:PATH or npz:PATH" in result.output


def test_bad_data_spec() -> None:
    with pytest.raises(ConfigError, match="not one of folder:PATH"):
        run_benchmark("source", data="folder", out="unused.csv")
