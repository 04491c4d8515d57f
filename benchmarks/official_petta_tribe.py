"""Parity of ``petta`` and ``tribe`` with the authors' own code, on the same batches, model and settings.

    git -C <petta git dir> archive HEAD | tar -x -C petta-src      # github.com/hthieu166/petta
    git -C <TRIBE git dir> archive HEAD | tar -x -C tribe-src      # github.com/Gorilla-Lab-SCUT/TRIBE
    python benchmarks/official_petta_tribe.py --method petta --official petta-src --data DATA \\
        --checkpoint resnet20.th --source-data npz:test.npz --setting recurring --visits 3 --n 500 --out rows.csv

One stream of batches is built with ``tta``'s own settings (``--setting continual|correlated|recurring``, batch 64 by
default, the corruptions at severity 5 from the CIFAR-10-C-layout folder ``--data``) and fed, batch by batch and in
the same order, to ``tta.adapt(model, METHOD)`` and to the authors' adapter (their ``PeTTA``/``TRIBE`` class built
from their CIFAR-10-C configuration files) wrapping a fresh copy of the same model; both start from the same seed.
Accuracy is counted on the prediction each returns for each batch. Prints one line per corruption (and visit) and
appends one row per run to ``--out``.

The authors' code runs unchanged except for what ties it to their set-up: ``.cuda()`` is the identity (CPU);
PeTTA's feature/classifier split is given the CIFAR ResNet's, and its source loader the clean images of
``--source-data`` (the authors use the clean CIFAR-10 test split); robustbench's ``autoattack`` import is stubbed
(unused). Their augmentation is their own torchvision transform; ``tta``'s batched version of it draws torch's
random numbers in the same order, so from the same seed both augment alike.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import types
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

import tta
from tta.data.cifar_c import cifar_c_stream
from tta.data.recurring import RecurringStream
from tta.models import load_model
from tta.source import as_source_data

Batches = list[tuple[torch.Tensor, torch.Tensor, list[str]]]


def stream_batches(a: argparse.Namespace) -> Batches:
    """The stream's batches as (images, labels, per-image domain name) in order."""
    setting = "continual" if a.setting == "recurring" else a.setting
    stream = cifar_c_stream("cifar10c", a.data, a.corruptions.split(","), [5], n_examples=a.n,
                            batch_size=a.batch_size, download=False, setting=setting, seed=a.seed)
    if a.setting == "recurring":
        stream = RecurringStream(stream, a.visits)
    names = [d.name + (f"@{d.visit}" if getattr(d, "visit", None) else "") for d in stream.domains]
    return [(b.x.float().div(255) if b.x.dtype == torch.uint8 else b.x, b.y, [names[int(d)] for d in b.domain])
            for b in stream]


def accuracy(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], batches: Batches, seed: int
             ) -> dict[str, float]:
    """Per-domain accuracy (%) of ``predict`` over the batches, from ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for x, y, names in batches:
        with torch.no_grad():
            right = (predict(x, y).argmax(1) == y).tolist()
        for name, r in zip(names, right, strict=True):
            hits[name][0] += int(r)
            hits[name][1] += 1
    return {k: 100.0 * h / n for k, (h, n) in hits.items()}


def cuda_is_identity() -> None:
    """The authors' code calls ``.cuda()``; on CPU that must change nothing."""
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]


