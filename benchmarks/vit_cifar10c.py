"""The ViT table of docs/methods/transformers.md: the small CIFAR-10 ViT under the 15 corruptions at severity 5.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/vit_cifar10c.py --shared ../shared \\
        --checkpoint models/small_vit_cifar10.pt --n-examples 1000

The model is the one ``benchmarks/train_small_vit.py`` trains (any ``tta.load_model(checkpoint=...)`` file works).
The corruptions are generated once from the first ``--n-examples`` images of the clean JPEG test set
(``tta.data.generated``, the generator of ``tta adapt --generate``, data seed 0), so every row sees the same bytes.
Every method runs per domain (reset before each corruption) in batches of ``--batch-size`` (64, the batch the ViT
presets were published for), with its ``vit`` preset where it has one (tent, eta, eata, sar, deyo, cotta, foa) and
its defaults otherwise; eata and foa take their source statistics from the 10,000-image training subset. The
``clean`` column is the same run on the clean images themselves. Writes one row per method (accuracy in percent per
corruption, their mean, and the clean accuracy) to ``--out``, rewritten after every method.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

import tta
from tta.data import BENCHMARK_CORRUPTIONS
from tta.data.generated import generated_stream
from tta.data.settings import WholeDomainCache
from tta.data.stream import Stream

# row label -> (method, preset); the label's first word is the method
ROWS: dict[str, tuple[str, str | None]] = {
    "source": ("source", None),
    "tent (vit)": ("tent", "vit"),
    "eta (vit)": ("eta", "vit"),
    "eata (vit)": ("eata", "vit"),
    "sar (vit)": ("sar", "vit"),
    "deyo (vit)": ("deyo", "vit"),
    "roid": ("roid", None),
    "cotta (vit)": ("cotta", "vit"),
    "lame": ("lame", None),
    "foa (vit)": ("foa", "vit"),
    "tent": ("tent", None),
}
SHORT = {"gaussian_noise": "gauss", "shot_noise": "shot", "impulse_noise": "impul", "defocus_blur": "defoc",
         "glass_blur": "glass", "motion_blur": "motn", "zoom_blur": "zoom", "snow": "snow", "frost": "frost",
         "fog": "fog", "brightness": "brit", "contrast": "contr", "elastic_transform": "elast", "pixelate": "pixel",
         "jpeg_compression": "jpeg"}


def clean_accuracy(adapted: tta.AdaptedModel, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """Accuracy (%) of ``adapted`` adapting over the clean images in order, from its source state."""
    adapted.reset()
    torch.manual_seed(1)
    hits = sum(int((adapted(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
               for i in range(0, len(y), batch_size))
    return 100.0 * hits / len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--checkpoint", type=Path, required=True, help="the small ViT (train_small_vit.py's file)")
    parser.add_argument("--n-examples", type=int, default=1000, help="images per corruption (and clean)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row labels to run")
    parser.add_argument("--out", type=Path, default=Path("docs/results/vit_small_cifar10.csv"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    cifar = args.shared / "data" / "cifar10"
    model = tta.load_model(checkpoint=args.checkpoint)
    with np.load(cifar / "test_jpeg.npz") as data:
        x_all = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).float() / 255
        y_all = torch.from_numpy(data["y"])
    with torch.no_grad():
        pred = torch.cat([model(x_all[i:i + 500]).argmax(1) for i in range(0, len(y_all), 500)])
    print(f"clean accuracy on all {len(y_all)} test images: {100 * float((pred == y_all).float().mean()):.2f}%",
          flush=True)
    x_clean, y_clean = x_all[:args.n_examples], y_all[:args.n_examples]

    stream = generated_stream("cifar10c", corruptions=BENCHMARK_CORRUPTIONS, severities=[5],
                              n_examples=args.n_examples, batch_size=args.batch_size, seed=0,
                              source=f"npz:{cifar / 'test_jpeg.npz'}")
    source = WholeDomainCache(stream.source, capacity=len(stream.domains))
    start = time.perf_counter()
    for domain in stream.domains:  # generated once, up front
        source.load(domain, np.arange(1))
    print(f"generated {len(stream.domains)} domains in {time.perf_counter() - start:.0f} s", flush=True)

    header = ["method", *(SHORT[c] for c in BENCHMARK_CORRUPTIONS), "mean", "clean"]
    command = " ".join(["python", "benchmarks/vit_cifar10c.py", *map(shlex.quote, sys.argv[1:])])
    lines: list[list[str]] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    source_data = f"npz:{cifar / 'train_jpeg_10k.npz'}"
    for label in args.rows.split(","):
        method, preset = ROWS[label]
        start = time.perf_counter()
        adapted = tta.adapt(model, method, preset=preset, source_data=source_data)
        rows = Stream(source, stream.domains, args.n_examples, batch_size=args.batch_size)
        df = tta.evaluate(adapted, rows, "domain", device="cpu", model_name="small-vit", seed=1)
        acc = dict(zip(df.corruption, df.accuracy, strict=True))
        clean = clean_accuracy(adapted, x_clean, y_clean, args.batch_size)
        values = [acc[c] for c in BENCHMARK_CORRUPTIONS]
        lines.append([label, *(f"{v:.1f}" for v in values), f"{np.mean(values):.1f}", f"{clean:.1f}"])
        print(f"{label}: mean {np.mean(values):.2f}%, clean {clean:.2f}% ({time.perf_counter() - start:.0f} s)",
              flush=True)
        with args.out.open("w", newline="") as f:
            f.write(f"# command: {command}\n")
            csv.writer(f, lineterminator="\n").writerows([header, *lines])


if __name__ == "__main__":
    main()
