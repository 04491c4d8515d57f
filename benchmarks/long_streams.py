"""The measurements of docs/guides/long-streams.md: recurring, online and CCC-style runs on a CIFAR ResNet.

Each run is one ``tta adapt`` with ``--resume`` into ``OUT/<part>/<run>.csv``, so the script can be killed and
started again at any time: finished runs are skipped, a long run continues from its last checkpoint.

    OMP_NUM_THREADS=1 python benchmarks/long_streams.py --part recurring --out runs/long
    OMP_NUM_THREADS=1 python benchmarks/long_streams.py --part recurring-192 --out runs/long   # Tent, 192 / corruption
    OMP_NUM_THREADS=1 python benchmarks/long_streams.py --part online --out runs/long
    OMP_NUM_THREADS=1 python benchmarks/long_streams.py --part ccc --out runs/long
    OMP_NUM_THREADS=1 python benchmarks/long_streams.py --part ccc-long --out runs/long   # 300,000 images each
    OMP_NUM_THREADS=1 python benchmarks/long_streams.py --part ccc-baselines --out runs/long

``benchmarks/long_streams_tables.py`` then turns the results into the CSVs of docs/results and the tables of the
page.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
# in the order they run: the cheap and the most asked-about first
RECURRING = ["source", "tent", "eta", "rdumb", "sar", "roid", "rotta", "eata", "adabn", "tent+guard"]
ONLINE = ["source", "adabn", "lame", "tent", "eta", "sar", "roid", "rotta", "eata", "rdumb", "deyo", "tent+guard",
          "context-norm", "stream-stats", "dsbn", "cotta", "memo"]
CCC = ["source", "tent", "eta", "rdumb", "roid", "tent+guard"]


def base(shared: Path) -> list[str]:
    """Options shared by every run: ResNet-20, corruptions generated from the JPEG-decoded CIFAR-10 test set."""
    return ["--checkpoint", str(shared / "models/cifar10_resnet20.th"), "--arch", "resnet20", "--generate",
            "--clean", f"npz:{shared / 'data/cifar10/test_jpeg.npz'}", "--severities", "5", "--no-progress",
            "--resume", "--source-data", f"npz:{shared / 'data/cifar10/train_jpeg_10k.npz'}"]


def method_options(name: str) -> list[str]:
    """``tent+guard`` is Tent with ``--guard default``."""
    method, _, guard = name.partition("+")
    return ["--method", method, *(["--guard", "default"] if guard else [])]


def runs(part: str) -> list[tuple[str, list[str]]]:
    """(run name, options) of one part."""
    if part == "recurring":
        return [(m, [*method_options(m), "--setting", "recurring", "--visits", "20", "--n-examples", "32",
                     "--batch-size", "32"]) for m in RECURRING]
    if part == "recurring-192":  # Tent with 6 times the images, at PeTTA's batch size
        return [("tent", [*method_options("tent"), "--setting", "recurring", "--visits", "20", "--n-examples",
                          "192", "--batch-size", "64"])]
    if part == "online":
        return [(f"{m}_{setting}_{protocol}", [*method_options(m), "--setting", setting, "--protocol", protocol,
                                               "--n-examples", "100", "--batch-size", "20",
                                               *(["--reset", "never"] if setting == "continual" else [])])
                for m in ONLINE for setting in ("per-domain", "continual") for protocol in ("offline", "online")]
    if part in ("ccc", "ccc-long"):
        length = "20000" if part == "ccc" else "300000"
        return [(m, [*method_options(m), "--setting", "ccc", "--baseline", "20", "--speed", "2000",
                     "--length", length, "--accuracy-window", "1000", "--batch-size", "200"])
                for m in (CCC if part == "ccc" else CCC[1:])]
    if part == "ccc-baselines":  # the source model alone on the three difficulties
        return [(f"source_{b}", ["--method", "source", "--setting", "ccc", "--baseline", b, "--speed", "2000",
                                 "--length", "10000", "--accuracy-window", "1000", "--batch-size", "200"])
                for b in ("40", "20", "0")]
    raise SystemExit(f"unknown part {part!r}: recurring, recurring-192, online, ccc, ccc-long or ccc-baselines")


def main() -> None:
    """Run one part's runs one after the other (see the module doc)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", required=True,
                        choices=["recurring", "recurring-192", "online", "ccc", "ccc-long", "ccc-baselines"])
    parser.add_argument("--out", default="runs/long", type=Path)
    parser.add_argument("--shared", default=SHARED, type=Path)
    parser.add_argument("--only", nargs="*", help="run only these run names")
    args = parser.parse_args()
    folder = args.out / args.part
    folder.mkdir(parents=True, exist_ok=True)
    for name, options in runs(args.part):
        if args.only and name not in args.only:
            continue
        command = [sys.executable, "-m", "tta.cli", "adapt", *base(args.shared), *options,
                   "--data-dir", str(args.out / "data"), "--out", str(folder / f"{name}.csv")]
        print(" ".join(command[1:]), flush=True)
        subprocess.run(command, check=False)


if __name__ == "__main__":
    main()
