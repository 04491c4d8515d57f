"""``foa`` against the official FOA code (mr-eggplant/FOA) on the same batches of the small CIFAR-10 ViT.

    git clone https://github.com/mr-eggplant/FOA /tmp/FOA   # or any checkout / bare mirror of it
    pip install cma                                         # the official code's CMA-ES
    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/vit_foa_parity.py --official /tmp/FOA \\
        --shared ../shared --checkpoint models/small_vit_cifar10.pt

The official ``tta_library/foa.py`` and ``models/vpt.py`` are imported unchanged except for two things the CPU and
this model need: ``.cuda()`` is the identity, and ViT-B's width (the literal ``768`` its code slices the final class
feature with) becomes the model's width; its CMA-ES seed (``2020`` in its source) becomes the run's seed. Both
implementations see the same corrupted batches (per domain, reset between domains; generated as
``benchmarks/vit_cifar10c.py`` generates them) and the same clean source images for their statistics (the official
gets them normalised, as its loader gives them). CMA-ES draws differ (``cma``'s generator and defaults against
``foa``'s own), so the comparison is the accuracy per domain and its mean over ``--seeds``. Writes
``docs/results/vit_foa_parity.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import shlex
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch
from torch import nn

import tta
from tta.data.generated import generated_stream
from tta.data.settings import WholeDomainCache
from tta.data.stream import Stream
from tta.source import SourceData

CORRUPTIONS = ("gaussian_noise", "glass_blur", "fog", "contrast", "pixelate")


def official_checkout(path: Path, into: Path) -> Path:
    """A work tree of the official repository: ``path`` itself, or the Python files of HEAD of a bare git directory."""
    if (path / "tta_library" / "foa.py").is_file():
        return path
    git = ["git", "-C", str(path)]
    names = subprocess.run([*git, "ls-tree", "-r", "--name-only", "HEAD"], check=True, capture_output=True,
                           text=True).stdout.split()
    for name in (n for n in names if n.endswith(".py")):
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        (into / name).write_bytes(subprocess.run([*git, "show", f"HEAD:{name}"], check=True,
                                                 capture_output=True).stdout)
    return into


def load_official(root: Path, width: int, seed: int) -> types.ModuleType:
    """The official ``tta_library/foa.py`` as a module, for a model of ``width`` and CMA-ES seed ``seed``."""
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    text = (root / "tta_library" / "foa.py").read_text()
    text = text.replace("768", str(width)).replace("'seed': 2020", f"'seed': {seed}")
    module = types.ModuleType(f"foa_official_{seed}")
    exec(compile(text, str(root / "tta_library" / "foa.py"), "exec"), module.__dict__)
    return module


def run_official(root: Path, model: nn.Module, source: torch.Tensor, stream: Stream, seed: int) -> list[float]:
    """Per-domain accuracy of the official FOA (reset between domains, as its main.py does)."""
    return official_accuracy(model, build_official(root, model, source, seed), stream)


def build_official(root: Path, model: nn.Module, source: torch.Tensor, seed: int) -> nn.Module:
    """The official FOA around ``model`` (``Sequential(normalize, vit)``), its source statistics taken."""
    normalize, vit = model[0], model[1]
    official = load_official(root, vit.embed_dim, seed)
    from models.vpt import PromptViT  # the official repository's, on the path since load_official
    torch.manual_seed(seed)
    adapt = official.FOA(PromptViT(vit, 3), 0.4)
    adapt.imagenet_mask = None
    loader = [(normalize(b),) for b in source.split(64)]
    with contextlib.redirect_stdout(io.StringIO()):
        adapt.obtain_origin_stat(loader)
    return adapt


def official_accuracy(model: nn.Module, adapt: nn.Module, stream: Stream) -> list[float]:
    """Per-domain accuracy of the built official FOA ``adapt`` over ``stream`` (reset between domains)."""
    normalize = model[0]
    hits, counts, segment = [0] * len(stream.domains), [0] * len(stream.domains), -1
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        for batch in stream:
            batch = batch.to(torch.device("cpu"))
            if batch.segment != segment:
                if segment >= 0:
                    adapt.reset()
                segment = batch.segment
            out = adapt(normalize(batch.x))
            hits[segment] += int((out.argmax(1) == batch.y).sum())
            counts[segment] += len(batch.y)
    return [100.0 * h / c for h, c in zip(hits, counts, strict=True)]


def run_ours(model: nn.Module, source: torch.Tensor, labels: torch.Tensor, stream: Stream, seed: int) -> list[float]:
    """Per-domain accuracy of ``foa`` with the same source images and seed."""
    return ours_accuracy(build_ours(model, source, labels, seed), stream)


def build_ours(model: nn.Module, source: torch.Tensor, labels: torch.Tensor, seed: int) -> tta.AdaptedModel:
    """``foa`` around ``model`` with the official run's source images and seed, its source statistics taken."""
    return tta.adapt(model, "foa", source_data=(source, labels), seed=seed, source_samples=len(source))


