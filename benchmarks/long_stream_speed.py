"""Throughput of a long stream generated on the fly against the same method on a stored stream of the same size.

The CCC-style stream generates every batch (two corruptions per image) on the model's device as it goes; the
stored stream holds the same images, generated beforehand, in memory (as a per-domain stream read from files
would). Both run the same method with the same batch size in one process, alternately (``--repeats`` times each,
the fastest counting); the ratio of their images per second says whether generation is the bottleneck.

    OMP_NUM_THREADS=1 python benchmarks/long_stream_speed.py --images 4000 --method tent
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import tta
from tta.data.ccc import CCCStream
from tta.data.stream import Domain, Stream
from tta.run.engine import evaluate

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"


class Stored:
    """A domain source over images held in memory (uint8 NCHW)."""

    label = "stored"

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def size(self, domain: Domain) -> int:
        return len(self.y)

    def load(self, domain: Domain, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(index)
        return self.x[idx], self.y[idx]


def main() -> None:
    """Run both streams and print their throughputs and ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--method", default="tent")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--shared", type=Path, default=SHARED)
    parser.add_argument("--cache", type=Path, default=Path("data"))
    parser.add_argument("--repeats", type=int, default=2, help="runs of each stream (the fastest counts)")
    parser.add_argument("--csv", type=Path, help="append the result as a row to this CSV")
    args = parser.parse_args()
    device = tta.run.engine.resolve_device(args.device)
    net = tta.load_model(None, dataset="cifar10c", checkpoint=str(args.shared / "models/cifar10_resnet20.th"),
                         arch="resnet20").to(device).eval()
    clean = np.load(args.shared / "data/cifar10/test_jpeg.npz")
    ccc = CCCStream(clean["x"], clean["y"], net, length=args.images, speed=2 * args.batch_size,
                    batch_size=args.batch_size, window=args.batch_size, device=device, cache=args.cache)
    batches = list(ccc)  # also calibrates the pairs the stream visits, before anything is timed
    stored = Stream(Stored(torch.cat([b.x for b in batches]), torch.cat([b.y for b in batches])),
                    [Domain(name="stored")], batch_size=args.batch_size)
    speeds: dict[str, float] = {}
    for _ in range(args.repeats):  # alternated, so that a change of the machine's load hits both alike
        for name, stream in (("stored", stored), ("generated", ccc)):
            started = time.perf_counter()
            evaluate(tta.adapt(net, method=args.method), stream, "never", device=device, seed=0)
            speeds[name] = max(speeds.get(name, 0.0), args.images / (time.perf_counter() - started))
            print(f"{name:9s} {args.images / (time.perf_counter() - started):8.1f} images/s", flush=True)
    ratio = speeds["generated"] / speeds["stored"]
    print(f"ratio generated / stored: {ratio:.3f} ({args.method}, {args.images} images, batch {args.batch_size}, "
          f"{device})")
    if args.csv is not None:
        import pandas as pd

        row = pd.DataFrame([{"method": args.method, "images": args.images, "batch_size": args.batch_size,
                             "device": str(device), "stored_images_per_second": round(speeds["stored"], 1),
                             "generated_images_per_second": round(speeds["generated"], 1), "ratio": round(ratio, 3)}])
        new = not args.csv.is_file()
        if new:
            args.csv.write_text(f"# command: OMP_NUM_THREADS=1 python benchmarks/long_stream_speed.py --images "
                                f"{args.images} --method {args.method} --csv {args.csv}\n")
        row.to_csv(args.csv, mode="a", header=new, index=False)


if __name__ == "__main__":
    main()
