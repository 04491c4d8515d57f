"""Bad input converted correctly or refused with a reason (image modes, npz types, labels, class folders), caches
checked by checksum, tta corrupt never mixing its labels with foreign files, and no loader running pickled code."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tta
from tta.data.arrays import npz_stream
from tta.data.images import folder_files, folder_stream
from tta.data.writer import MANIFEST, write_corruptions
from tta.errors import ConfigError, DataError, ModelError
from tta.models.preprocess import CIFAR, to_rgb

MARKER_NAME = "pwned"


class Payload:
    """Unpickling this runs code: it writes a marker file (the harmless stand-in for an attack)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "code ran"))


def craft(path: Path, marker: Path, wrap: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": Payload(marker)} if wrap else Payload(marker), path)
    return path


# --- images ----------------------------------------------------------------------------------------------------

def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode.startswith("I;16")
        grey = np.asarray(to_rgb(image))[..., 0].astype(int)
    np.testing.assert_allclose(grey, np.round(values / 257), atol=1)
    assert grey.max() > 200 and len(np.unique(grey)) > 50  # clipping would give a few values, most of them 255


@pytest.mark.parametrize("mode", ["P", "LA", "CMYK", "1", "L", "RGBA", "YCbCr", "I", "F"])
def test_other_modes_become_rgb_of_the_same_scene(mode: str) -> None:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    if mode == "I":
        image = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.int32) * 257)
    elif mode == "F":
        image = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.float32) / 255)
    else:
        image = rgb.convert(mode)
    out = np.asarray(to_rgb(image))
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    reference = np.asarray(rgb.convert("L")).astype(int)
    if mode in ("L", "LA", "I", "F"):
        np.testing.assert_allclose(out[..., 0], reference, atol=1)
    elif mode != "1":  # palette and colour spaces: close to the original colours
        assert np.abs(out.astype(int) - np.asarray(rgb).astype(int)).mean() < 40


def test_images_out_of_range_are_refused_with_the_reason() -> None:
    with pytest.raises(DataError, match=r"values from 255 to 255, not in \[0, 1\]"):
        to_rgb(Image.fromarray(np.full((4, 4), 255, np.float32)))
    with pytest.raises(DataError, match="beyond the 16-bit range"):
        to_rgb(Image.fromarray(np.full((4, 4), -5, np.int32)))


def test_npz_image_types(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    cases = {"float01": u8.astype(np.float32) / 255, "float_nchw": (u8.astype(np.float32) / 255).transpose(0, 3, 1, 2),
             "uint16": u8.astype(np.uint16) * 257}
    for name, x in cases.items():
        np.savez(tmp_path / f"{name}.npz", x=x, y=np.arange(6))
        [batch] = list(npz_stream(tmp_path / f"{name}.npz", batch_size=6, order="file"))
        torch.testing.assert_close(batch.x.float().mul(255).round(), torch.from_numpy(u8).permute(0, 3, 1, 2).float())
    for name, x, message in [("f255", u8.astype(np.float32), "divide them by 255"),
                             ("i16", u8.astype(np.int16), "type int16"),
                             ("nan", np.full((6, 8, 8, 3), np.nan, np.float32), "NaN or infinite")]:
        np.savez(tmp_path / f"{name}.npz", x=x, y=np.arange(6))
        with pytest.raises(DataError, match=message):
            npz_stream(tmp_path / f"{name}.npz")


def test_bad_npz_files_and_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "empty.npz")
    (tmp_path / "text.npz").write_text("not a zip")
    np.savez(tmp_path / "none.npz", x=np.zeros((0, 8, 8, 3), np.uint8), y=np.zeros(0, int))
    x = np.zeros((4, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "neg.npz", x=x, y=np.array([0, 1, -1, 2]))
    np.savez(tmp_path / "frac.npz", x=x, y=np.array([0, 1, 1.5, 2]))
    np.savez(tmp_path / "whole.npz", x=x, y=np.array([0.0, 1.0, 2.0, 3.0]))
    for name, message in [("empty", "holds no arrays but needs x and y"), ("text", "not an .npz archive"),
                          ("none", "holds no images"), ("neg", "are negative"), ("frac", "whole class indices")]:
        with pytest.raises(DataError, match=message):
            npz_stream(tmp_path / f"{name}.npz")
    assert npz_stream(tmp_path / "whole.npz", order="file").num_labels == 4


def _tree(root: Path, names: list[str]) -> Path:
    for name in names:
        (root / name).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / name / "a.png")
    return root


def test_integer_class_folders_keep_their_numbers(tmp_path: Path) -> None:
    files = folder_files(_tree(tmp_path / "ok", [str(i) for i in range(12)] + [".hidden"]))
    assert {Path(p).parent.name: label for p, label in files["ok"]} == {str(i): i for i in range(12)}
    with pytest.raises(DataError, match=r"'notes'\) are mixed in"):
        folder_files(_tree(tmp_path / "stray", ["0", "1", "10", "notes"]))
    with pytest.raises(DataError, match="must be integers >= 0 or names, but '-1'"):
        folder_files(_tree(tmp_path / "neg", ["-1", "0"]))
    (tmp_path / "l.csv").write_text("ok/0/a.png,0\nok/1/a.png,1.5\n")
    with pytest.raises(DataError, match=r"'1\.5' is not"):
        folder_stream(tmp_path / "l.csv")


