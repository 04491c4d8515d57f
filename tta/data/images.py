"""Streams over image files: decoded and resized in DataLoader workers, batches in pinned memory.

``ImageFiles`` is a ``DomainSource`` holding, per domain, a list of ``(path, label)``. ``DecodedStream`` orders its
domains like every setting of ``tta.data.settings`` and reads the batches through a ``torch.utils.data.DataLoader``
whose workers open, decode and preprocess (resize, centre crop: the model's own geometry, see
``tta.models.preprocess``) each image, so the accelerator does not wait on JPEG decoding; on a CUDA machine the
batches land in pinned memory and reach the device with one non-blocking copy. Images stay uint8 until the device.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from tta.data.settings import SettingStream
from tta.data.stream import Batch, Domain
from tta.errors import DataError
from tta.models.preprocess import Preprocess

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp"})


def default_workers() -> int:
    """DataLoader workers when none are asked for: up to 8, leaving one core to the main process."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


class ImageFiles:
    """A ``DomainSource`` over image files: ``files[domain]`` is a list of ``(path, label)`` (see the module docs)."""

    label = "files"

    def __init__(self, files: Mapping[Domain, Sequence[tuple[str, int]]], preprocess: Preprocess) -> None:
        self.files = {d: list(f) for d, f in files.items()}
        self.preprocess = preprocess

    def size(self, domain: Domain) -> int:
        return len(self.files[domain])

    def labels_of(self, domain: Domain) -> np.ndarray:
        """The domain's labels in stream order, without reading images."""
        return np.array([label for _, label in self.files[domain]], dtype=np.int64)

    def item(self, domain: Domain, i: int) -> tuple[torch.Tensor, int]:
        """Image ``i`` of ``domain``, decoded and preprocessed (uint8 (3, H, W)), and its label."""
        from PIL import Image, UnidentifiedImageError

        path, label = self.files[domain][i]
        try:
            with Image.open(path) as image:
                return self.preprocess(image), label
        except DataError:
            raise
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise DataError(f"{path} is not a readable image ({err}); replace or delete it") from None

    def load(self, domain: Domain, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.item(domain, int(i)) for i in index]
        return collate(items)


