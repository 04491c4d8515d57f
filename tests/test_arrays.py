"""In-memory streams over a user's own images (uint8 NHWC or float NCHW) and .npz files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tta
from tta.data.arrays import array_stream, npz_stream
from tta.errors import DataError


def _batches(stream: tta.Stream) -> tuple[torch.Tensor, torch.Tensor]:
    batches = [b.to(torch.device("cpu")) for b in stream]
    return torch.cat([b.x for b in batches]), torch.cat([b.y for b in batches])


def test_uint8_nhwc_and_float_nchw_give_the_same_batches() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (23, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 23)
    x8, y8 = _batches(array_stream(images, labels, batch_size=5))
    xf, yf = _batches(array_stream(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, labels, batch_size=5))
    assert x8.shape == (23, 3, 8, 8) and x8.dtype == torch.float32
    torch.testing.assert_close(x8, xf)
    assert torch.equal(y8, yf) and torch.equal(y8, torch.from_numpy(labels))


def test_one_domain_named_after_the_data(tmp_path: Path) -> None:
    path = tmp_path / "camera2.npz"
    np.savez(path, x=np.zeros((7, 4, 4, 3), np.uint8), y=np.arange(7))
    stream = npz_stream(path, batch_size=3, n_examples=5)
    assert [(d.name, d.severity) for d in stream.domains] == [("camera2", None)]
    assert [len(b.y) for b in stream] == [3, 2]


def test_bad_arrays_and_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="one label per image"):
        array_stream(np.zeros((4, 4, 4, 3), np.uint8), np.zeros(3))
    with pytest.raises(DataError, match="4 dimensions"):
        array_stream(np.zeros((4, 4, 3), np.uint8), np.zeros(4))
    path = tmp_path / "bad.npz"
    np.savez(path, images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(DataError, match="holds arrays images but needs x and y"):
        npz_stream(path)
