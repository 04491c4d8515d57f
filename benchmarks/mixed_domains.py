"""Mixed-domain benchmark: source, adabn, tent, dsbn and context-norm on ``per-domain`` and ``mixed`` streams.

The domains are built in memory from the shared CIFAR-10 test images (never written to disk): the first ``--n``
images of ``--clean`` corrupted with ``tta.corruptions`` at ``--severity`` (seeded, the bytes ``tta corrupt``
would write). The model is a pretrained CIFAR ResNet from the shared folder. Prints a table of mean accuracy over
the domains per method and setting, and writes every (method, setting, corruption) row to ``--out``.

    python benchmarks/mixed_domains.py --shared ../shared --n 1000 --out results/mixed_domains.csv

CPU-frugal by default: ResNet-20, 5 corruptions x 1,000 images, one thread.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import tta
from tta.data.generated import GeneratedSource
from tta.data.settings import SettingStream, WholeDomainCache
from tta.data.stream import Domain

CORRUPTIONS = ("gaussian_noise", "defocus_blur", "snow", "contrast", "jpeg_compression")

# label -> (method, settings)
METHODS: dict[str, tuple[str, dict[str, object]]] = {
    "source": ("source", {}),
    "adabn": ("adabn", {}),
    "adabn-cumulative-prior": ("adabn", {"mode": "cumulative_prior"}),
    "tent": ("tent", {}),
    "dsbn (oracle)": ("dsbn", {}),
    "dsbn+tent (oracle)": ("dsbn", {"tent": True}),
    "context-norm (oracle)": ("context-norm", {}),
    "context-norm (oracle, learned)": ("context-norm", {"learned": True}),
    "context-norm (infer)": ("context-norm", {"contexts": "infer"}),
    "dsbn (infer)": ("dsbn", {"contexts": "infer"}),
}


def build_source(clean: Path, n: int, corruptions: list[str], severity: int, seed: int) -> WholeDomainCache:
    """The first ``n`` images of ``clean`` (an .npz with x uint8 NHWC, y), each corruption generated once, now."""
    with np.load(clean) as data:
        x, y = data["x"][:n], data["y"][:n]
    source = WholeDomainCache(GeneratedSource(x, y, seed=seed), capacity=len(corruptions))
    for c in corruptions:  # generate every domain up front, so the methods' timings exclude it
        started = time.perf_counter()
        source.load(Domain(c, severity), np.arange(1))
        print(f"generated {c} s{severity}: {len(y)} images in {time.perf_counter() - started:.1f}s", flush=True)
    return source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--clean", default="test_exact_head", help="test_exact_head (1,017 images) or test_jpeg")
    parser.add_argument("--arch", default="resnet20", choices=["resnet20", "resnet32"])
    parser.add_argument("--n", type=int, default=1000, help="images per corruption")
    parser.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS))
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--settings", nargs="+", default=["per-domain", "mixed"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/mixed_domains.csv"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = tta.load_model(checkpoint=args.shared / "models" / f"cifar10_{args.arch}.th", arch=args.arch)
    source = build_source(args.shared / "data" / "cifar10" / f"{args.clean}.npz", args.n, args.corruptions,
                          args.severity, args.seed)
    source_data = f"npz:{args.shared / 'data' / 'cifar10' / 'train_jpeg_10k.npz'}"
    rows = []
    for setting in args.settings:
        stream = SettingStream(source, args.corruptions, [args.severity], setting=setting,
                               batch_size=args.batch_size, seed=args.seed)
        for label in args.methods:
            method, overrides = METHODS[label]
            started = time.perf_counter()
            clean = source_data if overrides.get("contexts") == "infer" else None  # inference calibrates on it
            df = tta.evaluate(tta.adapt(model, method, source_data=clean, **overrides), stream, "domain", device="cpu",
                              model_name=args.arch, seed=args.seed)
            df.insert(0, "label", label)
            rows.append(df)
            print(f"{setting:10s} {label:30s} {df['accuracy'].mean():6.2f}% "
                  f"({time.perf_counter() - started:.1f}s)", flush=True)
    results = pd.concat(rows, ignore_index=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results.to_csv(args.out, index=False)
    table = results.pivot_table(index="label", columns="setting", values="accuracy", aggfunc="mean", sort=False)
    print(f"\nmean accuracy (%) over {len(args.corruptions)} corruptions, severity {args.severity}, "
          f"{args.n} images each, batch {args.batch_size}, {args.arch}:")
    print(table.round(2).to_markdown() if _has_tabulate() else table.round(2).to_string())
    print(f"\nrows written to {args.out}")


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
