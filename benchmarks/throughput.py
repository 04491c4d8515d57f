"""Throughput of the engine against a minimal hand-written loop doing the same computation on the same data.

    python benchmarks/throughput.py [--device auto] [--arch resnet20] [--n-images 4000] [--batch-size 200]

For each method (--methods, comma-separated), both sides take the same uint8 batches from host memory, move each to
the device once, convert to [0, 1] floats and run the same model computation; the hand-written loop
(benchmarks/hand_loops/<method>.py) has no input checks, no reset logic, no rollback and no accounting beyond a
correct count. After --warmup discarded runs of each side, the two sides alternate, each repeat in the opposite
order of the one before (engine, loop, loop, engine, ...). Reported: the median images per second of each side
over --repeats runs, and the median (and range) of the ratio engine / loop of the runs taken side by side.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import tta
import tta.methods
from tta.data.arrays import array_stream
from tta.engine import resolve_device
from tta.models import cifar_resnet
from tta.models.zoo import CIFAR_RESNET_NORM, normalized


def hand_loop(method: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
              device: torch.device, source: tuple[torch.Tensor, torch.Tensor] | None) -> float:
    """The computation of ``method`` written out by hand (benchmarks/hand_loops); returns images per second."""
    module = importlib.import_module(f"hand_loops.{method.replace('-', '_')}")
    step = module.make(copy.deepcopy(model).to(device), device, source)
    correct = torch.zeros((), dtype=torch.long, device=device)
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(x), batch_size):
        # Same layout as read from CIFAR-C files: uint8 NHWC on the host, permuted to (N, C, H, W) on the device.
        xb = x[i:i + batch_size].to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        yb = y[i:i + batch_size].to(device, non_blocking=True)
        correct += (step(xb).argmax(1) == yb).sum()
    sync(device)
    return len(x) / (time.perf_counter() - start)


def engine_run(method: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
               device: torch.device, source: tuple[torch.Tensor, torch.Tensor] | None) -> float:
    """The same through ``tta.adapt`` + ``tta.evaluate``; returns images per second (wall clock)."""
    adapted = tta.adapt(model, method, source_data=source)
    stream = array_stream(x, y, batch_size=batch_size)
    sync(device)
    start = time.perf_counter()
    tta.evaluate(adapted, stream, reset="never", device=device)
    sync(device)
    return len(x) / (time.perf_counter() - start)


sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/hand_loops


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--n-images", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="discarded runs of each side per method")
    parser.add_argument("--methods", default="source,adabn,tent")
    args = parser.parse_args()

    device = resolve_device(args.device)
    torch.manual_seed(0)
    model = normalized(cifar_resnet(args.arch), *CIFAR_RESNET_NORM).eval()
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(0, 256, (args.n_images, 32, 32, 3), dtype=np.uint8))
    y = torch.from_numpy(rng.integers(0, 10, args.n_images))
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    print(f"device={device} arch={args.arch} images={args.n_images} batch={args.batch_size} "
          f"repeats={args.repeats} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'method':8s} {'engine img/s':>13s} {'loop img/s':>11s} {'ratio':>6s} [range over repeats]")
    # Clean source data for the methods that need it (EATA's Fisher): random images of the same kind.
    source = (torch.from_numpy(rng.integers(0, 256, (512, 32, 32, 3), dtype=np.uint8)).permute(0, 3, 1, 2).float()
              .div(255), torch.from_numpy(rng.integers(0, 10, 512)))
    for method in args.methods.split(","):
        needs = tta.methods.get_method(method).requires.source_data
        src = source if needs else None
        sides = {"engine": engine_run, "loop": hand_loop}
        for _ in range(args.warmup):  # discarded: first-call costs (allocator, thread pools, autograd)
            for run in sides.values():
                run(method, model, x, y, args.batch_size, device, src)
        speed: dict[str, list[float]] = {"engine": [], "loop": []}
        for i in range(args.repeats):  # alternate which side goes first, so that drifts in load cancel
            for side in (("engine", "loop") if i % 2 == 0 else ("loop", "engine")):
                speed[side].append(sides[side](method, model, x, y, args.batch_size, device, src))
        ratios = [e / h for e, h in zip(speed["engine"], speed["loop"], strict=True)]
        e, h = statistics.median(speed["engine"]), statistics.median(speed["loop"])
        print(f"{method:8s} {e:13.1f} {h:11.1f} {statistics.median(ratios):6.3f} "
              f"[{min(ratios):.3f}, {max(ratios):.3f}]")

if __name__ == "__main__":
    main()
