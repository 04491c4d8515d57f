"""Throughput of the engine against a minimal hand-written loop doing the same computation on the same data.

    python benchmarks/throughput.py [--device auto] [--arch resnet20] [--n-images 4000] [--batch-size 200]
        [--checkpoint resnet20.th --images test.npz --source-images train.npz] [--methods source,adabn,tent]
        [--set NAME=VALUE ...]

For each method (--methods, comma-separated), both sides take the same uint8 batches from host memory, move each to
the device once, convert to [0, 1] floats and run the same model computation; the hand-written loop
(benchmarks/hand_loops/<method>.py) has no input checks, no reset logic, no rollback and no accounting beyond a
correct count. ``--set`` changes a setting on both sides (``tta.adapt``'s overrides, and the same keyword to the
loop's ``make``), e.g. ``--set warmup_samples=2000`` shortens RMT's source warm-up, done before the timing.
After --warmup discarded runs of each side, the two sides alternate, each repeat in the opposite
order of the one before (engine, loop, loop, engine, ...). Reported: the median images per second of each side
over --repeats runs, and the median (and range) of the ratio engine / loop of the runs taken side by side, with
the accuracy of each side (equal up to float rounding for methods without random augmentation: the check that
both compute the same thing). Random weights and images need no files, but methods that select samples by entropy
(eta, eata, deyo) then rarely update; pass real weights and images for figures to report.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

import tta
import tta.methods
from tta.data.arrays import array_stream
from tta.devices import resolve_device
from tta.models import cifar_resnet
from tta.models.zoo import CIFAR_RESNET_NORM, normalized


def hand_loop(method: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
              device: torch.device, source: tuple[torch.Tensor, torch.Tensor] | None,
              settings: dict[str, Any]) -> tuple[float, float]:
    """The computation of ``method`` written out by hand (benchmarks/hand_loops): (images per second, accuracy)."""
    module = importlib.import_module(f"hand_loops.{method.replace('-', '_')}")
    step = module.make(copy.deepcopy(model).to(device), device, source, **settings)
    correct = torch.zeros((), dtype=torch.long, device=device)
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(x), batch_size):
        # Same layout as read from CIFAR-C files: uint8 NHWC on the host, permuted to (N, C, H, W) on the device.
        xb = x[i:i + batch_size].to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        yb = y[i:i + batch_size].to(device, non_blocking=True)
        correct += (step(xb).argmax(1) == yb).sum()
    sync(device)
    return len(x) / (time.perf_counter() - start), 100.0 * int(correct) / len(x)


def engine_run(method: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
               device: torch.device, source: tuple[torch.Tensor, torch.Tensor] | None,
               settings: dict[str, Any]) -> tuple[float, float]:
    """The same through ``tta.adapt`` + ``tta.evaluate``: (images per second (wall clock), accuracy)."""
    adapted = tta.adapt(model, method, source_data=source, **settings)
    stream = array_stream(x, y, batch_size=batch_size)
    sync(device)
    start = time.perf_counter()
    rows = tta.evaluate(adapted, stream, reset="never", device=device)
    sync(device)
    return len(x) / (time.perf_counter() - start), float(rows["accuracy"].iloc[0])


sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/hand_loops


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--arch", default="resnet20",
                        help="CIFAR ResNet depth; 'none' with --checkpoint: a self-describing model file (e.g. a ViT)")
    parser.add_argument("--n-images", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1, help="discarded runs of each side per method")
    parser.add_argument("--methods", default="source,adabn,tent")
    parser.add_argument("--checkpoint", help="CIFAR ResNet weights for --arch (default: random weights)")
    parser.add_argument("--images", help="npz with uint8 NHWC 'x' and labels 'y' (default: random images)")
    parser.add_argument("--source-images", help="npz of clean images for methods that need source data "
                        "(default: 512 random images)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a method setting for both sides (a YAML value), e.g. warmup_samples=2000; repeatable")
    args = parser.parse_args()
    settings = {k: yaml.safe_load(v) for k, _, v in (item.partition("=") for item in args.set)}

    device = resolve_device(args.device)
    torch.manual_seed(0)
    if args.checkpoint:
        model = tta.load_model(checkpoint=args.checkpoint, arch=None if args.arch == "none" else args.arch)
    else:  # random weights: fine for speed, but sample-selecting methods (eta, eata, deyo) then update rarely
        model = normalized(cifar_resnet(args.arch), *CIFAR_RESNET_NORM).eval()
    rng = np.random.default_rng(0)
    if args.images:
        x, y = load_npz(args.images, args.n_images)
    else:
        x = torch.from_numpy(rng.integers(0, 256, (args.n_images, 32, 32, 3), dtype=np.uint8))
        y = torch.from_numpy(rng.integers(0, 10, args.n_images))
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    print(f"device={device} arch={args.arch} weights={args.checkpoint or 'random'} images={args.images or 'random'} "
          f"n={len(x)} batch={args.batch_size} repeats={args.repeats} torch={torch.__version__} "
          f"threads={torch.get_num_threads()}")
    print(f"{'method':8s} {'engine img/s':>13s} {'loop img/s':>11s} {'ratio':>6s} {'[range over repeats]':>16s}  "
          "accuracy engine / loop")
    # Clean source data for the methods that need it (EATA's Fisher).
    sx, sy = (load_npz(args.source_images, 2000) if args.source_images else
              (torch.from_numpy(rng.integers(0, 256, (512, 32, 32, 3), dtype=np.uint8)),
               torch.from_numpy(rng.integers(0, 10, 512))))
    source = (sx.permute(0, 3, 1, 2).float().div(255), sy)
    for method in args.methods.split(","):
        needs = tta.methods.get_method(method).requires.source_data
        src = source if needs else None
        sides = {"engine": engine_run, "loop": hand_loop}
        for _ in range(args.warmup):  # discarded: first-call costs (allocator, thread pools, autograd)
            for run in sides.values():
                run(method, model, x, y, args.batch_size, device, src, settings)
        speed: dict[str, list[float]] = {"engine": [], "loop": []}
        accuracy: dict[str, float] = {}
        for i in range(args.repeats):  # alternate which side goes first, so that drifts in load cancel
            for side in (("engine", "loop") if i % 2 == 0 else ("loop", "engine")):
                images_per_second, accuracy[side] = sides[side](method, model, x, y, args.batch_size, device, src,
                                                                settings)
                speed[side].append(images_per_second)
        ratios = [e / h for e, h in zip(speed["engine"], speed["loop"], strict=True)]
        e, h = statistics.median(speed["engine"]), statistics.median(speed["loop"])
        print(f"{method:8s} {e:13.1f} {h:11.1f} {statistics.median(ratios):6.3f} "
              f"[{min(ratios):.3f}, {max(ratios):.3f}]  {accuracy['engine']:.2f} / {accuracy['loop']:.2f}")


def load_npz(path: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images (uint8 NHWC) and labels of an npz with arrays ``x`` and ``y``."""
    with np.load(path.removeprefix("npz:")) as data:
        return torch.from_numpy(data["x"][:n]), torch.from_numpy(data["y"][:n]).long()

if __name__ == "__main__":
    main()
