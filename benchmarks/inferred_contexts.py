"""Inferred against oracle domain contexts on a mixed stream of the 15 generated corruptions.

The domains are built in memory from the shared exact CIFAR-10 test head (the first ``--n`` images corrupted with
``tta.corruptions`` at ``--severity``, seed 0, the bytes ``tta corrupt`` would write; never written to disk), all 15
shuffled together (``mixed``, seed 0), batch 200, one reset per severity. Methods: source, adabn, tent, roid, and
dsbn / context-norm with the true domain ids (``oracle``) and with contexts inferred from the images alone
(``infer``, default settings, calibrated on ``--source-n`` clean JPEG training images from the shared folder).
For inferred contexts it also reports the assignment purity: the share of images whose (hard) context's majority
domain is their own domain, and the number of contexts used.

    python benchmarks/inferred_contexts.py --arch resnet20 --severity 5 --n 1000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

import tta
from tta.data.cifar_c import BENCHMARK_CORRUPTIONS
from tta.data.generated import GeneratedSource
from tta.data.settings import SettingStream, WholeDomainCache
from tta.data.stream import Domain

METHODS: dict[str, tuple[str, dict[str, object]]] = {
    "source": ("source", {}),
    "adabn": ("adabn", {}),
    "tent": ("tent", {}),
    "roid": ("roid", {}),
    "dsbn (oracle)": ("dsbn", {}),
    "dsbn (infer)": ("dsbn", {"contexts": "infer"}),
    "context-norm (oracle)": ("context-norm", {}),
    "context-norm (infer)": ("context-norm", {"contexts": "infer"}),
}


class Purity:
    """Records the hard context of every image (first layer's routing) beside its true domain id."""

    def __init__(self, adapted: tta.AdaptedModel) -> None:
        self.contexts: list[torch.Tensor] = []
        self.domains: list[torch.Tensor] = []
        router = adapted.model.router
        first = adapted.model.layers()[0]
        adapted.register_forward_pre_hook(self._domains, with_kwargs=True)
        first.register_forward_hook(lambda m, i, o: self.contexts.append(router.weights.argmax(1).cpu()))

    def _domains(self, module: object, args: tuple, kwargs: dict) -> None:
        self.domains.append(torch.as_tensor(kwargs.get("domain", args[1] if len(args) > 1 else -1)).cpu())

    def score(self) -> tuple[float, int]:
        """(purity in %, contexts used)."""
        c, d = torch.cat(self.contexts), torch.cat(self.domains)
        hits = sum(int(torch.bincount(d[c == k]).max()) for k in c.unique())
        return hits / len(c) * 100, len(c.unique())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--arch", default="resnet20", choices=["resnet20", "resnet32"])
    parser.add_argument("--n", type=int, default=1000, help="images per corruption")
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--corruptions", nargs="+", default=list(BENCHMARK_CORRUPTIONS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--setting", default="mixed")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--source-n", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)

    model = tta.load_model(checkpoint=args.shared / "models" / f"cifar10_{args.arch}.th", arch=args.arch)
    with np.load(args.shared / "data" / "cifar10" / "test_exact_head.npz") as data:
        x, y = data["x"][: args.n], data["y"][: args.n]
    source = WholeDomainCache(GeneratedSource(x, y, seed=0), capacity=len(args.corruptions))
    for c in args.corruptions:  # generate every domain up front, so the methods' timings exclude it
        source.load(Domain(c, args.severity), np.arange(1))
    with np.load(args.shared / "data" / "cifar10" / "train_jpeg_10k.npz") as data:
        clean = (data["x"][: args.source_n], data["y"][: args.source_n])
    print(f"| {args.arch}, {args.setting}, severity {args.severity}, {len(args.corruptions)} corruptions x {args.n} "
          f"| accuracy (%) | purity (%) | contexts | seconds |\n|---|--:|--:|--:|--:|", flush=True)
    for label in args.methods:
        method, overrides = METHODS[label]
        stream = SettingStream(source, args.corruptions, [args.severity], setting=args.setting,
                               batch_size=args.batch_size, seed=0)
        adapted = tta.adapt(model, method, source_data=clean if "contexts" in overrides else None, **overrides)
        purity = Purity(adapted) if "contexts" in overrides else None
        started = time.perf_counter()
        df = tta.evaluate(adapted, stream, "domain", device="cpu", model_name=args.arch, seed=0)
        seconds = time.perf_counter() - started
        acc = float((df.accuracy * df.n).sum() / df.n.sum())
        pur, used = purity.score() if purity else (float("nan"), 0)
        print(f"| {label} | {acc:.2f} | {'' if purity is None else f'{pur:.1f}'} | {used or ''} | {seconds:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