def ours_accuracy(adapted: tta.AdaptedModel, stream: Stream) -> list[float]:
    """Per-domain accuracy of the built ``foa`` over ``stream`` (reset between domains)."""
    df = tta.evaluate(adapted, stream, "domain", device="cpu", model_name="small-vit", seed=1)
    return list(df.accuracy)


def parity_data(shared: Path, corruptions: list[str], n_examples: int) -> tuple[torch.Tensor, torch.Tensor, Stream]:
    """The clean source images and labels both sides take their statistics from (``foa``'s default draw of 1,000
    training images), and the stream of corrupted test batches (severity 5, batch 64, cached per domain)."""
    cifar = shared / "data" / "cifar10"
    source, labels = SourceData(f"npz:{cifar / 'train_jpeg_10k.npz'}").sample(1000, seed=0)
    stream = generated_stream("cifar10c", corruptions=corruptions, severities=[5], n_examples=n_examples,
                              batch_size=64, seed=0, source=f"npz:{cifar / 'test_jpeg.npz'}")
    cache = WholeDomainCache(stream.source, capacity=len(stream.domains))
    return source, labels, Stream(cache, stream.domains, n_examples, batch_size=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, help="the official FOA repository (or a bare mirror)")
    parser.add_argument("--shared", type=Path, default=Path("../shared"))
    parser.add_argument("--checkpoint", type=Path, required=True, help="the small ViT (train_small_vit.py's file)")
    parser.add_argument("--corruptions", default=",".join(CORRUPTIONS))
    parser.add_argument("--n-examples", type=int, default=500)
    parser.add_argument("--seeds", default="2020,2021")
    parser.add_argument("--out", type=Path, default=Path("docs/results/vit_foa_parity.csv"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    model = tta.load_model(checkpoint=args.checkpoint)
    corruptions = args.corruptions.split(",")
    source, labels, batches = parity_data(args.shared, corruptions, args.n_examples)
    rows: list[list[str]] = []
    command = " ".join(["python", "benchmarks/vit_foa_parity.py", *map(shlex.quote, sys.argv[1:])])
    with tempfile.TemporaryDirectory() as tmp:
        root = official_checkout(args.official, Path(tmp))
        for seed in map(int, args.seeds.split(",")):
            for name in ("official", "tta"):
                start = time.perf_counter()
                acc = run_official(root, model, source, batches, seed) if name == "official" else \
                    run_ours(model, source, labels, batches, seed)
                rows.append([name, str(seed), *(f"{a:.1f}" for a in acc), f"{np.mean(acc):.2f}"])
                print(f"{name} seed {seed}: mean {np.mean(acc):.2f}% ({time.perf_counter() - start:.0f} s)",
                      flush=True)
    means = {name: np.mean([float(r[-1]) for r in rows if r[0] == name]) for name in ("official", "tta")}
    rows += [[f"{name} (mean of seeds)", "", *[""] * len(corruptions), f"{means[name]:.2f}"] for name in means]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="") as f:
        f.write(f"# command: {command}\n")
        csv.writer(f, lineterminator="\n").writerows([["implementation", "seed", *corruptions, "mean"], *rows])
    print(f"official {means['official']:.2f}%, tta {means['tta']:.2f}%")


if __name__ == "__main__":
    main()
