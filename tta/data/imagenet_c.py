"""ImageNet-C and ImageNet-3DCC in their published layout: ``<data_dir>/ImageNet-C/<corruption>/<severity>/<wnid>/
*.JPEG`` (and ``ImageNet-3DCC/...`` with its own corruption names).

Each domain is the 50,000 ImageNet validation images corrupted one way. By default a domain is the fixed
5,000-image subset the reference benchmarks use (robustbench and mariodoebler/test-time-adaptation read the same
list, ``lists/imagenet_test_image_ids.txt``: ``<wnid>/<file>`` lines, 1 to 12 images for each of 997 classes), in
that list's order; ``subset=False`` reads all files of the domain sorted by class and name. Labels are the ImageNet
class indices (the sorted wnids, as torchvision's and timm's models predict). Images are decoded and resized to the
model's input in DataLoader workers (``tta.data.images``).

ImageNet-C's archives come from Zenodo (record 2235448, md5-checked by ``tta.data.download``, deleted once
extracted); ImageNet-3DCC has no checksummed archive, so a missing 3DCC is an error that says where to get it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Unpack

from tta.data.cifar_c import BENCHMARK_CORRUPTIONS, EXTRA_CORRUPTIONS, SEVERITIES
from tta.data.images import DecodedStream, ImageFiles, imagenet_wnids
from tta.data.settings import Ordering, check_setting
from tta.data.stream import Domain
from tta.errors import ConfigError, DataError, DownloadError
from tta.models.preprocess import Preprocess

SUBSET_SIZE = 5000
CORRUPTIONS_3DCC: tuple[str, ...] = (
    "near_focus", "far_focus", "bit_error", "color_quant", "flash", "fog_3d", "h265_abr", "h265_crf", "iso_noise",
    "low_light", "xy_motion_blur", "z_motion_blur",
)
# ImageNet-C's Zenodo archives and the corruptions each holds
ARCHIVES: dict[str, tuple[str, ...]] = {
    "noise.tar": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur.tar": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather.tar": ("snow", "frost", "fog", "brightness"),
    "digital.tar": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
    "extra.tar": ("speckle_noise", "spatter", "gaussian_blur", "saturate"),
}
# name -> (directory, valid corruptions, default corruptions)
BENCHMARKS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "imagenetc": ("ImageNet-C", BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS, BENCHMARK_CORRUPTIONS),
    "imagenet3dcc": ("ImageNet-3DCC", CORRUPTIONS_3DCC, CORRUPTIONS_3DCC),
}
SOURCE_3DCC = "https://github.com/EPFL-VILAB/3DCommonCorruptions (its download script fetches ImageNet-3DCC)"


def subset_ids() -> list[str]:
    """The 5,000 ``<wnid>/<file>.JPEG`` ids of the reference subset, in the list's order."""
    return (Path(__file__).parent / "lists" / "imagenet_test_image_ids.txt").read_text().split()


def benchmark_info(name: str) -> tuple[str, tuple[str, ...], tuple[str, ...]]:
    """``(directory, valid corruptions, default corruptions)`` of ``imagenetc`` or ``imagenet3dcc``."""
    try:
        return BENCHMARKS[name]
    except KeyError:
        raise ConfigError(f"unknown ImageNet benchmark {name!r}; choose one of: {', '.join(BENCHMARKS)}") from None


def _check(benchmark: str, corruptions: Sequence[str], severities: Sequence[int]) -> None:
    _, valid, _ = benchmark_info(benchmark)
    unknown = [c for c in corruptions if c not in valid]
    if unknown:
        raise ConfigError(f"unknown {benchmark} corruption(s) {', '.join(map(repr, unknown))}; valid names are: "
                          f"{', '.join(valid)}")
    bad = [s for s in severities if not (isinstance(s, int) and 1 <= s <= 5)]
    if bad or not corruptions or not severities:
        raise ConfigError(f"select at least one corruption and severities from 1 to 5 (got {list(severities)})")


