"""CIFAR-10-C files in the published layout: loading, selection and bad files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import tta
from tta.data import cifar_c
from tta.data.cifar_c import CifarCFiles, cifar_c_stream
from tta.errors import ConfigError, DataError, DownloadError


def test_one_corruption_loads_as_float_images_and_test_labels(fake_cifar_c: Callable[..., Path]) -> None:
    data_dir = fake_cifar_c(("fog",), per_severity=30)
    raw = np.load(data_dir / "CIFAR-10-C" / "fog.npy")
    labels = np.load(data_dir / "CIFAR-10-C" / "labels.npy")
    stream = cifar_c_stream("cifar10c", data_dir, ["fog"], [3], batch_size=30)
    [batch] = list(stream)
    x = batch.to(torch.device("cpu")).x
    assert x.dtype == torch.float32 and x.shape == (30, 3, 32, 32)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert batch.y.dtype == torch.int64
    assert torch.equal(batch.y, torch.from_numpy(labels[:30].astype(np.int64)))  # test order, labels x5
    expected = torch.from_numpy(raw[60:90]).permute(0, 3, 1, 2).float() / 255  # severity 3 block
    torch.testing.assert_close(x, expected)


def test_stream_order_and_n_examples(fake_cifar_c: Callable[..., Path]) -> None:
    data_dir = fake_cifar_c(("gaussian_noise", "fog"), per_severity=25)
    stream = cifar_c_stream("cifar10c", data_dir, ["gaussian_noise", "fog"], [5, 1], n_examples=15, batch_size=10)
    assert [(d.corruption, d.severity) for d in stream.domains] == [
        ("gaussian_noise", 5), ("fog", 5), ("gaussian_noise", 1), ("fog", 1)]
    sizes = [(int(b.domain[0]), b.segment, len(b.y)) for b in stream]
    assert sizes == [(0, 0, 10), (0, 0, 5), (1, 1, 10), (1, 1, 5), (2, 2, 10), (2, 2, 5), (3, 3, 10), (3, 3, 5)]
    assert len(stream) == 8


def test_files_are_memory_mapped(fake_cifar_c: Callable[..., Path]) -> None:
    source = CifarCFiles(fake_cifar_c(("fog",)) / "CIFAR-10-C")
    assert isinstance(source.array("fog"), np.memmap)


@pytest.mark.parametrize(("corruptions", "severities", "message"), [
    (["fgo"], [5], "unknown corruption.*'fgo'.*gaussian_noise"),
    (["fog"], [0], "severities must be integers from 1 to 5, got 0"),
    (["fog"], [6], "from 1 to 5, got 6"),
])
def test_bad_selection(fake_cifar_c: Callable[..., Path], corruptions: list[str], severities: list[int],
                       message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cifar_c_stream("cifar10c", fake_cifar_c(("fog",)), corruptions, severities)


def test_unknown_benchmark(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown corruption benchmark 'cifar11c'"):
        cifar_c_stream("cifar11c", tmp_path, ["fog"], [5])


def test_missing_files_offline_say_what_to_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def offline(dataset: str, data_dir: Path) -> None:
        calls.append(dataset)
        raise ConnectionError("Failed to resolve 'zenodo.org'")

    monkeypatch.setattr(cifar_c, "download_cifar_c", offline)
    with pytest.raises(DownloadError) as info:
        cifar_c_stream("cifar10c", tmp_path / "data", ["fog"], [5])
    message = str(info.value)
    assert calls == ["cifar10c"]
    for part in ("labels.npy, fog.npy", "ConnectionError", "CIFAR-10-C.tar", "zenodo.org/records/2535967",
                 str(tmp_path / "data")):
        assert part in message


def test_no_download_flag_does_not_touch_the_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cifar_c, "download_cifar_c", lambda *a: pytest.fail("must not download"))
    with pytest.raises(DownloadError, match="downloading is switched off"):
        cifar_c_stream("cifar100c", tmp_path, ["fog"], [5], download=False)


def test_truncated_file_is_a_clear_error(fake_cifar_c: Callable[..., Path]) -> None:
    path = fake_cifar_c(("fog",)) / "CIFAR-10-C" / "fog.npy"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"fog.npy is corrupt or truncated.*delete"):
        cifar_c_stream("cifar10c", path.parents[1], ["fog"], [5])


def test_garbage_file_is_a_clear_error(fake_cifar_c: Callable[..., Path]) -> None:
    path = fake_cifar_c(("fog",)) / "CIFAR-10-C" / "fog.npy"
    path.write_bytes(b"not a numpy file at all")
    with pytest.raises(DataError, match="corrupt or truncated"):
        cifar_c_stream("cifar10c", path.parents[1], ["fog"], [5])


def test_mismatched_shapes_are_a_clear_error(fake_cifar_c: Callable[..., Path]) -> None:
    root = fake_cifar_c(("fog",)) / "CIFAR-10-C"
    np.save(root / "fog.npy", np.zeros((7, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match=r"labels\.npy has 100 rows"):
        cifar_c_stream("cifar10c", root.parent, ["fog"], [5])
    np.save(root / "fog.npy", np.zeros((100, 32, 32, 3), np.float32))
    with pytest.raises(DataError, match="expected uint8"):
        cifar_c_stream("cifar10c", root.parent, ["fog"], [5])


def test_public_stream_constructor_is_exported() -> None:
    assert tta.cifar_c_stream is cifar_c_stream
