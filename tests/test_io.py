"""Atomic writes (tta.io): the destination holds the old or the new content, never a partial file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tta.io import STALE_GLOB, atomic_file, save_array, save_torch, write_bytes, write_text


def test_writes_round_trip_and_leave_no_temporary_file(tmp_path):
    write_text(tmp_path / "a" / "t.csv", "x,y\r\n1,2\n")
    assert (tmp_path / "a" / "t.csv").read_bytes() == b"x,y\r\n1,2\n"  # no newline translation
    write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    save_array(tmp_path / "c.npy", np.arange(5, dtype=np.uint8))
    assert np.load(tmp_path / "c.npy").tolist() == [0, 1, 2, 3, 4]
    save_torch({"w": torch.ones(2)}, tmp_path / "d.pt")
    assert torch.load(tmp_path / "d.pt", weights_only=True)["w"].tolist() == [1.0, 1.0]
    assert not list(tmp_path.rglob(STALE_GLOB))


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "keep.txt"
    write_text(path, "old")
    with pytest.raises(RuntimeError), atomic_file(path, "w") as f:
        f.write("half of the new")
        raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert not list(tmp_path.glob(STALE_GLOB))


def test_array_with_objects_is_refused_and_nothing_written(tmp_path):
    with pytest.raises(ValueError):
        save_array(tmp_path / "o.npy", np.array([object()]))
    assert not list(tmp_path.iterdir())


def test_written_file_gets_the_mode_of_a_plain_open(tmp_path):
    write_text(tmp_path / "m.txt", "x")
    (tmp_path / "plain.txt").write_text("x")
    assert (tmp_path / "m.txt").stat().st_mode == (tmp_path / "plain.txt").stat().st_mode
