"""Streams over images already in memory (a user's own shifted data, an .npz file).

Images are uint8 (0..255), uint16 (0..65535, e.g. 16-bit scans) or floats in [0, 1], channels last (N, H, W, C) or
first (N, C, H, W) with C 1 or 3; uint16 images are scaled to floats in [0, 1]. Anything else (floats beyond [0, 1],
signed integers, non-finite values) is refused with a ``DataError`` saying how to convert it, never guessed at.
Labels are non-negative integers (integral floats are accepted); negative or fractional labels are refused.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tta.data.order import check_order, check_stream_order, domain_permutation
from tta.data.settings import SettingStream
from tta.data.stream import Domain
from tta.errors import DataError

CONVERT = "save them as uint8 (0..255), uint16 (0..65535) or floats in [0, 1]"


def as_images(images: np.ndarray | torch.Tensor, where: str = "images") -> torch.Tensor:
    """``images`` as a uint8 or float32 (N, C, H, W) tensor (see the module docs for what is accepted)."""
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise DataError(f"{where} must have 4 dimensions (N, H, W, C or N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[-1] in (1, 3) and (x.dtype == torch.uint8 or x.shape[1] not in (1, 3)):
        x = x.permute(0, 3, 1, 2)  # channels last (how uint8 images are stored on disk)
    if x.shape[1] not in (1, 3):
        raise DataError(f"{where} have shape {tuple(images.shape)}: neither the second nor the last axis holds 1 or 3 "
                        "colour channels; store them as (N, H, W, 3) or (N, 3, H, W)")
    if x.dtype == torch.uint8:
        return x
    if x.dtype == torch.uint16:
        return x.to(torch.int32).float().div_(65535.0)
    if not x.dtype.is_floating_point:
        raise DataError(f"{where} are of type {str(x.dtype).removeprefix('torch.')}, which has no agreed brightness "
                        f"scale; {CONVERT}")
    if len(x) and not torch.isfinite(x).all():
        raise DataError(f"{where} hold NaN or infinite values; replace them, then {CONVERT}")
    low, high = (float(x.min()), float(x.max())) if len(x) else (0.0, 0.0)
    if low < 0 or high > 1:
        hint = "divide them by 255" if low >= 0 and high <= 255 else CONVERT
        raise DataError(f"{where} are floats, which must lie in [0, 1], but range from {low:g} to {high:g}; {hint}")
    return x.float()


def as_labels(labels: np.ndarray | torch.Tensor | Sequence[float], where: str = "labels") -> torch.Tensor:
    """``labels`` as int64, or a ``DataError`` for negative, fractional or non-finite ones."""
    y = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if y.dtype == bool or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{where} must be integers (class indices), got {y.dtype}")
    if np.issubdtype(y.dtype, np.floating):
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            raise DataError(f"{where} must be whole class indices, but {int(bad.sum())} of {len(y)} are not (e.g. "
                            f"{float(y[bad][0])!r}); pass integer labels")
    if len(y) and y.min() < 0:
        raise DataError(f"{where} must be class indices >= 0, but {int((y < 0).sum())} of {len(y)} are negative (e.g. "
                        f"{y.min()}); map your classes to 0, 1, ...")
    return torch.from_numpy(y.astype(np.int64))


class ArraySource:
    """A ``DomainSource`` over one array of images (see the module docs for the accepted layouts and types).

    ``order`` (a permutation of the images, default: as given) is the order in which the stream reads them.
    """

    label = "files"

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                 order: np.ndarray | None = None) -> None:
        images = as_images(images)
        labels = as_labels(labels)
        if len(labels) != len(images):
            raise DataError(f"{len(images)} images but {len(labels)} labels; pass one label per image")
        self.images, self.labels = images, labels
        self.order = None if order is None else torch.as_tensor(np.asarray(order), dtype=torch.long)

    def size(self, domain: Domain) -> int:
        return len(self.labels)

    def labels_of(self, domain: Domain) -> np.ndarray:
        """Every label in stream order, without reading images."""
        return (self.labels if self.order is None else self.labels[self.order]).numpy()

    def load(self, domain: Domain, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self.order is not None:
            idx = self.order[torch.as_tensor(index)]
            return self.images[idx], self.labels[idx]
        start, stop = int(index[0]), int(index[-1]) + 1
        if len(index) == stop - start:  # a contiguous run: a view, in the layout the images are stored in
            return self.images[start:stop], self.labels[start:stop]
        idx = torch.as_tensor(index)
        return self.images[idx], self.labels[idx]


class DomainArrays:
    """A ``DomainSource`` over several domains of in-memory images: one ``ArraySource`` per domain."""

    label = "files"

    def __init__(self, parts: dict[Domain, ArraySource]) -> None:
        self.parts = parts

    def size(self, domain: Domain) -> int:
        return self.parts[domain].size(domain)

    def labels_of(self, domain: Domain) -> np.ndarray:
        """The domain's labels in stream order."""
        return self.parts[domain].labels_of(domain)

    def load(self, domain: Domain, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.parts[domain].load(domain, index)


def array_stream(
    images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, name: str = "data",
    batch_size: int = 200, n_examples: int | None = None, domains: np.ndarray | Sequence[object] | None = None,
    setting: str = "per-domain", seed: int = 0, dirichlet: float = 0.0, order: str = "file",
) -> SettingStream:
    """A stream over in-memory images (see the module docs for the accepted layouts and types).

    Without ``domains`` it is one domain, reported by ``name``, with no severity; ``domains`` (one id or name
    per image) splits the images into domains (reported by that id, in sorted order) that ``setting`` orders like
    any benchmark's (``tta.data.settings``). ``order="file"`` (the default here) reads each domain's images in the
    given order, ``"shuffle"`` in a seeded random one (``tta.data.order``); ``n_examples`` takes the first images
    in that order. A warning is logged when the labels follow each other in stream order.
    """
    check_order(order)
    x, y = as_images(images), as_labels(labels)
    if len(y) != len(x):
        raise DataError(f"{len(x)} images but {len(y)} labels; pass one label per image")
    if len(x) == 0:
        raise DataError(f"{name} holds no images; pass at least one image and label")
    groups: dict[str, np.ndarray | None]
    if domains is None:
        groups = {name: None}
    else:
        ids = np.asarray(domains).reshape(-1)
        if len(ids) != len(x):
            raise DataError(f"{len(x)} images but {len(ids)} domain ids; pass one domain id per image")
        groups = {str(value): np.flatnonzero(ids == value) for value in np.unique(ids)}
    parts = {}
    for domain, rows in groups.items():
        part_x, part_y = (x, y) if rows is None else (x[torch.as_tensor(rows)], y[torch.as_tensor(rows)])
        perm = domain_permutation(len(part_y), seed, domain) if order == "shuffle" else None
        parts[Domain(name=domain)] = ArraySource(part_x, part_y, perm)
    names = [d.name for d in parts]
    stream = SettingStream(DomainArrays(parts), names, [None], setting=setting, n_examples=n_examples,
                           batch_size=batch_size, seed=seed, dirichlet=dirichlet)
    stream.num_labels = max(int(p.labels.max()) + 1 for p in parts.values())
    check_stream_order(stream, name)
    return stream


def npz_stream(path: str | Path, name: str | None = None, batch_size: int = 200,
               n_examples: int | None = None, setting: str = "per-domain", seed: int = 0,
               dirichlet: float = 0.0, order: str = "shuffle") -> SettingStream:
    """A stream over an .npz with ``x`` (images, see the module docs) and ``y`` arrays, and optionally ``domain``
    (one id or name per image: several domains, see ``array_stream``); one domain named after the file otherwise.
    Each domain is shuffled with ``seed`` unless ``order="file"``."""
    path = Path(path)
    check_order(order)
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not an .npz archive (not a zip file); write it with np.savez(path, x=images, "
                        "y=labels)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in ("x", "y", "domain") if k in data.files}
            names = data.files
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path} is not a readable .npz ({err}); write it with np.savez(path, x=images, y=labels)") \
            from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        held = f"arrays {', '.join(names)}" if names else "no arrays"
        raise DataError(f"{path} holds {held} but needs {' and '.join(missing)}; write it with np.savez(path, "
                        "x=images, y=labels)")
    x, y, domains = arrays["x"], arrays["y"], arrays.get("domain")
    if len(x) == 0:
        raise DataError(f"{path} holds no images (x is empty); pass a file with at least one image and label")
    return array_stream(as_images(x, f"the images (x) of {path}"), as_labels(y, f"the labels (y) of {path}"),
                        name or path.stem, batch_size, n_examples, domains=domains, setting=setting, seed=seed,
                        dirichlet=dirichlet, order=order)
