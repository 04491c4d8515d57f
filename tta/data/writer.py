"""Write corrupted copies of a clean set in the published CIFAR-10-C layout (what ``tta corrupt`` calls).

``<out>/<directory>/<corruption>.npy`` holds uint8 (5 N, H, W, 3) NHWC images, severities 1..5 in blocks of N in
the clean set's order, stored as ``uint8(clip(x, 0, 1) * 255)`` by truncation; ``labels.npy`` holds the labels five
times (uint8 when they fit, as published). Our loader reads any N; robustbench's ``load_cifar10c`` assumes
N = 10,000 and so reads severity 1 only on smaller sets.

Every severity block is written to ``<directory>/.parts/<corruption>.s<k>.npy`` first, through a temporary file
renamed into place once complete, and a corruption's ``.npy`` is assembled (again through a temporary file) when
all five blocks exist. So a killed run never leaves a half-written ``.npy`` under a final name, and a restart
redoes at most the blocks that were in flight. ``severities`` selects which blocks this run generates: a
corruption file appears once all five blocks exist, which lets one split the work across runs or machines.
``tta-corrupt.json`` records the settings and the SHA-256 of every ``.npy`` this run wrote; resuming with different
settings is refused, and so is a folder holding ``.npy`` files (``labels.npy`` above all) that tta corrupt did not
write or that changed since, so its labels never describe images of another origin.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tta.corruptions import CHUNK, corrupt_indexed
from tta.corruptions.names import check_selection
from tta.data.download import file_checksum
from tta.errors import ConfigError, DataError
from tta.io import STALE_GLOB, save_array, write_text

MANIFEST = "tta-corrupt.json"


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] to uint8 by truncation, as the published files were stored."""
    return (x.clamp(0, 1) * 255).to(torch.uint8)


