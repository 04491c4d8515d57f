"""What a guard costs: images per second of the same method with and without ``guard=...`` on the same batches.

    python benchmarks/guard_cost.py [--device auto] [--arch resnet20] [--methods source,tent] [--guard default]

Both sides go through ``tta.adapt`` + ``tta.evaluate`` on the same uint8 batches (random images, random weights:
speed does not depend on them); the guarded side calibrates on 512 random clean images before the clock starts.
Runs alternate (plain, guarded, plain, ...) and the median of --repeats runs is reported, with the ratio
guarded / plain (1.0: free).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn

import tta
from tta.data.arrays import array_stream
from tta.devices import resolve_device
from tta.models import cifar_resnet
from tta.models.zoo import CIFAR_RESNET_NORM, normalized


def run(adapted: tta.AdaptedModel, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Images per second of one pass over the batches (wall clock, device synchronised)."""
    stream = array_stream(x, y, batch_size=batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    tta.evaluate(adapted, stream, reset="never", device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--n-images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="source,tent")
    parser.add_argument("--guard", default="default")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    torch.manual_seed(0)
    model: nn.Module = normalized(cifar_resnet(args.arch), *CIFAR_RESNET_NORM).eval()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (args.n_images, 32, 32, 3), dtype=np.uint8))
    y = torch.from_numpy(rng.integers(0, 10, args.n_images))
    clean = (rng.integers(0, 256, (512, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 512))
    print(f"device={device} arch={args.arch} images={args.n_images} batch={args.batch_size} repeats={args.repeats} "
          f"guard={args.guard} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'method':8s} {'plain img/s':>12s} {'guarded img/s':>14s} {'ratio':>6s}")
    run(tta.adapt(model, "source"), x, y, args.batch_size, device)  # warm-up
    for method in args.methods.split(","):
        plain, guarded = [], []
        for _ in range(args.repeats):
            plain.append(run(tta.adapt(model, method), x, y, args.batch_size, device))
            adapted = tta.adapt(model, method, guard=args.guard, source_data=clean)  # calibrates here
            guarded.append(run(adapted, x, y, args.batch_size, device))
        p, g = statistics.median(plain), statistics.median(guarded)
        print(f"{method:8s} {p:12.0f} {g:14.0f} {g / p:6.3f}", flush=True)


if __name__ == "__main__":
    main()
