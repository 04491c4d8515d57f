"""What ``petta`` and ``tribe`` do on the streams they were made for, next to other methods on the same batches.

    python benchmarks/petta_tribe_streams.py --data DATA --checkpoint resnet20.th --setting recurring --visits 3 \\
        --n 500 --methods source,rotta,petta --source-data npz:test.npz --out recurring.csv
    python benchmarks/petta_tribe_streams.py --data DATA --checkpoint resnet20.th --setting correlated \\
        --n 1000 --methods source,tent,rotta,tribe --out correlated.csv

The stream is the one ``official_petta_tribe.py`` builds (``tta``'s settings over the CIFAR-10-C-layout folder
``--data``, severity 5, batch 64); every method sees the same batches from the same seed, with its defaults. Writes
one row per method: accuracy (%) per visit of a recurring stream, else per corruption, and the mean.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
from official_petta_tribe import accuracy, stream_batches

import tta
from tta.methods import get_method
from tta.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the folder holding CIFAR-10-C/")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--methods", default="source,rotta,petta")
    parser.add_argument("--source-data", help="clean source images for the methods that need them")
    parser.add_argument("--corruptions", default="gaussian_noise,defocus_blur,contrast")
    parser.add_argument("--setting", choices=["continual", "correlated", "recurring"], default="recurring")
    parser.add_argument("--visits", type=int, default=3)
    parser.add_argument("--n", type=int, default=500, help="images per corruption")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    a = parser.parse_args()
    torch.set_num_threads(1)
    batches = stream_batches(a)
    model = load_model(checkpoint=a.checkpoint, arch=a.arch)
    rows = []
    for method in a.methods.split(","):
        needs = get_method(method).requires.source_data
        adapted = tta.adapt(model, method, source_data=a.source_data if needs else None)
        acc = accuracy(lambda x, y, m=adapted: m(x), batches, a.seed)
        if a.setting == "recurring":
            groups = {f"visit {v}": [k for k in acc if k.endswith(f"@{v}")] for v in range(1, a.visits + 1)}
        else:
            groups = {k: [k] for k in acc}
        row = {"method": method, **{g: f"{np.mean([acc[k] for k in keys]):.2f}" for g, keys in groups.items()},
               "mean": f"{np.mean(list(acc.values())):.2f}"}
        print(row, flush=True)
        rows.append(row)
    with open(a.out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
