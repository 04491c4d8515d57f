"""AFN against source, AdaBN and Tent on ResNet-20: the table in docs/methods/afn.md.

    python benchmarks/afn_cifar10c.py --shared ../shared [--epochs 5] [--n-examples 1000] [--warm FILE]

1. Warm-up: AFN layers of the pretrained ResNet-20 trained with cross-entropy on ``train_jpeg_10k.npz`` (skipped
   when ``--warm`` already exists; the checkpoint is written there otherwise), timing it on the chosen device.
2. Evaluation (batch 200, reset per corruption x severity): source, adabn, tent, afn without warm-up and afn with
   it, on corruptions generated on the fly from the clean test images (``tta.data.generated``) at severities 1, 3
   and 5, or on ``test_jpeg.npz`` with ``--jpeg``.
Prints one markdown table (accuracy in percent, rows = severity) and writes the tidy results to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd

import tta
from tta.data import BENCHMARK_CORRUPTIONS
from tta.data.arrays import npz_stream
from tta.data.generated import generated_stream
from tta.data.settings import WholeDomainCache
from tta.data.stream import Stream
from tta.warmup import warmup_afn

METHODS: list[tuple[str, str, dict[str, object]]] = [
    ("source", "source", {}),
    ("adabn", "adabn", {}),
    ("tent", "tent", {}),
    ("afn (no warm-up)", "afn", {}),
    ("afn (warm-up)", "afn", {"afn_checkpoint": None}),  # filled with the warm-up file
]


def make_stream(args: argparse.Namespace, shared: Path) -> Stream:
    """Corruptions generated from the clean test head, each domain once and up front; or the JPEG test set."""
    if args.jpeg:
        return npz_stream(shared / "data" / "cifar10" / "test_jpeg.npz", batch_size=200, n_examples=args.n_examples)
    stream = generated_stream("cifar10c", corruptions=args.corruptions.split(","),
                              severities=[int(s) for s in args.severities.split(",")],
                              n_examples=args.n_examples, batch_size=200, seed=0,
                              source=f"npz:{shared / 'data' / 'cifar10' / args.clean}")
    source = WholeDomainCache(stream.source, capacity=len(stream.domains))
    for domain in stream.domains:  # so that every method sees the same bytes and no timing includes generation
        source.load(domain, np.arange(1))
    return Stream(source, stream.domains, args.n_examples, batch_size=200)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--warm", type=Path, default=Path("results/afn_resnet20_warmup.pt"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-examples", type=int, default=1000)
    parser.add_argument("--clean", default="test_exact_head.npz", help="clean test images the corruptions start from")
    parser.add_argument("--corruptions", default=",".join(BENCHMARK_CORRUPTIONS))
    parser.add_argument("--severities", default="1,3,5")
    parser.add_argument("--jpeg", action="store_true", help="evaluate on test_jpeg.npz instead of corruptions")
    parser.add_argument("--methods", default=",".join(label for label, _, _ in METHODS),
                        help="comma-separated labels of the table's columns, or 'warmup' to only warm up")
    parser.add_argument("--out", type=Path, default=Path("results/afn_table.csv"))
    args = parser.parse_args()

    shared = args.shared
    wanted = set(args.methods.split(","))
    model = tta.load_model(checkpoint=shared / "models" / f"cifar10_{args.arch}.th", arch=args.arch)
    if not args.warm.is_file() and (args.methods == "warmup" or "afn (warm-up)" in wanted):
        with np.load(shared / "data" / "cifar10" / "train_jpeg_10k.npz") as data:
            x, y = data["x"], data["y"]
        start = time.perf_counter()
        warm = warmup_afn(model, x, y, epochs=args.epochs, device=args.device, base=f"{args.arch}:shared")
        print(f"warm-up: {args.epochs} epochs x {len(y)} images in {(time.perf_counter() - start) / 60:.1f} min on "
              f"{args.device}; per epoch: {[round(h['seconds'], 1) for h in warm.history]} s cumulative, "
              f"loss {[round(h['loss'], 4) for h in warm.history]}")
        warm.save(args.warm)

    frames = []
    stream = make_stream(args, shared)
    for label, method, overrides in METHODS:
        if label not in wanted:
            continue
        settings = {k: str(args.warm) if k == "afn_checkpoint" else v for k, v in overrides.items()}
        start = time.perf_counter()
        df = tta.evaluate(tta.adapt(model, method, **settings), stream, "domain",
                          device=args.device, model_name=args.arch, seed=1)
        print(f"{label}: mean {df.accuracy.mean():.2f}% ({time.perf_counter() - start:.0f} s)", flush=True)
        frames.append(df.assign(method=label))
    if not frames:
        return
    results = pd.concat(frames, ignore_index=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results.to_csv(args.out, index=False)
    table = results.pivot_table(index="severity", columns="method", values="accuracy", aggfunc="mean")
    columns = [label for label, _, _ in METHODS if label in wanted]
    print("| severity | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for severity, row in table[columns].iterrows():
        print(f"| {severity} | " + " | ".join(f"{row[c]:.1f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
