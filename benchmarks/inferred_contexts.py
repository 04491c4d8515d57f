"""Inferred against oracle domain contexts on a mixed stream of the 15 generated corruptions.

The domains are built in memory from the shared exact CIFAR-10 test head (the first ``--n`` images corrupted with
``tta.corruptions`` at each ``--severity``, seed 0, the bytes ``tta corrupt`` would write; never written to disk), all
15 shuffled together (``mixed``; the order's seed is ``--seed``, 0 by default), batch 200, one reset per severity.
Methods: source, adabn, tent, roid, and dsbn / context-norm with the true domain ids (``oracle``) and with contexts
inferred from the images alone (``infer``, default settings, calibrated on ``--source-n`` clean JPEG training
images from the shared folder). For inferred contexts it also reports the assignment purity: the share of images
whose (hard) context's majority domain is their own domain, and the number of contexts used.

    python benchmarks/inferred_contexts.py --arch resnet20 --severity 5 --n 1000
    python benchmarks/inferred_contexts.py --setting gradual --severity 1 2 3 4 5 --n 200

(``gradual``: per corruption the severities up and down, one reset per corruption.)

``--ceilings`` adds two routings that no deployed model could use, to tell what limits inferred contexts: dsbn
routed by the nearest *true* corruption centre of the same whitened descriptor (the centres computed from every
image's descriptor and its true corruption: how well the descriptor tells corruptions apart when the domains are
known) and by k-means with k = the number of corruptions fitted on the whole stream's descriptors in advance (an
offline clustering that sees every image first). Both route from the first batch and never restart a context.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
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
        c = torch.cat(self.contexts)
        return purity(c, torch.cat(self.domains)), len(c.unique())


def purity(contexts: torch.Tensor, domains: torch.Tensor) -> float:
    """The share (%) of images whose context's majority domain is their own."""
    hits = sum(int(torch.bincount(domains[contexts == k]).max()) for k in contexts.unique())
    return hits / len(contexts) * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--arch", default="resnet20", choices=["resnet20", "resnet32"])
    parser.add_argument("--n", type=int, default=1000, help="images per corruption")
    parser.add_argument("--severity", type=int, nargs="+", default=[5], help="one or more (gradual: 1 2 3 4 5)")
    parser.add_argument("--corruptions", nargs="+", default=list(BENCHMARK_CORRUPTIONS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD")
    parser.add_argument("--setting", default="mixed")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="the order of the stream (the corruptions are the same)")
    parser.add_argument("--source-n", type=int, default=1000)
    parser.add_argument("--ceilings", action="store_true", help="add dsbn routed by the true corruption centres and "
                        "by offline k-means (routings a deployed model cannot use, to tell what limits inference)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    model = tta.load_model(checkpoint=args.shared / "models" / f"cifar10_{args.arch}.th", arch=args.arch)
    with np.load(args.shared / "data" / "cifar10" / "test_exact_head.npz") as data:
        x, y = data["x"][: args.n], data["y"][: args.n]
    source = WholeDomainCache(GeneratedSource(x, y, seed=0), capacity=len(args.corruptions) * len(args.severity))
    for c in args.corruptions:  # generate every domain up front, so the methods' timings exclude it
        for s in args.severity:
            source.load(Domain(c, s), np.arange(1))
    with np.load(args.shared / "data" / "cifar10" / "train_jpeg_10k.npz") as data:
        clean = (data["x"][: args.source_n], data["y"][: args.source_n])
    order = f", order {args.seed}" if args.seed else ""
    severities = "/".join(map(str, args.severity))
    print(f"| {args.arch}, {args.setting}{order}, severity {severities}, {len(args.corruptions)} corruptions x "
          f"{args.n} | accuracy (%) | purity (%) | contexts | seconds |\n|---|--:|--:|--:|--:|", flush=True)
    def make_stream() -> SettingStream:
        return SettingStream(source, args.corruptions, args.severity, setting=args.setting,
                             batch_size=args.batch_size, seed=args.seed)

    for label in args.methods:
        method, overrides = METHODS[label]
        stream = make_stream()
        adapted = tta.adapt(model, method, source_data=clean if "contexts" in overrides else None, **overrides)
        recorder = Purity(adapted) if "contexts" in overrides else None
        started = time.perf_counter()
        df = tta.evaluate(adapted, stream, "domain", device="cpu", model_name=args.arch, seed=0)
        seconds = time.perf_counter() - started
        acc = float((df.accuracy * df.n).sum() / df.n.sum())
        pur, used = recorder.score() if recorder else (float("nan"), 0)
        print(f"| {label} | {acc:.2f} | {'' if recorder is None else f'{pur:.1f}'} | {used or ''} | {seconds:.0f} |",
              flush=True)
    if args.ceilings:
        routing_ceilings(model, make_stream, clean[0], len(args.corruptions))


def kmeans(z: torch.Tensor, k: int, restarts: int = 10, iters: int = 50, seed: int = 0) -> torch.Tensor:
    """Labels of the best of ``restarts`` k-means runs (k-means++ starts, Lloyd iterations) on ``z`` (n, D)."""
    gen = torch.Generator().manual_seed(seed)
    best, best_cost = torch.zeros(len(z), dtype=torch.long), float("inf")
    for _ in range(restarts):
        centres = z[torch.randint(len(z), (1,), generator=gen)]
        while len(centres) < k:  # k-means++: the next start drawn in proportion to the squared distance
            d2 = torch.cdist(z, centres).square().min(1).values
            centres = torch.cat([centres, z[torch.multinomial(d2, 1, generator=gen)]])
        for _ in range(iters):
            labels = torch.cdist(z, centres).argmin(1)
            moved = torch.stack([z[labels == j].mean(0) if bool((labels == j).any()) else centres[j]
                                 for j in range(k)])
            if torch.equal(moved, centres):
                break
            centres = moved
        nearest = torch.cdist(z, centres).square().min(1)
        if float(nearest.values.sum()) < best_cost:
            best, best_cost = nearest.indices, float(nearest.values.sum())
    return best


def routing_ceilings(model: torch.nn.Module, make_stream: Callable[[], SettingStream], clean: np.ndarray,
                     k: int) -> None:
    """dsbn routed by the nearest true corruption centre and by offline k-means (see the module docstring)."""
    from tta.context.assign import ContextAssigner
    from tta.context.descriptors import StyleProbe
    from tta.context.model import calibrate_contexts

    images = torch.from_numpy(clean).permute(0, 3, 1, 2).float() / 255
    assigner = ContextAssigner(calibrate_contexts(model, images))
    probe = StyleProbe(model)
    batches = []
    with torch.no_grad():
        for b in (batch.to(torch.device("cpu")) for batch in make_stream()):
            batches.append((b.x, b.y, b.domain, assigner.standardise(probe(b.x))))
    z, domains = torch.cat([b[3] for b in batches]), torch.cat([b[2] for b in batches])
    centres = torch.stack([z[domains == d].mean(0) for d in range(k)])
    offsets = np.cumsum([0] + [len(b[0]) for b in batches])
    for label, ids in (("dsbn (nearest true centre)", torch.cdist(z, centres).argmin(1)),
                       ("dsbn (offline k-means)", kmeans(z, k))):
        adapted = tta.adapt(model, "dsbn")
        hits = 0
        started = time.perf_counter()
        with torch.no_grad():
            for i, (x, y, _, _) in enumerate(batches):
                hits += int((adapted(x, domain=ids[offsets[i]:offsets[i + 1]]).argmax(1) == y).sum())
        seconds = time.perf_counter() - started
        print(f"| {label} | {100 * hits / len(domains):.2f} | {purity(ids, domains):.1f} | {len(ids.unique())} "
              f"| {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
