"""Streams over images already in memory (a user's own shifted data, an .npz file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tta.data.stream import Domain, Stream
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


def array_stream(
    images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, name: str = "data",
    batch_size: int = 200, n_examples: int | None = None,
) -> Stream:
    """A one-domain stream (reported as corruption ``name``, severity 0) over in-memory images."""
    return Stream(ArraySource(images, labels), [Domain(name, 0)], n_examples=n_examples, batch_size=batch_size)


def npz_stream(path: str | Path, name: str | None = None, batch_size: int = 200,
               n_examples: int | None = None) -> Stream:
    """A one-domain stream over an .npz with ``x`` (uint8 NHWC) and ``y`` arrays."""
    path = Path(path)
    try:
        with np.load(path) as data:
            x, y = data["x"], data["y"]
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{path} is not an .npz with arrays 'x' (uint8 NHWC images) and 'y' (labels): {err}") from None
    return array_stream(x, y, name or path.stem, batch_size, n_examples)
