"""Atomic file writes, in one place: readers see the old file or the new one, never half of one.

Every write goes to a temporary file in the destination's folder (``.<name>.<random>.tmp``, with the mode a plain
``open()`` would give), is flushed to disk, then renamed over the destination with ``os.replace``; on any error the
temporary file is removed and the destination is left as it was. ``STALE_GLOB`` matches temporary files that a
killed process left behind, for the code that cleans them up.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from tta.errors import ConfigError

STALE_GLOB = ".*.tmp*"  # what a killed writer leaves in the folder (``.<name>.tmp-<pid>`` before this module)


@contextmanager
def atomic_file(path: str | Path, mode: str = "wb", newline: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file for writing (``mode`` ``"wb"`` or ``"w"``) that replaces ``path`` when the block ends
    without an error; the folder is created if needed."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file writes in mode 'wb' or 'w', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it the mode a plain open() would
        with os.fdopen(fd, mode, newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (no newline translation); returns the path."""
    with atomic_file(path, "w", newline="") as f:
        f.write(text)
    return Path(path)


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def save_array(path: str | Path, array: np.ndarray) -> Path:
    """Save ``array`` as an ``.npy`` file at ``path`` atomically (no pickled objects); returns the path."""
    with atomic_file(path) as f:
        np.save(f, array, allow_pickle=False)
    return Path(path)


def save_torch(obj: object, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically; returns the path."""
    import torch  # here: importing tta.io must stay cheap

    with atomic_file(path) as f:
        torch.save(obj, f)
    return Path(path)


def check_writable(path: str | Path, option: str = "--out") -> Path:
    """``ConfigError`` unless a file can be written at ``path`` (its folder is created); call before long work.
    ``option`` names the setting the path came from, for the message."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {str(path)!r} is a folder; pass a file name such as {path / 'warm.pt'}")
    probe = path.with_name(f".{path.name}.probe{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write {option} {str(path)!r} ({err.strerror or type(err).__name__}); pick a path "
                          "in a folder you can write to") from None
    return path


__all__ = ["STALE_GLOB", "atomic_file", "check_writable", "save_array", "save_torch", "write_bytes", "write_text"]
