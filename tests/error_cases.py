"""Every user error of the command line, in one list: the input, the one-sentence message, the exit status.

``tests/test_error_cases.py`` runs each row through the real CLI and checks the message and the status; the table
in ``docs/guides/data-safety.md`` is generated from the same list (``python tests/error_cases.py`` rewrites it
between its markers; a test fails when it is out of date). ``{dir}`` in a command or message is the case's own
temporary folder; ``setup`` fills it with what the case needs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DOC = Path(__file__).resolve().parents[1] / "docs" / "guides" / "data-safety.md"
BEGIN, END = "<!-- error-table:begin -->", "<!-- error-table:end -->"


@dataclass(frozen=True)
class Case:
    """One user error: what is typed (``args`` after ``tta``), what ``setup`` puts in ``{dir}`` first, the last
    line the command prints and its exit status."""

    name: str
    args: str
    message: str
    status: int = 2
    setup: Callable[[Path], None] | None = None


def _checkpoint(d: Path) -> None:
    import torch

    from tta.models import cifar_resnet

    torch.manual_seed(0)
    torch.save({"state_dict": cifar_resnet("resnet20").state_dict()}, d / "r20.th")


def _npz(name: str, x: np.ndarray, y: np.ndarray) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        np.savez(d / name, x=x, y=y)

    return make


def _folder(classes: list[str], image: Callable[[], object] | None = None) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        from PIL import Image

        _checkpoint(d)
        for c in classes:
            (d / "set" / c).mkdir(parents=True)
            picture = image() if image else Image.fromarray(np.zeros((32, 32, 3), np.uint8))
            picture.save(d / "set" / c / ("a.tif" if image else "a.png"))

    return make


def _float_image() -> object:
    from PIL import Image

    return Image.fromarray(np.full((32, 32), 200.0, np.float32))


def _notes(d: Path) -> None:
    (d / "notes.txt").write_text("my notes")


def _foreign_sweep(d: Path) -> None:
    (d / "grid.yaml").write_text("base: {method: source, corruptions: fog, severities: 5}\n")
    (d / "out").mkdir()
    (d / "out" / "results.csv").write_text("name,score\nx,1\n")


def _foreign_labels(d: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(d / "clean.npz", x=rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), y=np.arange(4))
    (d / "out" / "CIFAR-10-C").mkdir(parents=True)
    np.save(d / "out" / "CIFAR-10-C" / "labels.npy", np.zeros(20, np.uint8))


def _results(d: Path) -> None:
    from tta.run.schema import COLUMNS

    _notes(d)
    row = {c: 1 for c in COLUMNS} | {"method": "source", "model": "m", "corruption": "fog", "config_hash": "h",
                                     "accuracy": 50.0}
    (d / "r.csv").write_text(",".join(COLUMNS) + "\n" + ",".join(str(row[c]) for c in COLUMNS) + "\n")


def _text_file(name: str, text: str) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        (d / name).write_text(text)

    return make


def _both(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        for step in steps:
            step(d)

    return make


_X = np.zeros((4, 32, 32, 3), np.uint8)
_ADAPT = "adapt --method source --checkpoint {dir}/r20.th --arch resnet20 --no-progress --device cpu"
_NPZ = f"{_ADAPT} --out {{dir}}/r.csv --data npz:{{dir}}"

CASES: list[Case] = [
    Case("--out names a file that is not a results file (it is left untouched)",
         f"{_ADAPT} --data npz:{{dir}}/d.npz --out {{dir}}/notes.txt",
         "{dir}/notes.txt already exists and holds something other than results; choose another --out (it is left "
         "untouched)", setup=_both(_checkpoint, _notes, _npz("d.npz", _X, np.arange(4)))),
    Case("--out inside a file, not a folder", f"{_ADAPT} --data npz:{{dir}}/d.npz --out {{dir}}/notes.txt/r.csv",
         "cannot write {dir}/notes.txt/r.csv (no write permission in {dir}/notes.txt); choose another --out",
         setup=_both(_checkpoint, _notes, _npz("d.npz", _X, np.arange(4)))),
    Case("a .npz that is not a zip archive", f"{_NPZ}/d.npz",
         "{dir}/d.npz is not an .npz archive (not a zip file); write it with np.savez(path, x=images, y=labels)",
         setup=_both(_checkpoint, _text_file("d.npz", "not a zip"))),
    Case("a .npz without arrays", f"{_NPZ}/d.npz",
         "{dir}/d.npz holds no arrays but needs x and y; write it with np.savez(path, x=images, y=labels)",
         setup=_both(_checkpoint, lambda d: np.savez(d / "d.npz"))),
    Case("a .npz with no images", f"{_NPZ}/d.npz",
         "{dir}/d.npz holds no images (x is empty); pass a file with at least one image and label",
         setup=_both(_checkpoint, _npz("d.npz", _X[:0], np.arange(0)))),
    Case("int16 images", f"{_NPZ}/d.npz",
         "the images (x) of {dir}/d.npz are of type int16, which has no agreed brightness scale; save them as uint8 "
         "(0..255), uint16 (0..65535) or floats in [0, 1]",
         setup=_both(_checkpoint, _npz("d.npz", _X.astype(np.int16), np.arange(4)))),
    Case("float images in 0..255", f"{_NPZ}/d.npz",
         "the images (x) of {dir}/d.npz are floats, which must lie in [0, 1], but range from 200 to 200; divide "
         "them by 255",
         setup=_both(_checkpoint, _npz("d.npz", np.full((4, 32, 32, 3), 200.0, np.float32), np.arange(4)))),
    Case("negative labels", f"{_NPZ}/d.npz",
         "the labels (y) of {dir}/d.npz must be class indices >= 0, but 1 of 4 are negative (e.g. -1); map your "
         "classes to 0, 1, ...", setup=_both(_checkpoint, _npz("d.npz", _X, np.array([0, 1, 2, -1])))),
    Case("fractional labels", f"{_NPZ}/d.npz",
         "the labels (y) of {dir}/d.npz must be whole class indices, but 1 of 4 are not (e.g. 0.5); pass integer "
         "labels",
         setup=_both(_checkpoint, _npz("d.npz", _X, np.array([0, 1, 2, 0.5])))),
    Case("integer class folders with a stray folder", f"{_ADAPT} --out {{dir}}/r.csv --data folder:{{dir}}/set",
         "integer class labels (0, ...) and other names ('notes') are mixed in the class folders of {dir}/set; "
         "rename or move the stray entries (names starting with a dot are ignored)",
         setup=_folder(["0", "1", "10", "notes"])),
    Case("a float image outside [0, 1]", f"{_ADAPT} --out {{dir}}/r.csv --data folder:{{dir}}/set",
         "{dir}/set/0/a.tif is a floating-point image with values from 200 to 200, not in [0, 1]; save it as an 8- "
         "or 16-bit image", setup=_folder(["0"], _float_image)),
    Case("a data path that does not exist", f"{_ADAPT} --out {{dir}}/r.csv --data folder:{{dir}}/nowhere",
         "{dir}/nowhere does not exist; check the path given to --data folder:PATH", setup=_checkpoint),
    Case("an unknown method", "adapt --method tnet", "unknown method 'tnet'; choose one of: "),
    Case("a severity outside 1..5", f"{_ADAPT} --severities 7 --out {{dir}}/r.csv",
         "severities must be integers from 1 to 5, got 7", setup=_checkpoint),
    Case("a batch size of 0", "adapt --batch-size 0",
         "Invalid value for '--batch-size': 0 is not in the range x>=1."),
    Case("tta sweep --out holding a results.csv no sweep wrote",
         "sweep {dir}/grid.yaml --out {dir}/out --no-progress",
         "{dir}/out holds results.csv that tta sweep did not write; choose another --out (they are left untouched)",
         setup=_foreign_sweep),
    Case("tta sweep --out naming a file", "sweep {dir}/grid.yaml --out {dir}/grid.yaml --no-progress",
         "Invalid value for '--out': Directory '{dir}/grid.yaml' is a file.",
         setup=_text_file("grid.yaml", "base: {method: source}\n")),
    Case("tta report on a file that is not results", "report {dir}/notes.txt --out {dir}/report",
         "{dir}/notes.txt is not a results file (it lacks 21 of its columns, e.g. method, model, corruption); pass a "
         "file written by tta adapt or tta sweep",
         setup=_notes),
    Case("tta report --out inside a file", "report {dir}/r.csv --out {dir}/notes.txt/report",
         "cannot use {dir}/notes.txt/report (Not a directory); choose another path, or fix its permissions or free "
         "space", setup=_results),
    Case("tta corrupt --out inside a file",
         "corrupt --source npz:{dir}/clean.npz --out {dir}/notes.txt/data --corruptions fog --no-progress",
         "cannot use {dir}/notes.txt/data/CIFAR-10-C (Not a directory); choose another path, or fix its permissions "
         "or free space", setup=_both(_notes, lambda d: np.savez(d / "clean.npz", x=np.zeros((2, 8, 8, 3), np.uint8),
                                                                 y=np.arange(2)))),
    Case("tta corrupt into a folder holding labels it did not write",
         "corrupt --source npz:{dir}/clean.npz --out {dir}/out --corruptions fog --no-progress --device cpu",
         "{dir}/out/CIFAR-10-C already holds labels.npy that tta corrupt did not write; choose another --out "
         "directory (those files are left untouched)", setup=_foreign_labels),
]


def render() -> str:
    """The markdown table of ``CASES`` (what the documentation shows between its markers)."""
    lines = ["| Case | Command | Message (after `Error: `) | Exit status |", "|---|---|---|---|"]
    for case in CASES:
        args = case.args.replace("{dir}", "DIR").replace("|", "\\|")
        message = case.message.replace("{dir}", "DIR").replace("|", "\\|")
        lines.append(f"| {case.name} | `tta {args}` | {message}{'...' if message.endswith(': ') else ''} | "
                     f"{case.status} |")
    return "\n".join(lines)


def updated(text: str) -> str:
    """``text`` (the documentation page) with the table between the markers replaced by ``render()``."""
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{render()}\n{END}{tail}"


if __name__ == "__main__":
    DOC.write_text(updated(DOC.read_text()))
    sys.stdout.write(f"wrote the error table ({len(CASES)} rows) into {DOC}\n")
