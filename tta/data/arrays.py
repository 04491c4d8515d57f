"""Streams over images already in memory (a user's own shifted data, an .npz file)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from tta.data.settings import SettingStream
from tta.data.stream import Domain
from tta.errors import DataError


class ArraySource:
    """A ``DomainSource`` over one array of images: uint8 NHWC (as stored on disk) or float NCHW in [0, 1]."""

    label = "files"

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> None:
        images = torch.as_tensor(images)
        if images.ndim != 4:
            raise DataError(f"images must have 4 dimensions (N, H, W, C uint8 or N, C, H, W float), got "
                            f"{tuple(images.shape)}")
        if images.dtype == torch.uint8 and images.shape[-1] in (1, 3):
            images = images.permute(0, 3, 1, 2)
        labels = torch.as_tensor(labels).long().reshape(-1)
        if len(labels) != len(images):
            raise DataError(f"{len(images)} images but {len(labels)} labels; pass one label per image")
        self.images, self.labels = images, labels

    def size(self, domain: Domain) -> int:
        return len(self.labels)

    def labels_of(self, domain: Domain) -> np.ndarray:
        """Every label, without reading images."""
        return self.labels.numpy()

    def load(self, domain: Domain, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
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

    def load(self, domain: Domain, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return self.parts[domain].load(domain, index)


def array_stream(
    images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, name: str = "data",
    batch_size: int = 200, n_examples: int | None = None, domains: np.ndarray | Sequence[object] | None = None,
    setting: str = "per-domain", seed: int = 0, dirichlet: float = 0.0,
) -> SettingStream:
    """A stream over in-memory images (uint8 NHWC or float NCHW in [0, 1]).

    Without ``domains`` it is one domain, reported by ``name``, with no severity; ``domains`` (one id or name
    per image) splits the images into domains (reported by that id, in sorted order, images in their given order)
    that ``setting`` orders like any benchmark's (``tta.data.settings``).
    """
    if domains is None:
        parts = {Domain(name=name): ArraySource(images, labels)}
    else:
        ids = np.asarray(domains).reshape(-1)
        if len(ids) != len(images):
            raise DataError(f"{len(images)} images but {len(ids)} domain ids; pass one domain id per image")
        labels = np.asarray(labels)
        parts = {}
        for value in np.unique(ids):
            rows = np.flatnonzero(ids == value)
            parts[Domain(name=str(value))] = ArraySource(images[rows], labels[rows])
    names = [d.name for d in parts]
    stream = SettingStream(DomainArrays(parts), names, [None], setting=setting, n_examples=n_examples,
                           batch_size=batch_size, seed=seed, dirichlet=dirichlet)
    stream.num_labels = max(int(p.labels.max()) + 1 if len(p.labels) else 0 for p in parts.values())
    return stream


def npz_stream(path: str | Path, name: str | None = None, batch_size: int = 200,
               n_examples: int | None = None, setting: str = "per-domain", seed: int = 0,
               dirichlet: float = 0.0) -> SettingStream:
    """A stream over an .npz with ``x`` (uint8 NHWC) and ``y`` arrays, and optionally ``domain`` (one id or name
    per image: several domains, see ``array_stream``); one domain named after the file otherwise."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            x, y = data["x"], data["y"]
            domains = data["domain"] if "domain" in data.files else None
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{path} is not an .npz with arrays 'x' (uint8 NHWC images) and 'y' (labels): {err}") from None
    return array_stream(x, y, name or path.stem, batch_size, n_examples, domains=domains, setting=setting, seed=seed,
                        dirichlet=dirichlet)
