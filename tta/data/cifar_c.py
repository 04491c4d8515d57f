"""CIFAR-10-C and CIFAR-100-C in their published layout.

``<data_dir>/CIFAR-10-C/<corruption>.npy`` holds uint8 (50000, 32, 32, 3) NHWC images, severities 1..5 in blocks
of 10,000 in test order; ``labels.npy`` holds the labels repeated five times. Files are memory-mapped and read one
batch at a time, so memory stays flat however many corruptions run. Missing files are downloaded from Zenodo when
the machine is online (``tta.data.download``: md5-checked, resumable); offline, a ``DownloadError`` says what to fetch.
The published files hold 10,000 images per severity; the loader accepts any count divisible into 5 blocks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tta.corruptions.names import (  # noqa: F401  (re-exported: the benchmark's names)
    ALL_CORRUPTIONS,
    BENCHMARK_CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    SEVERITIES,
    check_selection,
)
from tta.data.settings import SettingStream, check_setting
from tta.data.stream import Domain, Stream
from tta.errors import ConfigError, DataError, DownloadError

# name -> (directory, Zenodo record, archive, number of classes)
DATASETS: dict[str, tuple[str, str, str, int]] = {
    "cifar10c": ("CIFAR-10-C", "2535967", "CIFAR-10-C.tar", 10),
    "cifar100c": ("CIFAR-100-C", "3555552", "CIFAR-100-C.tar", 100),
}


def dataset_info(name: str) -> tuple[str, str, str, int]:
    """``(directory, zenodo_record, archive, num_classes)`` of a corruption benchmark, or a ``ConfigError``."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ConfigError(f"unknown corruption benchmark {name!r}; choose one of: {', '.join(DATASETS)}") from None


def _open_npy(path: Path, ndim: int) -> np.ndarray:
    """Memory-map a uint8 .npy of ``ndim`` dimensions, turning numpy's errors into a fix-it ``DataError``."""
    fix = f"delete {path} and download it again (or regenerate it with `tta corrupt`)"
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataError(f"{path} is corrupt or truncated ({err}); {fix}") from None
    if arr.dtype != np.uint8 or arr.ndim != ndim:
        raise DataError(f"{path} holds {arr.dtype} of shape {arr.shape}, expected uint8 with {ndim} dimensions; {fix}")
    return arr


class CifarCFiles:
    """Reads CIFAR-10-C / CIFAR-100-C files of ``root`` (a ``DomainSource``).

    The published files hold 10,000 images per severity; files written by ``tta corrupt`` from a smaller clean
    set hold ``len(labels.npy) / 5``. Every corruption file must match the labels file. ``label`` says where the
    files came from: ``files`` (the published ones), or ``tta-corrupt:<seed>`` when ``tta corrupt`` wrote them
    (its manifest lies beside them), so results on the two are never confused.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._labels: np.ndarray | None = None
        self._arrays: dict[str, np.ndarray] = {}
        self.label = "files"
        manifest = self.root / "tta-corrupt.json"
        if manifest.is_file():
            try:
                seed = json.loads(manifest.read_text()).get("seed")
            except (OSError, ValueError, AttributeError):
                seed = "?"
            self.label = f"tta-corrupt:{seed}"

    def labels(self) -> np.ndarray:
        """The labels of all five severities (memory-mapped)."""
        if self._labels is None:
            labels = _open_npy(self.root / "labels.npy", 1)
            if len(labels) == 0 or len(labels) % 5:
                raise DataError(f"{self.root / 'labels.npy'} holds {len(labels)} labels, not 5 equal severity "
                                "blocks; download it again (or regenerate the set with `tta corrupt`)")
            self._labels = labels
        return self._labels

    @property
    def per_severity(self) -> int:
        """Images per severity block."""
        return len(self.labels()) // 5

    def array(self, corruption: str) -> np.ndarray:
        """The memory-mapped images of one corruption, all severities."""
        if corruption not in self._arrays:
            path = self.root / f"{corruption}.npy"
            arr = _open_npy(path, 4)
            if arr.shape[0] != len(self.labels()) or arr.shape[3] != 3:
                raise DataError(f"{path} has shape {arr.shape} but labels.npy has {len(self.labels())} rows; "
                                f"expected ({len(self.labels())}, H, W, 3): delete it and download or regenerate it")
            self._arrays[corruption] = arr
        return self._arrays[corruption]

    def size(self, domain: Domain) -> int:
        return self.per_severity

    def labels_of(self, domain: Domain) -> np.ndarray:
        """Every label of ``domain``, without reading images."""
        offset = (domain.severity - 1) * self.per_severity
        return np.asarray(self.labels()[offset:offset + self.per_severity], dtype=np.int64)

    def load(self, domain: Domain, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        offset = (domain.severity - 1) * self.per_severity
        rows = slice(offset + int(index[0]), offset + int(index[-1]) + 1)
        if len(index) == rows.stop - rows.start:  # contiguous: one slice of the memory map
            x, y = self.array(domain.corruption)[rows], self.labels()[rows]
        else:
            x, y = self.array(domain.corruption)[offset + index], self.labels()[offset + index]
        x = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)  # copy out of the read-only memory map
        return x, torch.from_numpy(y.astype(np.int64))


def download_cifar_c(dataset: str, data_dir: str | Path) -> None:
    """Download ``dataset``'s archive (e.g. ``CIFAR-10-C.tar``) from Zenodo, verify its md5 and extract it."""
    from tta.data.download import fetch_and_extract

    _, _, archive, _ = dataset_info(dataset)
    fetch_and_extract(archive, data_dir)