def domain_files(folder: Path, subset: bool) -> list[tuple[str, int]]:
    """``(path, label)`` of one ``<corruption>/<severity>`` folder: the 5,000-image subset or every image."""
    wnids = imagenet_wnids()
    if subset:
        ids = subset_ids()
        missing = [i for i in ids if not (folder / i).is_file()]
        if missing:
            raise DataError(f"{folder} lacks {len(missing)} of the {len(ids)} images of the 5,000-image subset "
                            f"(e.g. {missing[0]}); re-extract the archive, or read all files with subset=False")
        return [(str(folder / i), wnids[i.partition("/")[0]]) for i in ids]
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    unknown = [c.name for c in classes if c.name not in wnids]
    if unknown:
        raise DataError(f"{folder} has class folders that are not ImageNet wnids ({', '.join(unknown[:3])}); "
                        "expected <wnid>/<image>.JPEG, e.g. n01440764/ILSVRC2012_val_00000293.JPEG")
    files = [(str(p), wnids[c.name]) for c in classes for p in sorted(c.iterdir()) if p.is_file()]
    if not files:
        raise DataError(f"{folder} holds no images; expected {folder}/<wnid>/<image>.JPEG")
    return files


def ensure_folders(benchmark: str, data_dir: str | Path, corruptions: Sequence[str], severities: Sequence[int],
                   download: bool = True, progress: bool = True) -> Path:
    """The benchmark's directory, downloading missing ImageNet-C archives; a ``DownloadError`` naming what to
    fetch and where when folders are missing and cannot be downloaded."""
    directory, _, _ = benchmark_info(benchmark)
    root = Path(data_dir) / directory

    def missing() -> list[str]:
        return [f"{c}/{s}" for c in corruptions for s in severities if not (root / c / str(s)).is_dir()]

    reason = "downloading is switched off"
    if missing() and download and benchmark == "imagenetc":
        from tta.data.download import fetch_and_extract

        needed = [a for a, cs in ARCHIVES.items() if any(m.partition("/")[0] in cs for m in missing())]
        try:
            for archive in needed:
                fetch_and_extract(archive, data_dir, into=root, keep=ARCHIVES[archive].__contains__,
                                  progress=progress, remove_archive=True)  # 7-21 GB each, extracted: not needed
        except OSError as err:  # DownloadError or a network error
            reason = f"{type(err).__name__}: {err}"
        else:
            reason = "the downloaded archives do not contain them"
    elif missing() and download:
        reason = "ImageNet-3DCC has no checksummed download"
    gone = missing()
    if gone:
        shown = ", ".join(gone[:5]) + (f" and {len(gone) - 5} more" if len(gone) > 5 else "")
        if benchmark == "imagenetc":
            archives = [a for a, cs in ARCHIVES.items() if any(g.partition("/")[0] in cs for g in gone)]
            where = (f"fetch {', '.join(archives)} from https://zenodo.org/records/2235448 and extract them into "
                     f"{root} so that {root}/{gone[0]}/<wnid>/<image>.JPEG exist")
        else:
            where = f"get it from {SOURCE_3DCC} and place it so that {root}/{gone[0]}/<wnid>/<image>.JPEG exist"
        raise DownloadError(f"{benchmark} folders are missing from {root}: {shown} ({reason}); {where}")
    return root


def imagenet_c_stream(
    benchmark: str = "imagenetc",
    data_dir: str | Path = "data",
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] = SEVERITIES,
    n_examples: int | None = None,
    batch_size: int = 64,
    subset: bool = True,
    preprocess: Preprocess | None = None,
    download: bool = True,
    workers: int | None = None,
    **ordering: Unpack[Ordering],
) -> DecodedStream:
    """A stream over ImageNet-C (``imagenetc``) or ImageNet-3DCC (``imagenet3dcc``), ordered as ``setting``.

    ``subset`` reads the reference 5,000 images per domain (otherwise all 50,000); ``n_examples`` keeps the first
    n of them. ``preprocess`` is the model's geometry (``tta.models.preprocess.preprocess_for``); the default
    (resize 256, crop 224, bilinear) is the classic ImageNet evaluation. ``ordering`` (``setting``, ``seed``,
    ``dirichlet``) orders the stream as ``tta.data.settings`` describes.
    """
    check_setting(ordering.get("setting", "per-domain"))
    _, _, default = benchmark_info(benchmark)
    corruptions = list(corruptions or default)
    _check(benchmark, corruptions, severities)
    root = ensure_folders(benchmark, data_dir, corruptions, severities, download)
    files = {Domain(c, s): domain_files(root / c / str(s), subset) for c in corruptions for s in severities}
    source = ImageFiles(files, preprocess or Preprocess(256, 224, "bilinear"))
    return DecodedStream(source, corruptions, severities, n_examples=n_examples, batch_size=batch_size,
                         workers=workers, **ordering)