def collate(items: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack decoded images (all one size) and their labels."""
    shapes = {tuple(x.shape) for x, _ in items}
    if len(shapes) > 1:
        raise DataError(f"the images of one batch have {len(shapes)} sizes ({sorted(shapes)[:2]}); pass "
                        "preprocess=Preprocess(resize, crop) to bring them to one size (`tta adapt` uses the model's)")
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)


class _Items(torch.utils.data.Dataset):
    """What a worker reads: key ``(domain id, index)`` -> decoded image and label."""

    def __init__(self, source: ImageFiles, domains: Sequence[Domain]) -> None:
        self.source, self.domains = source, list(domains)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        return self.source.item(self.domains[key[0]], key[1])

    def __len__(self) -> int:
        return sum(self.source.size(d) for d in self.domains)


class _BatchPlan:
    """The stream's batches as lists of ``(domain id, index)`` keys, generated lazily (a DataLoader batch sampler)."""

    def __init__(self, stream: DecodedStream) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for _, domain, index in self.stream.batches():
            yield list(zip(domain.tolist(), index.tolist(), strict=True))

    def __len__(self) -> int:
        return len(self.stream)


class DecodedStream(SettingStream):
    """A ``SettingStream`` over ``ImageFiles`` read through DataLoader workers (see the module docs).

    ``workers`` None picks ``default_workers()``; 0 decodes in the calling process. ``pin_memory`` None pins when
    CUDA is available. ``num_labels`` is one more than the largest label, for checks against a model's outputs.
    """

    def __init__(
        self,
        source: ImageFiles,
        corruptions: Sequence[str],
        severities: Sequence[int],
        setting: str = "per-domain",
        n_examples: int | None = None,
        batch_size: int = 64,
        seed: int = 0,
        workers: int | None = None,
        pin_memory: bool | None = None,
        dirichlet: float = 0.0,
    ) -> None:
        super().__init__(source, corruptions, severities, setting=setting, n_examples=n_examples,
                         batch_size=batch_size, seed=seed, dirichlet=dirichlet)
        self.workers = default_workers() if workers is None else max(0, workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        labels = [label for d, n in zip(self.domains, self.sizes, strict=True) for _, label in source.files[d][:n]]
        self.num_labels = max(labels) + 1 if labels else 0

    def batches(self) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(segment, domain ids, indices)`` of every batch, in stream order."""
        for run in self.runs:
            for start in range(0, len(run), self.batch_size):
                stop = start + self.batch_size
                yield run.segment, run.domain[start:stop], run.index[start:stop]

    def __iter__(self) -> Iterator[Batch]:
        loader = torch.utils.data.DataLoader(
            _Items(self.source, self.domains), batch_sampler=_BatchPlan(self), num_workers=self.workers,
            collate_fn=collate, pin_memory=self.pin_memory, prefetch_factor=4 if self.workers else None,
        )
        try:
            for (segment, domain, _), (x, y) in zip(self.batches(), loader, strict=True):
                yield Batch(x, y, torch.as_tensor(domain, dtype=torch.long), segment)
        except DataError as err:  # raised again by the DataLoader with the worker's traceback: keep the message
            message = str(err).strip().splitlines()[-1]
            raise DataError(message.partition("DataError: ")[2] or message) from None


# --- your own images: a folder tree or a CSV list --------------------------------------------------------------

def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p))


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def class_index(names: Sequence[str], where: str = "the data") -> dict[str, int]:
    """Label of each class name: ImageNet wnids get their ImageNet index, integers themselves, others sorted order.

    Integer names keep their value however many there are (``10`` is class 10, not the third name in sorted order);
    a set mixing integer and other names, or holding negative or fractional numbers, is a ``DataError`` (a stray
    entry would silently renumber every class).
    """
    unique = sorted(set(names))
    wnids = imagenet_wnids()
    if unique and all(n in wnids for n in unique):
        return {n: wnids[n] for n in unique}
    numeric = [n for n in unique if _is_number(n)]
    if numeric:
        bad = [n for n in numeric if not (n.isascii() and n.isdigit())]
        if bad:
            raise DataError(f"class labels in {where} must be integers >= 0 or names, but {bad[0]!r} is not; "
                            "number the classes 0, 1, ...")
        others = [n for n in unique if not _is_number(n)]
        if others:
            stray = ", ".join(map(repr, others[:3]))
            raise DataError(f"integer class labels ({numeric[0]}, ...) and other names ({stray}) are mixed in {where}; "
                            "rename or move the stray entries (names starting with a dot are ignored)")
        return {n: int(n) for n in unique}
    return {n: i for i, n in enumerate(unique)}


def _is_number(name: str) -> bool:
    try:
        float(name)
    except ValueError:
        return False
    return True


def folder_files(root: str | Path) -> dict[str, list[tuple[str, int]]]:
    """``{domain: [(path, label), ...]}`` of an image folder: ``root/<class>/<image>`` (one domain, named after
    ``root``) or ``root/<domain>/<class>/<image>``; class names map to labels by ``class_index``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a directory; pass folder:PATH with one sub-folder of images per class "
                        "(or per domain, each with one sub-folder per class), or a CSV file of path,label")
    top = _subdirs(root)
    if top and all(_subdirs(d) and not _images(d) for d in top):  # a domain level above the classes
        layout = {d.name: {c.name: _images(c) for c in _subdirs(d)} for d in top}
    else:
        layout = {root.name: {c.name: _images(c) for c in top}}
    index = class_index([c for classes in layout.values() for c in classes], f"the class folders of {root}")
    files = {domain: [(str(p), index[c]) for c, paths in classes.items() for p in paths]
             for domain, classes in layout.items()}
    empty = [d for d, f in files.items() if not f]
    if not files or empty:
        raise DataError(f"{root} has no images in class sub-folders{f' for domain(s) {empty}' if empty else ''}; "
                        f"lay it out as {root}/<class>/<image>.jpg or {root}/<domain>/<class>/<image>.jpg")
    return files


def csv_files(path: str | Path) -> dict[str, list[tuple[str, int]]]:
    """``{domain: [(path, label), ...]}`` of a CSV with rows ``path,label`` or ``path,label,domain`` (an optional
    header row is skipped). Relative paths are relative to the CSV's folder; labels are integers or class names
    (mapped by ``class_index``); without a domain column everything is one domain named after the file."""
    import csv

    path = Path(path)
    try:
        with path.open(newline="") as f:
            rows = [r for r in csv.reader(f) if r and any(cell.strip() for cell in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path} is not a readable CSV ({err}); write one row per image: path,label[,domain]") \
            from None
    if rows and rows[0][0].strip().lower() in ("path", "file", "filename", "image"):
        rows = rows[1:]
    bad = [i for i, r in enumerate(rows, 1) if len(r) not in (2, 3)]
    if not rows or bad:
        raise DataError(f"{path} must hold rows path,label or path,label,domain"
                        f"{f' (rows {bad[:3]} do not)' if bad else ' (it holds none)'}")
    index = class_index([r[1].strip() for r in rows], f"the label column of {path}")
    files: dict[str, list[tuple[str, int]]] = {}
    for r in rows:
        image = Path(r[0].strip())
        image = image if image.is_absolute() else path.parent / image
        files.setdefault(r[2].strip() if len(r) == 3 else path.stem, []).append((str(image), index[r[1].strip()]))
    missing = [p for f in files.values() for p, _ in f if not Path(p).is_file()]
    if missing:
        raise DataError(f"{path} lists {len(missing)} file(s) that do not exist, e.g. {missing[0]}; fix the paths "
                        "(relative paths are relative to the CSV's folder)")
    return files


def folder_stream(
    path: str | Path,
    preprocess: Preprocess | None = None,
    batch_size: int = 64,
    n_examples: int | None = None,
    setting: str = "per-domain",
    seed: int = 0,
    workers: int | None = None,
    dirichlet: float = 0.0,
    order: str = "shuffle",
) -> DecodedStream:
    """A stream over your own images: an image folder (``root/<class>/`` or ``root/<domain>/<class>/``) or a CSV
    of ``path,label[,domain]``. Each domain is reported by its name (``<domain>``), with no severity. ``preprocess``
    (default: images kept as they are, which must then share one size) resizes and crops them. Each domain is
    shuffled with ``seed`` (``n_examples`` is then a seeded random subset) unless ``order="file"`` keeps the files'
    order (folders: class by class); a warning is logged when the labels follow each other (``tta.data.order``)."""
    from tta.data.order import check_order, check_stream_order, domain_permutation

    check_order(order)
    path = Path(path)
    files = csv_files(path) if path.suffix.lower() == ".csv" else folder_files(path)
    if order == "shuffle":
        files = {d: [f[i] for i in domain_permutation(len(f), seed, d)] for d, f in files.items()}
    source = ImageFiles({Domain(name=d): f for d, f in files.items()}, preprocess or Preprocess())
    stream = DecodedStream(source, list(files), [None], setting=setting, n_examples=n_examples, batch_size=batch_size,
                           seed=seed, workers=workers, dirichlet=dirichlet)
    check_stream_order(stream, str(path))
    return stream


def imagenet_wnids() -> dict[str, int]:
    """The 1,000 ImageNet class ids (wnids) and their class indices (sorted order, as torchvision and timm use)."""
    global _WNIDS
    if _WNIDS is None:
        text = (Path(__file__).parent / "lists" / "imagenet_wnids.txt").read_text()
        _WNIDS = {w: i for i, w in enumerate(text.split())}
    return _WNIDS


_WNIDS: dict[str, int] | None = None
