"""Tent on a real-image folder read class by class (``order="file"``) and shuffled (the default).

Builds, in a temporary folder, an ImageFolder of the first ``--per-class`` JPEG-decoded CIFAR-10 test images of each
class (a real, mild distribution shift for a CIFAR ResNet; nothing is written into the repository), then adapts
the pretrained ResNet-20 with Tent on it, once in file order (class by class, what a folder gave before shuffling
became the default) and once shuffled per seed, and the source model for reference. Writes one row per run to
``--out`` (a small CSV committed with the documentation; ``python docs/gen_tables.py`` then regenerates the tables
of README.md and ``docs/guides/data-safety.md`` from it).

    python benchmarks/folder_order.py --shared ../shared
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "docs" / "results" / "folder_order.csv"
COMMAND = "# command: python benchmarks/folder_order.py --shared ../shared\n"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def build_folder(shared: Path, root: Path, per_class: int) -> Path:
    """``root/<class name>/<i>.png``: the first ``per_class`` JPEG-decoded test images of each class."""
    from PIL import Image

    with np.load(shared / "data" / "cifar10" / "test_jpeg.npz") as data:
        x, y = data["x"], data["y"]
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i, row in enumerate(np.flatnonzero(y == label)[:per_class]):
            Image.fromarray(x[row]).save(root / name / f"{i:04d}.png")
    return root


def measure(shared: Path, per_class: int, batch_size: int, seeds: list[int]) -> pd.DataFrame:
    import torch

    import tta
    from tta.data.sources import data_stream

    torch.set_num_threads(1)
    model = tta.load_model(checkpoint=shared / "models" / "cifar10_resnet20.th", arch="resnet20")
    rows = []
    with tempfile.TemporaryDirectory(prefix="tta-folder-order-") as tmp:
        folder = build_folder(shared, Path(tmp) / "cifar10-jpeg", per_class)
        runs = [("source", "shuffle", seeds[0]), ("tent", "file", seeds[0])] + [("tent", "shuffle", s) for s in seeds]
        for method, order, seed in runs:
            stream = data_stream(f"folder:{folder}", "cifar10c", None, batch_size=batch_size, seed=seed, order=order)
            stream.workers = 0
            started = time.perf_counter()
            df = tta.evaluate(tta.adapt(model, method), stream, device="cpu", seed=seed)
            rows.append({"method": method, "order": order, "seed": seed, "n_images": int(df.n.sum()),
                         "batch_size": batch_size, "accuracy": round(float(df.accuracy.iloc[0]), 2),
                         "seconds": round(time.perf_counter() - started, 1)})
            print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, required=True, help="folder holding data/cifar10 and models/")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--out", type=Path, default=CSV)
    args = parser.parse_args()
    results = measure(args.shared, args.per_class, args.batch_size, [int(s) for s in args.seeds.split(",")])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(COMMAND + results.to_csv(index=False))


if __name__ == "__main__":
    main()
