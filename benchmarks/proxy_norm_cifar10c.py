"""Proxy Normalization against BatchNorm on ResNet-20: the table in docs/methods/proxy-norm.md.

    python benchmarks/proxy_norm_cifar10c.py --shared ../shared --warm WARM.pt [--rows ...] [--out FILE]

``WARM.pt`` is the checkpoint of ``tta warmup --method proxy-norm`` (docs/methods/proxy-norm.md). The corruptions are
generated once from the clean test head (``tta.data.generated``, the generator of ``tta adapt --generate``, data seed
0), so every row sees the same bytes. Rows (reset per corruption x severity): the BN model without adaptation, AdaBN
with batches of 200, the BN model one image at a time (adabn's source prior, N = 16, and tent on the sliding window),
the converted model one image at a time without adaptation and with tent (a step per image, or on a sliding window of
the last 16 or 64 images: ``tta adapt --batch-size 1``'s default), with ETA on the windows, and with stream-stats (both
models; its GroupNorm statistics from ``--source-data``); plus clean accuracy of both models. Prints one markdown table
(accuracy in percent, mean over the corruptions per severity) and writes the tidy results to ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import tta
from tta.data import BENCHMARK_CORRUPTIONS
from tta.data.generated import generated_stream
from tta.data.settings import WholeDomainCache
from tta.data.stream import Stream

# label -> (which model, method, settings, batch size, sliding window: 0 = a step per batch, even of one image)
ROWS: dict[str, tuple[str, str, dict[str, object], int, int]] = {
    "BN source (batch 200)": ("bn", "source", {}, 200, 0),
    "BN adabn (batch 200)": ("bn", "adabn", {}, 200, 0),
    "BN adabn prior N=16 (batch 1)": ("bn", "adabn", {"mode": "prior"}, 1, 0),
    "BN tent window 64 (batch 1)": ("bn", "tent", {}, 1, 64),
    "BN stream-stats (batch 1)": ("bn", "stream-stats", {}, 1, 0),
    "PN source (batch 1)": ("pn", "source", {}, 1, 0),
    "PN source (batch 200)": ("pn", "source", {}, 200, 0),  # batch-independent: the same predictions as batch 1
    "PN tent (batch 1)": ("pn", "tent", {}, 1, 0),
    "PN tent lr=1e-4 (batch 1)": ("pn", "tent", {"lr": 1e-4}, 1, 0),
    "PN tent window 64 (batch 1)": ("pn", "tent", {}, 1, 64),
    "PN tent window 16 (batch 1)": ("pn", "tent", {}, 1, 16),
    "PN eta window 64 (batch 1)": ("pn", "eta", {}, 1, 64),
    "PN eta window 16 (batch 1)": ("pn", "eta", {}, 1, 16),
    "PN stream-stats (batch 1)": ("pn", "stream-stats", {}, 1, 0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--warm", type=Path, required=True,
                        help="checkpoint written by tta warmup --method proxy-norm (its rows are skipped if absent)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clean", default="test_exact_head.npz", help="clean test images the corruptions start from")
    parser.add_argument("--corruptions", default=",".join(BENCHMARK_CORRUPTIONS))
    parser.add_argument("--severities", default="5,3")
    parser.add_argument("--n-examples", type=int, help="images per corruption x severity (default: all)")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row labels to run")
    parser.add_argument("--source-data", default=None,
                        help="clean source images for stream-stats (default: npz of train_jpeg_10k.npz in --shared)")
    parser.add_argument("--out", type=Path, default=Path("results/proxy_norm_table.csv"))
    args = parser.parse_args()

    clean = args.shared / "data" / "cifar10" / args.clean
    models = {"bn": tta.load_model(checkpoint=args.shared / "models" / f"cifar10_{args.arch}.th", arch=args.arch)}
    if args.warm.is_file():
        models["pn"] = tta.load_model(checkpoint=args.warm)
    with np.load(clean) as data:
        x, y = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(data["y"])
    with torch.no_grad():
        for name, model in models.items():
            pred = torch.cat([model(x[i:i + 200]).argmax(1) for i in range(0, len(y), 200)])
            print(f"clean accuracy ({name}): {100 * float((pred == y).float().mean()):.2f}%", flush=True)

    stream = generated_stream("cifar10c", corruptions=args.corruptions.split(","),
                              severities=[int(s) for s in args.severities.split(",")],
                              n_examples=args.n_examples, batch_size=200, seed=0, source=f"npz:{clean}")
    source = WholeDomainCache(stream.source, capacity=len(stream.domains))
    start = time.perf_counter()
    for domain in stream.domains:  # generated once, up front: no row's timing includes generation
        source.load(domain, np.arange(1))
    print(f"generated {len(stream.domains)} domains in {time.perf_counter() - start:.0f} s", flush=True)

    frames: list[pd.DataFrame] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for label in args.rows.split(","):
        which, method, settings, batch_size, window = ROWS[label]
        if which not in models:
            print(f"{label}: skipped ({args.warm} does not exist)")
            continue
        rows = Stream(source, stream.domains, args.n_examples, batch_size=batch_size)
        start = time.perf_counter()
        done: list[dict[str, object]] = []

        def save(row: dict[str, object], label: str = label, done: list[dict[str, object]] = done) -> None:
            """Rewrite the CSV after every corruption x severity, so an interrupted run keeps what it finished."""
            done.append({**row, "method": label})
            pd.concat([*frames, pd.DataFrame(done)], ignore_index=True).to_csv(args.out, index=False)

        source_data = args.source_data or f"npz:{args.shared / 'data' / 'cifar10' / 'train_jpeg_10k.npz'}"
        adapted = tta.adapt(models[which], method, window=window, source_data=source_data, **settings)
        df = tta.evaluate(adapted, rows, "domain", device=args.device, model_name=args.arch, seed=1, on_result=save)
        print(f"{label}: mean {df.accuracy.mean():.2f}% ({time.perf_counter() - start:.0f} s)", flush=True)
        frames.append(df.assign(method=label))
        results = pd.concat(frames, ignore_index=True)
    if not frames:
        return
    table = results.pivot_table(index="method", columns="severity", values="accuracy", aggfunc="mean")
    severities = sorted(table.columns, reverse=True)
    print("| row | " + " | ".join(f"severity {s}" for s in severities) + " |")
    print("|---" * (len(severities) + 1) + "|")
    for label in [r for r in args.rows.split(",") if r in table.index]:
        print(f"| {label} | " + " | ".join(f"{table.loc[label, s]:.1f}" for s in severities) + " |")


if __name__ == "__main__":
    main()
