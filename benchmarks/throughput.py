"""Throughput of the engine against a minimal hand-written loop doing the same computation on the same data.

    python benchmarks/throughput.py [--device auto] [--arch resnet20] [--n-images 4000] [--batch-size 200]

For each of source, adabn and tent, both sides take the same uint8 batches from host memory, move each to the
device once, convert to [0, 1] floats and run the same model computation; the hand-written loop has no input
checks, no reset logic and no accounting beyond a correct count. Runs alternate (engine, loop, engine, ...) and
the median of --repeats runs is reported, as images per second and as the ratio engine / loop.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch
from torch import nn

import tta
from tta.core.losses import entropy
from tta.data.arrays import array_stream
from tta.engine import resolve_device
from tta.models import cifar_resnet
from tta.models.zoo import CIFAR_RESNET_NORM, normalized


def hand_loop(method: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
              device: torch.device) -> float:
    """The computation of ``method`` written out by hand; returns images per second."""
    model = copy.deepcopy(model).to(device)
    optimizer = None
    if method in ("adabn", "tent"):
        model.train(method == "tent")
        model.requires_grad_(False)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.track_running_stats, m.running_mean, m.running_var = False, None, None
                m.weight.requires_grad_(method == "tent")
                m.bias.requires_grad_(method == "tent")
        if method == "tent":
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))
    else:
        model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(x), batch_size):
        # Same layout as read from CIFAR-C files: uint8 NHWC on the host, permuted to (N, C, H, W) on the device.
        xb = x[i:i + batch_size].to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        yb = y[i:i + batch_size].to(device, non_blocking=True)
        if optimizer is None:
            with torch.no_grad():
                logits = model(xb)
        else:
            logits = model(xb)
            entropy(logits).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        correct += (logits.argmax(1) == yb).sum()
    sync(device)
    return len(x) / (time.perf_counter() - start)


def engine_run(method: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
               device: torch.device) -> float:
    """The same through ``tta.adapt`` + ``tta.evaluate``; returns images per second (wall clock)."""
    adapted = tta.adapt(model, method)
    stream = array_stream(x, y, batch_size=batch_size)
    sync(device)
    start = time.perf_counter()
    tta.evaluate(adapted, stream, reset="never", device=device)
    sync(device)
    return len(x) / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--n-images", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
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
    print(f"{'method':8s} {'engine img/s':>13s} {'loop img/s':>11s} {'ratio':>6s}")
    engine_run("source", model, x, y, args.batch_size, device)  # warm-up (allocator, cudnn autotune, threads)
    for method in args.methods.split(","):
        engine, loop = [], []
        for _ in range(args.repeats):
            engine.append(engine_run(method, model, x, y, args.batch_size, device))
            loop.append(hand_loop(method, model, x, y, args.batch_size, device))
        e, h = statistics.median(engine), statistics.median(loop)
        print(f"{method:8s} {e:13.0f} {h:11.0f} {e / h:6.3f}")


if __name__ == "__main__":
    main()
