"""Clean source data as a first-class input, and what methods derive from it, cached by model fingerprint.

Methods that need clean images from the training distribution (EATA's Fisher information from 2,000 images,
a guard's accuracy calibration) declare ``requires.source_data``; the user passes ``source_data=`` to
``tta.adapt`` (``--source-data`` on the command line) as a spec (``cifar10``/``cifar100``: the training split,
``npz:PATH``, ``folder:PATH``), a ``SourceData``, or an ``(images, labels)`` pair. Derived values (a Fisher
matrix) are computed once per (model weights, source data, settings) and cached in memory and on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from tta.errors import ConfigError, DataError
from tta.io import save_torch

T = TypeVar("T")


@dataclass(eq=False)
class SourceData:
    """Clean labelled images of the source distribution, loaded on first use.

    ``spec``: ``cifar10``/``cifar100`` (the training split, downloaded into ``data_dir`` when online),
    ``npz:PATH`` (arrays ``x`` uint8 (N, H, W, C) and ``y``) or ``folder:PATH`` (one sub-folder per class).
    """

    spec: str
    data_dir: Path = Path("data")
    download: bool = True
    _arrays: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    @classmethod
    def from_arrays(cls, images: Any, labels: Any, name: str = "arrays") -> SourceData:
        """Source data from in-memory images (uint8 NHWC, or float NCHW in [0, 1]) and integer labels."""
        x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if x.ndim != 4 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
            raise ConfigError(f"source images must be (N, H, W, C) or (N, C, H, W) with N labels, got shapes "
                              f"{x.shape} and {y.shape}")
        if x.dtype != np.uint8:
            if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
                raise ConfigError("float source images must be finite and in [0, 1] (N, C, H, W); "
                                  "or pass uint8 (N, H, W, C)")
            x = np.ascontiguousarray((np.transpose(x, (0, 2, 3, 1)) * 255).round().astype(np.uint8))
        if not np.issubdtype(y.dtype, np.integer):
            raise ConfigError(f"source labels must be integers, got dtype {y.dtype}")
        return cls(spec=name, _arrays=(x, y.astype(np.int64)))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """All images (uint8 (N, H, W, C)) and int64 labels."""
        if self._arrays is None:
            from tta.data.clean import load_clean

            self._arrays = load_clean(self.spec, self.data_dir, download=self.download, train=True)
        return self._arrays

    def sample(self, n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` images (all when ``None`` or more than there are), drawn without replacement with ``seed``, as
        float (n, C, H, W) in [0, 1] and int64 labels."""
        x, y = self.arrays()
        index = np.arange(len(x))
        if n is not None and n < len(x):
            index = np.sort(np.random.default_rng(seed).choice(len(x), size=n, replace=False))
        images = torch.from_numpy(np.ascontiguousarray(x[index])).permute(0, 3, 1, 2).float().div_(255)
        return images, torch.from_numpy(y[index].astype(np.int64))

    def fingerprint(self) -> str:
        """A hash of the images and labels (identifies the data, wherever it was read from)."""
        x, y = self.arrays()
        digest = hashlib.sha256()
        digest.update(f"{x.shape}|{x.dtype}|".encode())
        digest.update(np.ascontiguousarray(x).tobytes())
        digest.update(np.ascontiguousarray(y).tobytes())
        return digest.hexdigest()


def as_source_data(value: SourceData | str | tuple[Any, Any] | None) -> SourceData | None:
    """Normalise what users pass as ``source_data``."""
    if value is None or isinstance(value, SourceData):
        return value
    if isinstance(value, str):
        from tta.data.clean import check_spec

        check_spec(value)
        return SourceData(value)
    if isinstance(value, tuple) and len(value) == 2:
        return SourceData.from_arrays(*value)
    raise ConfigError(f"source_data must be a spec such as 'cifar10' or 'npz:PATH', a SourceData or an "
                      f"(images, labels) pair, got {type(value).__name__}")


def cache_dir() -> Path:
    """Where derived values are cached: ``$TTA_CACHE`` or ``~/.cache/tta``."""
    return Path(os.environ.get("TTA_CACHE") or Path.home() / ".cache" / "tta")


_MEMORY: dict[str, Any] = {}


def derived(name: str, model_fingerprint: str, source: SourceData, settings: str,
            compute: Callable[[], T]) -> T:
    """``compute()``, or the value cached for (name, model weights, source data, settings).

    Values are kept in memory for the process and written to ``cache_dir()/derived`` (``torch.save``; written to a
    temporary name and renamed, so a killed process never leaves a partial file); an unreadable cache file is
    recomputed.
    """
    key = hashlib.sha256(f"{name}|{model_fingerprint}|{source.fingerprint()}|{settings}".encode()).hexdigest()[:32]
    if key in _MEMORY:
        return _MEMORY[key]
    path = cache_dir() / "derived" / f"{name}-{key}.pt"
    value: Any = None
    if path.is_file():
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache entry is recomputed, never trusted
            value = None
    if value is None:
        value = compute()
        with contextlib.suppress(OSError):  # a read-only cache only costs the recomputation next time
            save_torch(value, path)
    _MEMORY[key] = value
    return value


__all__ = ["DataError", "SourceData", "as_source_data", "cache_dir", "derived"]
