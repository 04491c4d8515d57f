"""Clean-set loading, the CIFAR-10-C writer (layout, atomicity, resume) and generated streams."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tta.corruptions import CHUNK, corrupt_indexed
from tta.data.cifar_c import CifarCFiles, cifar_c_stream
from tta.data.clean import load_clean
from tta.data.generated import GeneratedSource, generated_stream
from tta.data.stream import Domain, Stream
from tta.data.writer import MANIFEST, missing_blocks, to_uint8, write_corruptions
from tta.errors import ConfigError, DataError, DownloadError

pytestmark = pytest.mark.usefixtures("one_thread")


def clean_npz(path: Path, n: int = 20, size: int = 32, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), y=rng.integers(0, 10, n))
    return path


def test_load_clean_npz_and_folder(tmp_path: Path) -> None:
    x, y = load_clean(f"npz:{clean_npz(tmp_path / 'c.npz')}")
    assert x.dtype == np.uint8 and x.shape == (20, 32, 32, 3) and y.dtype == np.int64 and y.shape == (20,)
    for label, cls in enumerate(["cat", "dog"]):
        (tmp_path / "f" / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(x[2 * label + i]).save(tmp_path / "f" / cls / f"{i}.png")
    fx, fy = load_clean(f"folder:{tmp_path / 'f'}")
    assert np.array_equal(fx, x[:4]) and fy.tolist() == [0, 0, 1, 1]
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "f" / "dog" / "small.png")
    with pytest.raises(DataError, match="different sizes"):
        load_clean(f"folder:{tmp_path / 'f'}")


def test_load_clean_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="npz:PATH"):
        load_clean("imagenet")
    with pytest.raises(DataError, match="does not exist"):
        load_clean(f"npz:{tmp_path / 'missing.npz'}")
    np.savez(tmp_path / "bad.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="expected x and y"):
        load_clean(f"npz:{tmp_path / 'bad.npz'}")
    np.savez(tmp_path / "float.npz", x=np.zeros((2, 4, 4, 3)), y=np.zeros(2, int))
    with pytest.raises(DataError, match="uint8"):
        load_clean(f"npz:{tmp_path / 'float.npz'}")
    np.savez(tmp_path / "short.npz", x=np.zeros((2, 4, 4, 3), np.uint8), y=np.zeros(3, int))
    with pytest.raises(DataError, match="one integer label per image"):
        load_clean(f"npz:{tmp_path / 'short.npz'}")
    (tmp_path / "flat").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(DataError, match="no class sub-folders"):
        load_clean(f"folder:{tmp_path / 'flat'}")

    import torchvision.datasets

    class Offline:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            raise RuntimeError("Dataset not found") if not download else OSError("Network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    with pytest.raises(DownloadError, match=r"cifar-10-python.tar.gz and extract it into .*cifar-10-batches-py"):
        load_clean("cifar10", tmp_path)


def test_writer_layout_is_read_by_our_loader_and_robustbench(tmp_path: Path) -> None:
    x, y = load_clean(f"npz:{clean_npz(tmp_path / 'c.npz')}")
    root = write_corruptions(x, y, tmp_path / "data", ["fog", "jpeg_compression"], seed=3, progress=False)
    assert root == tmp_path / "data" / "CIFAR-10-C"
    assert sorted(p.name for p in root.iterdir()) == ["fog.npy", "jpeg_compression.npy", "labels.npy", MANIFEST]
    labels = np.load(root / "labels.npy")
    assert labels.dtype == np.uint8 and np.array_equal(labels, np.tile(y, 5))
    fog = np.load(root / "fog.npy")
    assert fog.dtype == np.uint8 and fog.shape == (100, 32, 32, 3)
    clean = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    for s in range(1, 6):  # block s - 1 holds severity s, stored by truncation
        expected = to_uint8(corrupt_indexed(clean, 0, "fog", s, seed=3)).permute(0, 2, 3, 1).numpy()
        assert np.array_equal(fog[20 * (s - 1):20 * s], expected)

    files = CifarCFiles(root)
    fx, fy = files.load(Domain("fog", 4), np.arange(20))
    assert torch.equal(fx, torch.from_numpy(fog[60:80]).permute(0, 3, 1, 2)) and torch.equal(fy, torch.from_numpy(y))

    from tta.compat import import_robustbench

    import_robustbench()
    from robustbench.data import load_cifar10c

    # robustbench assumes 10,000 images per severity, so on a 20-image set it can read severity 1 only
    rx, ry = load_cifar10c(20, severity=1, data_dir=str(tmp_path / "data"), corruptions=["jpeg_compression"])
    jpeg = np.load(root / "jpeg_compression.npy")
    assert torch.equal(rx, torch.from_numpy(jpeg[:20]).permute(0, 3, 1, 2).float() / 255)
    assert torch.equal(ry.long(), torch.from_numpy(y))


def test_writer_resumes_and_never_leaves_a_complete_looking_partial_file(tmp_path: Path) -> None:
    x, y = load_clean(f"npz:{clean_npz(tmp_path / 'c.npz')}")
    out = tmp_path / "data"
    # a run that generates some severities only: blocks are kept aside, no fog.npy yet
    root = write_corruptions(x, y, out, ["fog"], severities=[5, 2], progress=False)
    assert not (root / "fog.npy").exists()
    assert missing_blocks(root, ["fog"]) == {"fog": [1, 3, 4]}
    # a killed run leaves a temporary file behind; it has no final name and is cleaned up
    (root / ".fog.npy.tmp-999").write_bytes(b"\x93NUMPY half")
    # mark a finished block, to see that the restart reuses it instead of generating it again
    marked = np.full_like(np.load(root / ".parts" / "fog.s5.npy"), 7)
    np.save(root / ".parts" / "fog.s5.npy", marked)
    write_corruptions(x, y, out, ["fog", "snow"], progress=False)
    assert (root / "fog.npy").exists() and (root / "snow.npy").exists()
    assert not list(root.glob(".*tmp*")) and not (root / ".parts").exists()
    full = np.load(root / "fog.npy")
    assert np.array_equal(full[80:], marked), "the finished severity-5 block was reused"
    fresh = np.load(write_corruptions(x, y, tmp_path / "fresh", ["fog"], progress=False) / "fog.npy")
    assert np.array_equal(full[:80], fresh[:80]), "resumed and uninterrupted runs write the same bytes"
    # a finished file is not rewritten
    mtime = (root / "fog.npy").stat().st_mtime_ns
    write_corruptions(x, y, out, ["fog"], progress=False)
    assert (root / "fog.npy").stat().st_mtime_ns == mtime
    # other settings in the same directory are refused rather than mixed
    with pytest.raises(ConfigError, match="other settings"):
        write_corruptions(x, y, out, ["fog"], seed=1, progress=False)
    assert json.loads((root / MANIFEST).read_text())["seed"] == 0


def test_writer_rejects_bad_selections(tmp_path: Path) -> None:
    x, y = load_clean(f"npz:{clean_npz(tmp_path / 'c.npz', n=4)}")
    with pytest.raises(ConfigError, match="valid names"):
        write_corruptions(x, y, tmp_path, ["rain"], progress=False)
    with pytest.raises(ConfigError, match="1 to 5"):
        write_corruptions(x, y, tmp_path, ["fog"], severities=[0], progress=False)
    assert not (tmp_path / "CIFAR-10-C").exists()


def test_generated_stream_equals_the_file_stream(tmp_path: Path) -> None:
    npz = clean_npz(tmp_path / "c.npz", n=CHUNK + 17, size=16)
    x, y = load_clean(f"npz:{npz}")
    write_corruptions(x, y, tmp_path / "data", ["shot_noise", "elastic_transform"], seed=5, progress=False)
    kwargs = {"corruptions": ["shot_noise", "elastic_transform"], "severities": [5, 1], "batch_size": 64,
              "n_examples": CHUNK + 10}
    files = cifar_c_stream(data_dir=tmp_path / "data", download=False, **kwargs)
    gen = generated_stream(source=f"npz:{npz}", seed=5, **kwargs)
    assert files.label == "tta-corrupt:5" and gen.label == "generated:5"
    assert files.domains == gen.domains and len(files) == len(gen)
    for a, b in zip(files, gen, strict=True):
        assert a.x.dtype == b.x.dtype == torch.uint8
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.domain, b.domain)
        assert a.segment == b.segment


def test_generated_source_does_not_depend_on_batch_size(tmp_path: Path) -> None:
    x, y = load_clean(f"npz:{clean_npz(tmp_path / 'c.npz', n=CHUNK + 40, size=8)}")
    source = GeneratedSource(x, y, seed=2)
    batches = [torch.cat([b.x for b in Stream(source, [Domain("fog", 3)], batch_size=bs)]) for bs in (7, 100, 400)]
    assert torch.equal(batches[0], batches[1]) and torch.equal(batches[0], batches[2])
    assert not torch.equal(batches[0], torch.cat([b.x for b in Stream(GeneratedSource(x, y, seed=3),
                                                                      [Domain("fog", 3)])]))


def test_temporary_names_never_look_like_dataset_files(tmp_path: Path) -> None:
    # the loader looks for <name>.npy; a temporary file is hidden and has another suffix
    from tta.io import save_array

    save_array(tmp_path / "fog.npy", np.zeros(3, np.uint8))
    assert os.listdir(tmp_path) == ["fog.npy"]