class Encoder(nn.Module):
    """The features of ``tta``'s normalised CIFAR ResNet (``Sequential(Normalize, CifarResNet)``): the head's input."""

    def __init__(self, model: nn.Sequential) -> None:
        super().__init__()
        self.normalize, self.net = model[0], model[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        out = torch.relu(net.bn1(net.conv1(self.normalize(x))))
        out = net.layer3(net.layer2(net.layer1(out)))
        return nn.functional.adaptive_avg_pool2d(out, 1).flatten(1)


def official_petta(a: argparse.Namespace, model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    sys.path.insert(0, str(a.official))
    for name, attrs in (("autoattack", ("AutoAttack",)), ("autoattack.state", ("EvaluationState",))):
        stub = types.ModuleType(name)
        for attr in attrs:
            setattr(stub, attr, None)
        sys.modules.setdefault(name, stub)
    import src.adapter.petta as petta
    from src.configs import cfg
    from src.optim import build_optimizer

    cfg.merge_from_file(str(a.official / "configs/adapter/petta/cifar10c/petta_cifar10c_default.yaml"))
    cfg.merge_from_list(["CORRUPTION.DATASET", "cifar10c", "CORRUPTION.NUM_CLASS", 10,
                         "CKPT_DIR", tempfile.mkdtemp(), "SEED", a.seed])
    images, labels = as_source_data(a.source_data).sample(None)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=512)
    petta.get_source_loader = lambda **_: (None, loader)
    petta.split_up_model = lambda m, *_: (Encoder(m), m[1].linear)
    adapter = petta.PeTTA(cfg, model, build_optimizer(cfg))
    return lambda x, y: adapter(x, label=y)


def official_tribe(a: argparse.Namespace, model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    sys.path.insert(0, str(a.official))
    from core.adapter.TRIBE import TRIBE
    from core.configs import cfg
    from core.optim import build_optimizer

    cfg.merge_from_file(str(a.official / "configs/adapter/TRIBE.yaml"))
    cfg.merge_from_file(str(a.official / "configs/dataset/cifar10.yaml"))
    adapter = TRIBE(cfg, model, build_optimizer(cfg))
    return lambda x, y: adapter(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=["petta", "tribe"], required=True)
    parser.add_argument("--official", type=Path, required=True, help="the authors' repository, exported")
    parser.add_argument("--data", type=Path, required=True, help="the folder holding CIFAR-10-C/")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--source-data", help="clean source images (petta's source feature statistics)")
    parser.add_argument("--corruptions", default="gaussian_noise,defocus_blur,contrast")
    parser.add_argument("--setting", choices=["continual", "correlated", "recurring"], default="continual")
    parser.add_argument("--visits", type=int, default=3)
    parser.add_argument("--n", type=int, default=1000, help="images per corruption")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path)
    a = parser.parse_args()
    torch.set_num_threads(1)
    cuda_is_identity()
    batches = stream_batches(a)
    model = load_model(checkpoint=a.checkpoint, arch=a.arch)
    adapted = tta.adapt(model, a.method, source_data=a.source_data if a.method == "petta" else None)
    ours = accuracy(lambda x, y: adapted(x), batches, a.seed)
    build = official_petta if a.method == "petta" else official_tribe
    theirs = accuracy(build(a, load_model(checkpoint=a.checkpoint, arch=a.arch)), batches, a.seed)
    for name in ours:
        print(f"{name:24s} tta {ours[name]:6.2f}  official {theirs[name]:6.2f}  diff {ours[name] - theirs[name]:+.2f}")
    mean_ours, mean_theirs = float(np.mean(list(ours.values()))), float(np.mean(list(theirs.values())))
    print(f"{'mean':24s} tta {mean_ours:6.2f}  official {mean_theirs:6.2f}  diff {mean_ours - mean_theirs:+.2f}")
    if a.out is not None:
        groups = {a.setting if a.setting != "recurring" else f"recurring ({a.visits} visits)": list(ours)}
        if a.setting == "recurring":  # and each visit on its own
            for v in range(1, a.visits + 1):
                groups[f"recurring, visit {v} of {a.visits}"] = [k for k in ours if k.endswith(f"@{v}")]
        new = not a.out.exists()
        with open(a.out, "a", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            if new:
                w.writerow(["method", "setting", "n", "tta", "official", "diff", "max"])
            for setting, keys in groups.items():
                mine, official = (float(np.mean([acc[k] for k in keys])) for acc in (ours, theirs))
                w.writerow([a.method, setting, a.n, f"{mine:.2f}", f"{official:.2f}",
                            f"{mine - official:+.2f}", f"{max(abs(ours[k] - theirs[k]) for k in keys):.2f}"])


if __name__ == "__main__":
    main()
