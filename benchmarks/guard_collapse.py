"""The guard's collapse experiment: a continual stream over corruptions, source vs Tent unguarded vs Tent guarded.

Generates the stream once (``--source`` clean images, corrupted on the fly by tta's generator with ``--data-seed``),
keeps its batches in memory (optionally cached with ``--cache`` outside the repository), then runs every variant
over the same batches in the same order (continual: no reset), and writes one CSV of per-domain rows (the engine's
columns, including the guard's estimate and counts) plus a plot of accuracy along the stream.

    PYTHONPATH=$PWD python benchmarks/guard_collapse.py \\
        --source npz:../shared/data/cifar10/test_exact_head.npz \\
        --checkpoint ../shared/models/cifar10_resnet20.th --arch resnet20 \\
        --source-data npz:/tmp/held_out_clean.npz \\
        --collapse lr=0.1 --out guard.csv --plot docs/guard_collapse.png

``--source-data`` should be held-out clean images (not the model's training images, nor the images the stream is
made of): the run in docs/guides/deployed-models.md uses CIFAR-10 test images 1,017..9,999, the stream the first 1,017.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import torch

import tta
from tta.config import parse_overrides
from tta.data.cifar_c import BENCHMARK_CORRUPTIONS
from tta.data.stream import Batch
from tta.models import load_model
from tta.monitor import make_guard
from tta.run.engine import evaluate


class CachedStream:
    """A stream's batches held in memory, replayed identically for every variant."""

    def __init__(self, stream: Any, batches: list[Batch]) -> None:
        self.domains, self.batch_size, self.setting = stream.domains, stream.batch_size, "continual"
        self.label, self.batches = stream.label, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)


def load_stream(args: argparse.Namespace) -> CachedStream:
    if args.cache is not None and Path(args.cache).is_file():
        saved = torch.load(args.cache, weights_only=False)
        return CachedStream(saved["stream"], saved["batches"])
    stream = tta.generated_stream("cifar10c", args.data_dir, args.corruptions, [args.severity], args.n_examples,
                                  args.batch_size, seed=args.data_seed, source=args.source, setting="continual")
    cached = CachedStream(stream, [Batch(b.x.clone(), b.y.clone(), b.domain.clone(), b.segment) for b in stream])
    if args.cache is not None:
        meta = argparse.Namespace(domains=stream.domains, batch_size=stream.batch_size, label=stream.label)
        torch.save({"stream": meta, "batches": cached.batches}, args.cache)
    return cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="clean images to corrupt (load_clean spec)")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--source-data", help="clean source data the guard calibrates on (load_clean spec)")
    parser.add_argument("--guard", default="default")
    parser.add_argument("--guard-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a guard setting, e.g. probation=0 (repeatable)")
    parser.add_argument("--collapse", action="append", default=[], metavar="KEY=VALUE",
                        help="Tent settings that collapse (repeat)")
    parser.add_argument("--corruptions", default=",".join(BENCHMARK_CORRUPTIONS))
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--n-examples", type=int)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--cache", help="file (outside the repository) keeping the generated batches between runs")
    parser.add_argument("--variants", default="source,tent,tent+guard,collapse,collapse+guard")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", required=True)
    parser.add_argument("--plot")
    args = parser.parse_args()
    args.corruptions = args.corruptions.split(",")
    torch.set_num_threads(args.threads)

    stream = load_stream(args)
    net = load_model(None, dataset="cifar10c", checkpoint=args.checkpoint, arch=args.arch)
    collapse = parse_overrides(args.collapse)
    frames = []
    for variant in args.variants.split(","):
        base, _, guarded = variant.partition("+")
        method = "source" if base == "source" else "tent"
        overrides = collapse if base == "collapse" else {}
        guard = make_guard(args.guard, **parse_overrides(args.guard_set)) if guarded else None
        adapted = tta.adapt(net, method, guard=guard,
                            source_data=args.source_data if guarded else None, **overrides)
        df = evaluate(adapted, stream, "never", device="cpu", model_name=Path(args.checkpoint).stem, seed=args.seed)  # type: ignore[arg-type]
        df.insert(0, "variant", variant)
        df["settings"] = " ".join(f"{k}={v}" for k, v in overrides.items())
        frames.append(df)
        pd.concat(frames, ignore_index=True).to_csv(args.out, index=False)  # each finished variant is kept
        print(f"{variant:16s} mean {df['accuracy'].mean():6.2f}  " + " ".join(f"{a:5.1f}" for a in df["accuracy"]),
              flush=True)
    result = pd.concat(frames, ignore_index=True)
    result.to_csv(args.out, index=False)
    if args.plot:
        plot(result, args.plot, collapse)


def plot(result: pd.DataFrame, path: str, collapse: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = ", ".join(f"{k}={v}" for k, v in collapse.items())
    names = {"source": "source (no adaptation)", "tent": "tent (defaults)", "tent+guard": "tent (defaults) + guard",
             "collapse": f"tent ({settings})", "collapse+guard": f"tent ({settings}) + guard"}
    styles = {"source": ("black", "-"), "tent": ("tab:blue", ":"), "tent+guard": ("tab:blue", "-"),
              "collapse": ("tab:red", ":"), "collapse+guard": ("tab:red", "-")}
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for variant, df in result.groupby("variant", sort=False):
        color, style = styles.get(str(variant), (None, "-"))
        label = names.get(str(variant), str(variant))
        ax.plot(range(len(df)), df["accuracy"], style, color=color, marker="o", ms=3, label=label)
    corruptions = result[result["variant"] == result["variant"].iloc[0]]["corruption"]
    ax.set_xticks(range(len(corruptions)), list(corruptions), rotation=45, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("continual stream, severity 5, in this order (no reset)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
