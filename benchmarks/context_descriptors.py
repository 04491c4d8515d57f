"""Descriptor study: how well per-image style descriptors separate the generated corruptions.

For each candidate descriptor (the BatchNorm layers it reads, channel means with or without log-stds, standardised
by the spread of clean source images or not, optionally a random projection) and each of the 15 benchmark
corruptions (the first ``--n`` images of the shared exact CIFAR-10 test head, generated in memory at
``--severity``, seed 0), it reports

- nearest-centroid accuracy: centroids from the first half of each corruption's images, the second half labelled
  by the closest centroid (Euclidean, in the descriptor's space);
- k-means purity: k-means with 15 clusters (k-means++ start, 3 restarts) on all images, the share of images whose
  cluster's majority corruption is their own;
- class: the same nearest-centroid accuracy for the images' *classes* (chance 10 %): the content a descriptor
  carries besides the domain. Contexts that group images by class normalise the class away and cost accuracy.

    python benchmarks/context_descriptors.py --n 400 --arch resnet20

The standardisation uses ``--source-n`` clean training images (the shared JPEG training subset): per dimension,
subtract their mean and divide by their standard deviation; "whitened" further projects on their top principal
directions divided by their standard deviations (``tta.context.assign.calibrate``); "whitened, content removed"
first removes the directions that tell apart the classes the model predicts for the clean images (what
``contexts=infer`` does).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from inferred_contexts import kmeans, purity  # the sibling benchmark (this folder is on the path when run)

import tta
from tta.context.assign import calibrate
from tta.context.descriptors import DEPTHS, StyleProbe, describe, select_layers
from tta.data.cifar_c import BENCHMARK_CORRUPTIONS
from tta.data.generated import GeneratedSource
from tta.data.stream import Domain


def nearest_centroid(z: torch.Tensor, labels: torch.Tensor, train: torch.Tensor) -> float:
    """Accuracy (%) of the nearest class centroid (from rows ``train``) on the other rows."""
    classes = labels.unique()
    centroids = torch.stack([z[train & (labels == c)].mean(0) for c in classes])
    pred = classes[torch.cdist(z[~train], centroids).argmin(1)]
    return float((pred == labels[~train]).float().mean()) * 100


def kmeans_purity(z: torch.Tensor, labels: torch.Tensor, k: int, seed: int = 0, restarts: int = 3) -> float:
    """Purity (%) of the best (lowest inertia) of ``restarts`` k-means runs with ``k`` clusters."""
    return purity(kmeans(z, k, restarts=restarts, seed=seed), labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--arch", default="resnet20", choices=["resnet20", "resnet32"])
    parser.add_argument("--n", type=int, default=400, help="images per corruption")
    parser.add_argument("--source-n", type=int, default=1000, help="clean training images for standardising")
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    model = tta.load_model(checkpoint=args.shared / "models" / f"cifar10_{args.arch}.th", arch=args.arch)
    probe = StyleProbe(model, "all")
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    widths = [2 * bn.num_features for bn in bns]
    offsets = np.cumsum([0, *widths])

    with np.load(args.shared / "data" / "cifar10" / "test_exact_head.npz") as data:
        x, y = data["x"][:args.n], data["y"][:args.n]
    gen = GeneratedSource(x, y, seed=args.seed)
    started = time.perf_counter()
    feats, labels, classes = [], [], []
    for i, c in enumerate(BENCHMARK_CORRUPTIONS):
        images, _ = gen.load(Domain(c, args.severity), np.arange(len(x)))
        feats.append(describe(probe, images.float() / 255))
        labels.append(torch.full((len(x),), i))
        classes.append(torch.from_numpy(y).long())
    z_all, labels_t, classes_t = torch.cat(feats), torch.cat(labels), torch.cat(classes)
    with np.load(args.shared / "data" / "cifar10" / "train_jpeg_10k.npz") as data:
        src = torch.from_numpy(data["x"][:args.source_n]).permute(0, 3, 1, 2).float() / 255
    s_all = describe(probe, src)
    with torch.no_grad():
        predicted = model.eval()(src).argmax(1)
    print(f"descriptors of {len(z_all)} corrupted and {len(s_all)} clean images in "
          f"{time.perf_counter() - started:.1f}s", flush=True)

    train = torch.zeros(args.n, dtype=torch.bool)
    train[: args.n // 2] = True
    train = train.repeat(len(BENCHMARK_CORRUPTIONS))

    def columns(depth: str, stds: bool) -> list[int]:
        cols: list[int] = []
        for i in select_layers(len(bns), depth):
            half = widths[i] // 2
            cols += list(range(offsets[i], offsets[i] + half))
            if stds:
                cols += list(range(offsets[i] + half, offsets[i + 1]))
        return cols

    def scores(z: torch.Tensor) -> tuple[float, float, float]:
        return (nearest_centroid(z, labels_t, train), kmeans_purity(z, labels_t, 15),
                nearest_centroid(z, classes_t, train))

    rows = []
    for depth in DEPTHS:
        for stds in (False, True):
            for standardise in (False, True):
                cols = columns(depth, stds)
                z, s = z_all[:, cols], s_all[:, cols]
                if standardise:
                    z = (z - s.mean(0)) / s.std(0).clamp_min(1e-6)
                rows.append((depth, "mean+logstd" if stds else "mean", "yes" if standardise else "no", len(cols),
                             *scores(z)))
    # a random Gaussian projection of the standardised full descriptor to 64 dimensions
    cols = columns("all", True)
    z = (z_all[:, cols] - s_all[:, cols].mean(0)) / s_all[:, cols].std(0).clamp_min(1e-6)
    proj = torch.randn(len(cols), 64, generator=torch.Generator().manual_seed(0)) / 8
    zp = z @ proj
    rows.append(("all", "mean+logstd, random projection", "yes", 64, *scores(zp)))
    # whitened by the source covariance, without and with the content directions (contexts=infer: with)
    for depth in DEPTHS:
        for content in (None, predicted):
            cols = columns(depth, True)
            cal = calibrate(s_all[:, cols], content=content)
            zw = ((z_all[:, cols].double() - cal.mean.double()) / cal.std.double()) @ cal.projection.double()
            how = "whitened" if content is None else "whitened, content removed"
            rows.append((depth, "mean+logstd", f"{how} (rank {zw.shape[1]})", zw.shape[1], *scores(zw)))
    print(f"\n{args.arch}, 15 corruptions, severity {args.severity}, {args.n} images each "
          f"({len(bns)} BatchNorm layers):\n")
    print("| layers | statistics | standardised | dims | nearest centroid (%) | k-means purity (%) | class (%) |")
    print("|---|---|---|--:|--:|--:|--:|")
    for depth, stats, std, dims, nc, pur, cls in rows:
        print(f"| {depth} | {stats} | {std} | {dims} | {nc:.1f} | {pur:.1f} | {cls:.1f} |")


if __name__ == "__main__":
    main()
