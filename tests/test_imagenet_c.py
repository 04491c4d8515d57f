"""ImageNet-C and ImageNet-3DCC: fake trees of tiny JPEGs in the exact published layout, the 5,000-image subset's
file list, the model's preprocessing, DataLoader workers, every setting, and missing or corrupt files."""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tta.data import download, imagenet_c
from tta.data.imagenet_c import domain_files, imagenet_c_stream, subset_ids
from tta.data.images import imagenet_wnids
from tta.errors import ConfigError, DataError, DownloadError
from tta.models.preprocess import CIFAR, Preprocess, preprocess_for

LISTS = Path(imagenet_c.__file__).parent / "lists"
N_SUBSET = 12


def jpeg(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_tree(root: Path, corruptions: dict[str, list[int]], ids: list[str], extra: int = 2) -> None:
    """``root/<corruption>/<severity>/<wnid>/<file>.JPEG`` for ``ids``, plus ``extra`` files per domain outside them."""
    for c, severities in corruptions.items():
        for s in severities:
            names = [*ids, *[f"n01440764/ILSVRC2012_val_9999999{k}.JPEG" for k in range(extra)]]
            for k, name in enumerate(names):
                path = root / c / str(s) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(jpeg(hash((c, s, k)) % 2**32))


@pytest.fixture
def small_subset(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The first 12 ids of the real subset list, standing in for the 5,000 so that fake trees stay small."""
    ids = subset_ids()[:N_SUBSET]
    monkeypatch.setattr(imagenet_c, "subset_ids", lambda: ids)
    return ids


def test_subset_list_is_robustbenchs_5000_images() -> None:
    raw = (LISTS / "imagenet_test_image_ids.txt").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == "d4121626d07722a0126c35b1563042e46a546f1a05ce705f2cdc635896d58574"
    ids = subset_ids()
    assert len(ids) == 5000 == len(set(ids))
    assert all(re.fullmatch(r"n\d{8}/ILSVRC2012_val_\d{8}\.JPEG", i) for i in ids)
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and list(wnids) == sorted(wnids) and list(wnids.values()) == list(range(1000))
    classes = Counter(i.partition("/")[0] for i in ids)
    assert len(classes) == 997 and set(classes) <= set(wnids)
    assert min(classes.values()) >= 1 and max(classes.values()) <= 12


def test_imagenet_c_layout_subset_labels_and_preprocessing(tmp_path: Path, small_subset: list[str]) -> None:
    write_tree(tmp_path / "ImageNet-C", {"gaussian_noise": [5, 3], "fog": [5]}, small_subset)
    stream = imagenet_c_stream("imagenetc", tmp_path, ["gaussian_noise", "fog"], [5, 3][:1], batch_size=5,
                               preprocess=Preprocess(36, 32, "bicubic"), download=False, workers=0)
    assert [(d.corruption, d.severity) for d in stream.domains] == [("gaussian_noise", 5), ("fog", 5)]
    batches = list(stream)
    assert [len(b.y) for b in batches] == [5, 5, 2, 5, 5, 2] and [b.segment for b in batches] == [0, 0, 0, 1, 1, 1]
    x = torch.cat([b.x for b in batches[:3]])
    assert x.dtype == torch.uint8 and x.shape == (N_SUBSET, 3, 32, 32)
    wnids = imagenet_wnids()
    expected = [wnids[i.partition("/")[0]] for i in small_subset]  # the list's order, ImageNet class indices
    assert torch.cat([b.y for b in batches[:3]]).tolist() == expected
    with Image.open(tmp_path / "ImageNet-C/gaussian_noise/5" / small_subset[0]) as image:
        assert torch.equal(x[0], Preprocess(36, 32, "bicubic")(image))
    assert stream.num_labels == max(expected) + 1


def test_full_set_reads_every_file_sorted(tmp_path: Path, small_subset: list[str]) -> None:
    write_tree(tmp_path / "ImageNet-C", {"contrast": [1]}, small_subset, extra=3)
    files = domain_files(tmp_path / "ImageNet-C/contrast/1", subset=False)
    assert len(files) == N_SUBSET + 3
    assert [p for p, _ in files] == sorted(p for p, _ in files)
    stream = imagenet_c_stream("imagenetc", tmp_path, ["contrast"], [1], n_examples=4, subset=False,
                               preprocess=CIFAR, download=False, workers=0)
    assert stream.sizes == [4]


def test_3dcc_has_its_own_names_and_the_same_layout(tmp_path: Path, small_subset: list[str]) -> None:
    write_tree(tmp_path / "ImageNet-3DCC", {"near_focus": [5], "fog_3d": [5]}, small_subset)
    stream = imagenet_c_stream("imagenet3dcc", tmp_path, ["near_focus", "fog_3d"], [5], batch_size=6,
                               preprocess=CIFAR, download=False, workers=0)
    assert len(list(stream)) == 4
    with pytest.raises(ConfigError, match=r"unknown imagenet3dcc corruption.*'gaussian_noise'.*near_focus"):
        imagenet_c_stream("imagenet3dcc", tmp_path, ["gaussian_noise"], [5], download=False)


def test_workers_decode_the_same_batches(tmp_path: Path, small_subset: list[str]) -> None:
    write_tree(tmp_path / "ImageNet-C", {"snow": [2]}, small_subset)

    def batches(workers: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        stream = imagenet_c_stream("imagenetc", tmp_path, ["snow"], [2], batch_size=5, preprocess=CIFAR,
                                   download=False, workers=workers)
        return [(b.x, b.y, b.domain) for b in stream]

    for (x0, y0, d0), (x2, y2, d2) in zip(batches(0), batches(2), strict=True):
        assert torch.equal(x0, x2) and torch.equal(y0, y2) and torch.equal(d0, d2)


@pytest.mark.parametrize("setting", ["per-domain", "continual", "mixed", "gradual"])
def test_every_setting_predicts_each_image_once(tmp_path: Path, small_subset: list[str], setting: str) -> None:
    write_tree(tmp_path / "ImageNet-C", {"fog": [1, 3], "frost": [1, 3]}, small_subset)
    stream = imagenet_c_stream("imagenetc", tmp_path, ["fog", "frost"], [3, 1], batch_size=7, preprocess=CIFAR,
                               download=False, setting=setting, seed=1, workers=0)
    seen: Counter[tuple[int, int]] = Counter()
    for b in stream:
        for d, y in zip(b.domain.tolist(), b.y.tolist(), strict=True):
            seen[(d, y)] += 1
    expected = Counter((d, imagenet_wnids()[i.partition("/")[0]]) for d in range(4) for i in small_subset)
    assert seen == expected


def test_missing_folders_offline_say_what_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as info:
        imagenet_c_stream("imagenetc", tmp_path, ["gaussian_noise", "fog"], [5], download=False)
    message = str(info.value)
    for part in ("gaussian_noise/5, fog/5", "downloading is switched off", "noise.tar, weather.tar",
                 "zenodo.org/records/2235448", str(tmp_path / "ImageNet-C")):
        assert part in message
    with pytest.raises(DownloadError, match=r"no checksummed download.*EPFL-VILAB/3DCommonCorruptions"):
        imagenet_c_stream("imagenet3dcc", tmp_path, ["flash"], [5])


def test_imagenet_c_archive_downloads_and_extracts_into_the_layout(
    tmp_path: Path, small_subset: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_download import Server, _tar

    archive = _tar({f"noise/shot_noise/4/{i}": jpeg(k) for k, i in enumerate(small_subset)})
    server = Server()
    try:
        server.routes["/noise.tar"] = (archive, "ok")
        monkeypatch.setitem(download.FILES, "noise.tar", download.RemoteFile(
            "noise.tar", f"md5:{hashlib.md5(archive).hexdigest()}", (f"{server.url}/noise.tar",)))
        stream = imagenet_c_stream("imagenetc", tmp_path, ["shot_noise"], [4], preprocess=CIFAR, workers=0)
    finally:
        server.close()
    assert (tmp_path / "ImageNet-C/shot_noise/4" / small_subset[0]).is_file()
    assert sum(len(b.y) for b in stream) == N_SUBSET


def test_incomplete_domain_and_corrupt_jpeg(tmp_path: Path, small_subset: list[str]) -> None:
    write_tree(tmp_path / "ImageNet-C", {"pixelate": [5]}, small_subset)
    (tmp_path / "ImageNet-C/pixelate/5" / small_subset[3]).unlink()
    with pytest.raises(DataError, match=r"lacks 1 of the 12 images of the 5,000-image subset"):
        imagenet_c_stream("imagenetc", tmp_path, ["pixelate"], [5], download=False)
    write_tree(tmp_path / "ImageNet-C", {"pixelate": [5]}, small_subset)
    bad = tmp_path / "ImageNet-C/pixelate/5" / small_subset[7]
    bad.write_bytes(b"not a jpeg")
    for workers in (0, 1):
        stream = imagenet_c_stream("imagenetc", tmp_path, ["pixelate"], [5], batch_size=4, preprocess=CIFAR,
                                   download=False, workers=workers)
        with pytest.raises(DataError, match=re.escape(f"{bad} is not a readable image")):
            list(stream)


def test_model_preprocessing() -> None:
    assert preprocess_for("resnet50", "imagenetc") == Preprocess(232, 224, "bilinear")  # torchvision's V2 weights
    assert preprocess_for("resnet50.a1_in1k", "imagenetc") == Preprocess(235, 224, "bicubic")  # timm: 224 / 0.95
    assert preprocess_for("vit_base_patch16_224", "imagenet3dcc") == Preprocess(248, 224, "bicubic")
    assert preprocess_for("Standard", "cifar10c") == preprocess_for(None, "imagenetc") == CIFAR
    with pytest.raises(ConfigError, match="unknown interpolation"):
        Preprocess(32, 32, "lanczos5")