def _complete(path: Path, shape: tuple[int, ...], dtype: type = np.uint8) -> bool:
    """Whether ``path`` is a readable .npy of ``shape`` and ``dtype`` (a finished file from an earlier run)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError):
        return False
    return arr.dtype == dtype and arr.shape == shape


def _read_manifest(root: Path) -> dict | None:
    try:
        old = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) else {}


def _write_manifest(root: Path, manifest: dict) -> None:
    write_text(root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))


def _check_manifest(root: Path, settings: dict) -> dict[str, str]:
    """Check ``root`` against the settings of the run that started it; returns the checksums of the ``.npy`` files
    tta corrupt wrote there. A ``.npy`` it did not write (or that changed since) is a ``ConfigError``: its labels
    would be mixed with files of another origin."""
    old = _read_manifest(root) if (root / MANIFEST).is_file() else None
    present = sorted(p.name for p in root.glob("*.npy")) if root.is_dir() else []
    if old is None and present:
        raise ConfigError(f"{root} already holds {', '.join(present[:3])} that tta corrupt did not write; choose "
                          "another --out directory (those files are left untouched)")
    if old is None:
        root.mkdir(parents=True, exist_ok=True)
        _write_manifest(root, {**settings, "files": {}})
        return {}
    if {k: v for k, v in old.items() if k != "files"} != settings:
        changed = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v)
        raise ConfigError(f"{root} already holds corruptions generated with other settings ({changed}); "
                          f"choose another --out directory or delete {root} to start over")
    if not isinstance(old.get("files"), dict):  # started by a tta that kept no checksums: its files are adopted
        written = {name: file_checksum(root / name, "sha256") for name in present}
        _write_manifest(root, {**old, "files": written})
        return written
    written: dict[str, str] = old["files"]
    foreign = [name for name in present if written.get(name) != file_checksum(root / name, "sha256")]
    if foreign:
        raise ConfigError(f"{root} holds {', '.join(foreign[:3])} that this tta corrupt run did not write or that "
                          f"changed since; delete them (they are regenerated) or choose another --out directory")
    return written


def _save_final(root: Path, name: str, array: np.ndarray, written: dict[str, str]) -> None:
    """Save a dataset file and record its checksum in the manifest."""
    save_array(root / name, array)
    written[name] = file_checksum(root / name, "sha256")
    manifest = _read_manifest(root) or {}
    _write_manifest(root, {**manifest, "files": written})


def write_corruptions(
    images: np.ndarray,
    labels: np.ndarray,
    out_dir: str | Path,
    corruptions: Sequence[str],
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    seed: int = 0,
    device: str | torch.device = "cpu",
    directory: str = "CIFAR-10-C",
    frost_images: str | Path | None = None,
    source: str = "",
    progress: bool = True,
) -> Path:
    """Corrupt ``images`` (uint8 (N, H, W, 3)) into ``<out_dir>/<directory>``, resuming an interrupted run.

    Returns the dataset directory. See the module docstring for the layout and the meaning of ``severities``.
    """
    from tqdm.auto import tqdm

    check_selection(corruptions, severities)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or len(labels) != len(images):
        raise DataError(f"expected uint8 images (N, H, W, 3) and N labels, got {images.dtype} {images.shape} "
                        f"and {len(labels)} labels; load them with tta.data.clean.load_clean")
    n = len(images)
    root = Path(out_dir) / directory
    settings = {"source": source, "n_images": n, "image_shape": list(images.shape[1:]), "seed": seed,
                "chunk": CHUNK, "frost_images": str(frost_images) if frost_images else None}
    written = _check_manifest(root, settings)
    for stale in [*root.glob(STALE_GLOB), *root.glob(f".parts/{STALE_GLOB}")]:  # left by a killed run
        stale.unlink()
    label_dtype = np.uint8 if labels.min() >= 0 and labels.max() < 256 else np.int64
    expected = np.tile(labels.astype(label_dtype), 5)
    if not _complete(root / "labels.npy", expected.shape, label_dtype) or not np.array_equal(
            np.load(root / "labels.npy", allow_pickle=False), expected):
        _save_final(root, "labels.npy", expected, written)

    parts = root / ".parts"
    full_shape = (5 * n, *images.shape[1:])
    todo = [(c, s) for c in corruptions for s in sorted(set(severities))
            if not _complete(root / f"{c}.npy", full_shape) and not _complete(parts / f"{c}.s{s}.npy", images.shape)]
    device = torch.device(device)
    clean = torch.from_numpy(images).to(device).permute(0, 3, 1, 2)
    bar = tqdm(total=len(todo) * n, unit="img", disable=not progress, desc="tta corrupt")
    for name, severity in todo:
        bar.set_postfix_str(f"{name} s{severity}")
        block = np.empty(images.shape, dtype=np.uint8)
        for start in range(0, n, CHUNK):
            x = clean[start:start + CHUNK].float().div_(255)
            out = to_uint8(corrupt_indexed(x, start, name, severity, seed, frost_images))
            block[start:start + len(x)] = out.permute(0, 2, 3, 1).cpu().numpy()
            bar.update(len(x))
        parts.mkdir(exist_ok=True)
        save_array(parts / f"{name}.s{severity}.npy", block)
    bar.close()

    for name in corruptions:
        final = root / f"{name}.npy"
        blocks = [parts / f"{name}.s{s}.npy" for s in range(1, 6)]
        if _complete(final, full_shape) or not all(_complete(b, images.shape) for b in blocks):
            continue
        _save_final(root, final.name, np.concatenate([np.load(b, allow_pickle=False) for b in blocks]), written)
        for b in blocks:
            b.unlink()
    if parts.is_dir() and not any(parts.iterdir()):
        parts.rmdir()
    return root


def missing_blocks(root: str | Path, corruptions: Sequence[str]) -> dict[str, list[int]]:
    """Severities still missing per corruption whose ``.npy`` is not assembled yet (after a partial run)."""
    root = Path(root)
    return {c: [s for s in range(1, 6) if not (root / ".parts" / f"{c}.s{s}.npy").is_file()]
            for c in corruptions if not (root / f"{c}.npy").is_file()}


def corrupt_dataset(
    source: str,
    out_dir: str | Path = "data",
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = (1, 2, 3, 4, 5),
    seed: int = 0,
    device: str | torch.device = "cpu",
    dataset: str | None = None,
    frost_images: str | Path | None = None,
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """``tta corrupt``: load the clean set ``source`` (see ``load_clean``) and write its corruptions (all 19 by
    default) as ``<out_dir>/CIFAR-10-C`` (``CIFAR-100-C`` for ``dataset='cifar100c'``, the default for the
    ``cifar100`` source). torchvision sets are looked for and downloaded in ``data_dir`` (default ``out_dir``)."""
    from tta.corruptions import ALL_CORRUPTIONS
    from tta.data.cifar_c import dataset_info
    from tta.data.clean import load_clean

    corruptions = list(corruptions or ALL_CORRUPTIONS)
    check_selection(corruptions, severities)  # before a possibly long load or download
    directory = dataset_info(dataset or ("cifar100c" if source == "cifar100" else "cifar10c"))[0]
    images, labels = load_clean(source, data_dir if data_dir is not None else out_dir)
    return write_corruptions(images, labels, out_dir, corruptions, severities, seed=seed,
                             device=device, directory=directory, frost_images=frost_images, source=source,
                             progress=progress)
