"""What a guard costs: images per second of the same method with and without ``guard=...`` on the same batches.

    python benchmarks/guard_cost.py [--device auto] [--arch resnet20] [--methods source,tent,eta,roid] \
        [--checkpoint ../shared/models/cifar10_resnet20.th --images ../shared/data/cifar10/test_jpeg.npz] \
        [--streams clean,gaussian_noise-5]

Both sides go through ``tta.adapt`` + ``tta.evaluate`` on the same uint8 batches; the guarded side calibrates on
512 clean images before the clock starts (for batches under 32 once more, in batches of that size:
``Guard.calibrate_for_batch``). With ``--checkpoint`` and ``--images`` the model is a real one and the
batches are real images (the first ``--n-images``; the calibration images are the next 512), so the guard takes
the paths it takes in use: on clean images (``--streams clean``) the source model or the two models' average
answers (the source model reads whole batches and updates are skipped); under a strong shift (e.g.
``gaussian_noise-5``) the adapted model answers and the source model reads a quarter of each batch. Without them
random weights and random images. Runs alternate (plain, guarded, plain, ...) and the median of --repeats runs is
reported, with the ratio guarded / plain time (1.0: free), the number of batches the guard answered with the
source model and the number of updates it skipped.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import tta
from tta.config import parse_overrides
from tta.corruptions import corrupt_indexed
from tta.data.arrays import array_stream
from tta.devices import resolve_device
from tta.models import cifar_resnet
from tta.models.zoo import CIFAR_RESNET_NORM, normalized
from tta.monitor import make_guard


def run(adapted: tta.AdaptedModel, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Seconds of one pass over the batches (wall clock, device synchronised)."""
    stream = array_stream(x, y, batch_size=batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    tta.evaluate(adapted, stream, reset="never", device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--n-images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="source,tent,eta,roid")
    parser.add_argument("--checkpoint", help="a CIFAR ResNet checkpoint (default: random weights)")
    parser.add_argument("--images", help="npz with uint8 x (N, 32, 32, 3) and y (default: random images)")
    parser.add_argument("--streams", default="clean",
                        help="comma-separated: clean, or CORRUPTION-SEVERITY (tta's generator, data seed 0) applied "
                             "to the stream's images (not to the calibration images), e.g. clean,gaussian_noise-5")
    parser.add_argument("--guard", default="default")
    parser.add_argument("--guard-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a guard setting, e.g. source_fraction=0.25 (repeatable)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also write the table as a CSV (with a # command: line)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    torch.manual_seed(0)
    model: nn.Module = (tta.load_model(checkpoint=args.checkpoint, arch=args.arch) if args.checkpoint else
                        normalized(cifar_resnet(args.arch), *CIFAR_RESNET_NORM).eval())
    rng = np.random.default_rng(0)
    if args.images:
        data = np.load(args.images)
        images, labels = data["x"][:args.n_images + 512], data["y"][:args.n_images + 512]
    else:
        images = rng.integers(0, 256, (args.n_images + 512, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, args.n_images + 512)
    y = torch.from_numpy(labels[:args.n_images])
    clean = (images[args.n_images:], labels[args.n_images:])
    print(f"device={device} arch={args.arch} images={args.n_images} batch={args.batch_size} repeats={args.repeats} "
          f"guard={args.guard} {' '.join(args.guard_set)} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'stream':16s} {'method':8s} {'plain s':>8s} {'guarded s':>10s} {'ratio':>6s} {'fallbacks':>9s} "
          f"{'skipped':>7s}")
    rows = []
    for name in args.streams.split(","):
        x = torch.from_numpy(images[:args.n_images])
        if name != "clean":
            corruption, _, severity = name.rpartition("-")
            shifted = corrupt_indexed(x.permute(0, 3, 1, 2).float() / 255, 0, corruption, int(severity), 0)
            x = (shifted * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        run(tta.adapt(model, "source"), x, y, args.batch_size, device)  # warm-up
        for method in args.methods.split(","):
            plain, guarded = [], []
            for _ in range(args.repeats):
                plain.append(run(tta.adapt(model, method), x, y, args.batch_size, device))
                guard = make_guard(args.guard, **parse_overrides(args.guard_set))
                adapted = tta.adapt(model, method, guard=guard, source_data=clean)  # calibrates here
                adapted.guard.calibrate_for_batch(adapted, args.batch_size)  # small batches: once more, for them
                guarded.append(run(adapted, x, y, args.batch_size, device))
            p, g = statistics.median(plain), statistics.median(guarded)
            c = adapted.counters
            print(f"{name:16s} {method:8s} {p:8.2f} {g:10.2f} {g / p:6.3f} {c.fallbacks:9d} {c.skipped:7d}",
                  flush=True)
            rows.append(f"{name},{method},{p:.2f},{g:.2f},{g / p:.2f},{c.fallbacks},{c.skipped}")
    if args.out:
        command = "PYTHONPATH=$PWD python benchmarks/guard_cost.py " + " ".join(sys.argv[1:])
        header = ("stream,method,unguarded s,guarded s,guarded / unguarded,batches answered by source,"
                  "updates skipped by the guard")
        Path(args.out).write_text("\n".join([f"# command: {command}", header, *rows]) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