def test_folder_stream_reads_16_bit_pngs_at_their_brightness(tmp_path: Path) -> None:
    (tmp_path / "set" / "0").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "set" / "0" / "a.png")
    [batch] = list(folder_stream(tmp_path / "set", CIFAR, workers=0))
    assert int(batch.x.max()) == round(40000 / 257)


# --- caches ------------------------------------------------------------------------------------------------------

def test_a_byte_flipped_digits_model_is_retrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture, one_thread: None) -> None:
    from tta.models import digits as digits_model

    monkeypatch.setitem(digits_model.RECIPE, "epochs", 1)
    digits_model.load_digits_cnn(tmp_path)
    cache = tmp_path / "models" / "digits" / "digits-cnn.pt"
    saved = torch.load(cache, weights_only=True)
    saved["state_dict"]["1.0.weight"].view(-1)[0] += 0.5  # one weight changed, the file still loads
    torch.save(saved, cache)
    trained = []
    real = digits_model.train_digits_cnn
    monkeypatch.setattr(digits_model, "train_digits_cnn", lambda *a: trained.append(1) or real(*a))
    with caplog.at_level(logging.WARNING):
        digits_model.load_digits_cnn(tmp_path)
    assert trained == [1] and "do not match their checksum" in caplog.text


def test_a_fisher_cache_holding_inf_or_damaged_is_rebuilt(caplog: pytest.LogCaptureFixture) -> None:
    from tta.core.fisher import finite
    from tta.source import SourceData, cache_dir, derived

    source = SourceData.from_arrays(np.zeros((4, 8, 8, 3), np.uint8), np.arange(4))
    calls = []

    def compute() -> list[torch.Tensor]:
        calls.append(1)
        return [torch.ones(3)]

    derived("fisher-test", "m", source, "s", compute, valid=finite)
    [path] = (cache_dir() / "derived").glob("fisher-test-*.pt")
    import tta.source

    for damage in ("inf", "flip"):
        tta.source._MEMORY.clear()
        saved = torch.load(path, weights_only=True)
        saved["value"][0][1] = float("inf") if damage == "inf" else 1.5
        if damage == "inf":
            saved["sha256"] = tta.source.value_digest(saved["value"])  # a consistent file with inf in it
        torch.save(saved, path)
        with caplog.at_level(logging.WARNING):
            value = derived("fisher-test", "m", source, "s", compute, valid=finite)
        assert torch.equal(value[0], torch.ones(3))
    assert len(calls) == 3 and "invalid values" in caplog.text and "does not match its checksum" in caplog.text


# --- tta corrupt -------------------------------------------------------------------------------------------------

def test_corrupt_never_adopts_labels_it_did_not_write(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 6)
    root = tmp_path / "out" / "CIFAR-10-C"
    root.mkdir(parents=True)
    foreign = np.tile(rng.integers(0, 10, 6).astype(np.uint8), 5)
    np.save(root / "labels.npy", foreign)
    with pytest.raises(ConfigError, match=r"labels\.npy that tta corrupt did not write"):
        write_corruptions(x, y, tmp_path / "out", ["fog"], progress=False)
    assert np.array_equal(np.load(root / "labels.npy"), foreign) and not (root / MANIFEST).exists()
    (root / "labels.npy").unlink()
    write_corruptions(x, y, tmp_path / "out", ["fog"], progress=False)
    assert set(json.loads((root / MANIFEST).read_text())["files"]) == {"labels.npy", "fog.npy"}
    np.save(root / "labels.npy", foreign)  # replaced after the run
    with pytest.raises(ConfigError, match="did not write or that changed since"):
        write_corruptions(x, y, tmp_path / "out", ["fog", "snow"], progress=False)


# --- no pickled code ---------------------------------------------------------------------------------------------

def test_every_loader_refuses_a_crafted_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               one_thread: None) -> None:
    from tta.models import digits as digits_model
    from tta.models import load_model
    from tta.source import SourceData, cache_dir, derived
    from tta.warmup.train import _read_resume

    tta_source = sys.modules["tta.source"]
    marker = tmp_path / MARKER_NAME
    with pytest.raises(ModelError):
        load_model(checkpoint=craft(tmp_path / "c.th", marker), arch="resnet20")
    with pytest.raises(ModelError):
        tta.load_adapted(craft(tmp_path / "adapted.pt", marker), torch.nn.Linear(2, 2))
    with pytest.warns(UserWarning, match="unreadable resume file"):
        assert _read_resume(craft(tmp_path / "w.resume", marker), "key") is None

    monkeypatch.setitem(digits_model.RECIPE, "epochs", 1)
    craft(tmp_path / "models" / "digits" / "digits-cnn.pt", marker)
    digits_model.load_digits_cnn(tmp_path)  # retrained instead

    source = SourceData.from_arrays(np.zeros((2, 4, 4, 3), np.uint8), np.arange(2))
    assert derived("probe", "m", source, "s", lambda: [torch.ones(1)]) is not None
    [path] = (cache_dir() / "derived").glob("probe-*.pt")
    tta_source._MEMORY.clear()
    craft(path, marker, wrap=False)
    assert torch.equal(derived("probe", "m", source, "s", lambda: [torch.ones(1)])[0], torch.ones(1))

    rb = tmp_path / "rb" / "models" / "cifar10" / "corruptions" / "Standard.pt"
    craft(rb, marker)
    with pytest.raises(ModelError, match="holds more than weights"):
        load_model("Standard", dataset="cifar10", data_dir=tmp_path / "rb")
    assert not marker.exists()
