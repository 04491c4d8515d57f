"""Clean image sets to corrupt: ``load_clean(spec, data_dir) -> (x uint8 NHWC, y int64)``.

``spec`` is ``cifar10`` or ``cifar100`` (the test split, or the training split with ``train=True``, through
torchvision: downloaded into ``data_dir`` when online, a ``DownloadError`` naming the archive and where to put it
when not), ``npz:PATH`` (arrays ``x``, uint8 (N, H, W, 3), and ``y``), or ``folder:PATH`` (an ImageFolder: one
sub-folder per class: integer names are their own class ids, other names numbered in sorted order; all images
must share one size).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tta.errors import ConfigError, DataError, DownloadError

# name -> (torchvision class, archive URL, folder the archive extracts to)
TORCHVISION_SETS: dict[str, tuple[str, str, str]] = {
    "cifar10": ("CIFAR10", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "cifar-100-python"),
}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp"}


def describe_specs() -> str:
    """The accepted clean-set specs, for error and help messages."""
    return f"{', '.join(TORCHVISION_SETS)}, npz:PATH (arrays x uint8 NHWC and y) or folder:PATH (an ImageFolder)"


def load_clean(
    spec: str, data_dir: str | Path = "data", download: bool = True, train: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 (N, H, W, 3)) and int64 labels (N,) of a clean set named by ``spec`` (see the module docs).

    ``train`` picks the training split of ``cifar10``/``cifar100`` (for source warm-ups, which must never see the
    test images); it does not apply to ``npz:``/``folder:`` specs, which are used as they are.
    """
    if check_spec(spec) == "torchvision":
        return _load_torchvision(spec, Path(data_dir), download, train)
    kind, _, path = spec.partition(":")
    return _load_npz(Path(path)) if kind == "npz" else _load_folder(Path(path))


def check_spec(spec: str) -> str:
    """The kind of a clean-set spec (``torchvision``, ``npz`` or ``folder``), or a ``ConfigError``; loads nothing."""
    if spec in TORCHVISION_SETS:
        return "torchvision"
    kind, _, path = spec.partition(":")
    if kind in ("npz", "folder") and path:
        return kind
    raise ConfigError(f"unknown clean source {spec!r}; use one of: {describe_specs()}")


def _load_torchvision(name: str, data_dir: Path, download: bool, train: bool) -> tuple[np.ndarray, np.ndarray]:
    import torchvision.datasets

    cls_name, url, folder = TORCHVISION_SETS[name]
    cls = getattr(torchvision.datasets, cls_name)
    try:
        ds = cls(root=str(data_dir), train=train, download=False)
    except RuntimeError:  # torchvision's "Dataset not found or corrupted": try to fetch it
        try:
            if not download:
                raise RuntimeError("downloading is switched off")
            ds = cls(root=str(data_dir), train=train, download=True)
        except Exception as err:  # urllib, ssl and socket errors alike mean "could not download"
            split = "training" if train else "test"
            raise DownloadError(
                f"the {name} {split} set is not in {data_dir} and could not be downloaded ({type(err).__name__}: "
                f"{err}); fetch {url} and extract it into {data_dir} so that {data_dir / folder} exists"
            ) from None
    return np.ascontiguousarray(ds.data, dtype=np.uint8), np.asarray(ds.targets, dtype=np.int64)


def _check_images(x: np.ndarray, y: np.ndarray, where: Path) -> tuple[np.ndarray, np.ndarray]:
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3:
        raise DataError(f"{where}: x must be uint8 images of shape (N, H, W, 3), got {x.dtype} {x.shape}; "
                        "convert it with np.uint8(x * 255) and transpose NCHW arrays to NHWC")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: y must hold one integer label per image ({len(x)}), got {y.dtype} {y.shape}")
    if len(x) == 0:
        raise DataError(f"{where} holds no images; point the source at a non-empty set")
    from tta.data.arrays import as_labels

    return np.ascontiguousarray(x), as_labels(y, f"the labels of {where}").numpy()


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path} does not exist; pass npz:PATH with the path of an .npz holding arrays x and y")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data or "y" not in data:
                raise DataError(f"{path} holds arrays {', '.join(data.files) or 'none'}, expected x and y; "
                                "save it with np.savez(path, x=images, y=labels)")
            x, y = data["x"], data["y"]
    except (ValueError, OSError) as err:
        raise DataError(f"{path} is not a readable .npz ({err}); write it with np.savez(path, x=images, y=labels)") \
            from None
    return _check_images(x, y, path)


def _load_folder(root: Path) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    from tta.data.images import folder_files
    from tta.models.preprocess import to_rgb

    files = folder_files(root)  # class names to labels as for --data (integers keep their value)
    if len(files) > 1:
        raise DataError(f"{root} holds several domains ({', '.join(list(files)[:3])}, ...); a clean set is one "
                        f"folder with one sub-folder of images per class")
    [pairs] = files.values()
    images = []
    for f, _ in pairs:
        with Image.open(f) as img:
            images.append(np.asarray(to_rgb(img)))
    sizes = {im.shape for im in images}
    if len(sizes) > 1:
        raise DataError(f"the images of {root} have {len(sizes)} different sizes (e.g. {sorted(sizes)[:2]}); "
                        "resize them to one size first, as the corrupted files hold one (N, H, W, 3) array")
    return _check_images(np.stack(images), np.array([label for _, label in pairs]), root)