def ensure_files(dataset: str, data_dir: str | Path, corruptions: Sequence[str], download: bool = True) -> Path:
    """The dataset directory, downloading it when files are missing; offline, a ``DownloadError`` naming them."""
    directory, record, archive, _ = dataset_info(dataset)
    root = Path(data_dir) / directory
    needed = ["labels.npy", *(f"{c}.npy" for c in corruptions)]
    missing = [name for name in needed if not (root / name).is_file()]
    if missing and download:
        try:
            download_cifar_c(dataset, data_dir)
        except OSError as err:  # our DownloadError (a DataError) or a network error: report them all the same
            reason = f"{type(err).__name__}: {err}"
        else:
            reason = "the downloaded archive does not contain them"
        missing = [name for name in needed if not (root / name).is_file()]
    else:
        reason = "downloading is switched off"
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DownloadError(
            f"{dataset} files are missing from {root}: {shown}. Could not download them ({reason}). Fetch {archive} "
            f"from https://zenodo.org/records/{record} and extract it into {Path(data_dir)} so that {root}/labels.npy "
            "exists, or generate the corruptions locally with `tta corrupt`."
        )
    return root


def cifar_c_stream(
    dataset: str = "cifar10c",
    data_dir: str | Path = "data",
    corruptions: Sequence[str] = BENCHMARK_CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    n_examples: int | None = None,
    batch_size: int = 200,
    download: bool = True,
    setting: str = "per-domain",
    seed: int = 0,
    dirichlet: float = 0.0,
) -> Stream:
    """A stream over CIFAR-10-C/100-C files ordered as ``setting`` (see ``tta.data.settings``).

    The default ``per-domain`` setting is the Tent protocol's order: severities in the given order (5 first), the
    corruptions in the standard order within each; each domain yields its first ``n_examples`` images (all 10,000 by
    default) in test order. The other settings reorder the same images; ``seed`` shuffles ``mixed`` and draws the
    ``correlated`` orders (``dirichlet``: their concentration, 0 = sorted by label).
    """
    check_setting(setting)
    check_selection(corruptions, severities)
    root = ensure_files(dataset, data_dir, corruptions, download)
    source = CifarCFiles(root)
    source.labels()
    for c in corruptions:  # fail on a corrupt file now, not hours into the run
        source.array(c)
    return SettingStream(source, corruptions, severities, setting=setting, n_examples=n_examples,
                         batch_size=batch_size, seed=seed, dirichlet=dirichlet)
