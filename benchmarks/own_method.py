"""CORA (``tta``'s own method) against the other methods in every stream setting, and its ablation.

The domains are built in memory from the shared exact CIFAR-10 test head (the first ``--n`` images corrupted with
``tta.corruptions`` at each severity, seed 0, the bytes ``tta corrupt`` would write; never written to disk). Every
setting runs the same images: ``per-domain`` (reset per corruption), ``continual`` (one corruption after another,
no reset), ``mixed`` (all corruptions shuffled together), ``correlated`` (continual, each corruption sorted by
label) at ``--severity``; ``gradual`` (per corruption the severities 1 to 5 and back, ``--gradual-n`` images per
domain, reset per corruption). Batch ``--batch-size``; methods needing clean data calibrate on ``--source-n``
clean JPEG training images of the shared folder. One CSV row per (method, setting): accuracy (%) over all images,
the worst domain's accuracy minus the source model's on it (over every setting; a gradual corruption's levels
pooled, as they hold few images each), the number of contexts CORA used, and seconds.

    python benchmarks/own_method.py --arch resnet20 --severity 5 --n 300 --out docs/results/cora_r20_sev5.csv
    python benchmarks/own_method.py --ablation --severity 5 --n 300 --out docs/results/cora_ablation_r20_sev5.csv
    python benchmarks/own_method.py --throughput --settings continual --out docs/results/cora_throughput.csv
    python benchmarks/own_method.py --part online --n 64 --out docs/results/cora_online.csv
    python benchmarks/own_method.py --part ccc --out docs/results/cora_ccc.csv

``--part online`` and ``--part ccc`` run ``tta adapt`` (with the options of ``benchmarks/long_streams.py``, so the
CCC-style stream is the one of the long-streams page) into ``--runs``, continuing runs already started there, and
summarise the result files: the online protocol at stream speed 1 (continual, the source model and CORA), and the
CCC-style stream (20,000 images, CORA, each window beside the source model on the same images, scored in the same
pass).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import tta
from tta.data.cifar_c import BENCHMARK_CORRUPTIONS
from tta.data.generated import GeneratedSource
from tta.data.settings import SettingStream, WholeDomainCache
from tta.data.stream import Domain
from tta.methods import get_method

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_streams import base  # the options of the long-streams page's runs

SETTINGS = ("per-domain", "continual", "mixed", "gradual", "correlated")
METHODS: dict[str, tuple[str, dict[str, object]]] = {
    "source": ("source", {}),
    "adabn": ("adabn", {}),
    "tent": ("tent", {}),
    "eta": ("eta", {}),
    "eata": ("eata", {}),
    "sar": ("sar", {}),
    "deyo": ("deyo", {}),
    "rotta": ("rotta", {}),
    "lame": ("lame", {}),
    "roid": ("roid", {}),
    "dsbn (infer)": ("dsbn", {"contexts": "infer"}),
    "context-norm (infer)": ("context-norm", {"contexts": "infer"}),
    "cora": ("cora", {}),
}
ABLATION: dict[str, tuple[str, dict[str, object]]] = {
    "cora": ("cora", {}),
    "one context (no inferred contexts)": ("cora", {"contexts": "single"}),
    "a batch's new contexts route it (immediate on)": ("cora", {"immediate": True}),
    "a one-cloud batch keeps its per-image routing (whole_batch off)": ("cora", {"whole_batch": False}),
    "cumulative statistics (stats_memory inf)": ("cora", {"stats_memory": float("inf")}),
    "fixed source context (source_prior inf)": ("cora", {"source_prior": float("inf")}),
    "source context keeps the source affine (source_affine on)": ("cora", {"source_affine": True}),
    "no certainty/diversity weighting": ("cora", {"use_weighting": False}),
    "no weight ensembling (src_momentum 1)": ("cora", {"src_momentum": 1.0}),
    "no prior correction": ("cora", {"use_prior_correction": False}),
    "no gradient update (statistics only)": ("cora", {"update_affine": False}),
}
NEEDS_CLEAN = {"dsbn", "context-norm", "cora"}


def load_domains(shared: Path, n: int, corruptions: list[str], severities: list[int]) -> WholeDomainCache:
    """Every (corruption, severity) domain of the first ``n`` exact test images, generated up front in memory."""
    with np.load(shared / "data" / "cifar10" / "test_exact_head.npz") as data:
        x, y = data["x"][:n], data["y"][:n]
    source = WholeDomainCache(GeneratedSource(x, y, seed=0), capacity=len(corruptions) * len(severities))
    for c in corruptions:
        for s in severities:
            source.load(Domain(c, s), np.arange(1))
    return source


class ContextCount:
    """How many contexts received images (the first routed layer's hard routing) over a run."""

    def __init__(self, adapted: tta.AdaptedModel) -> None:
        self.used: set[int] = set()
        router = adapted.model.router
        adapted.model.layers()[0].register_forward_hook(
            lambda m, i, o: self.used.update(router.weights.argmax(1).unique().tolist()))


def run(model: torch.nn.Module, source: WholeDomainCache, setting: str, severities: list[int], method: str,
        overrides: dict[str, object], args: argparse.Namespace, clean: tuple[np.ndarray, np.ndarray]
        ) -> tuple[pd.DataFrame, float, int]:
    """One method on one setting: per-domain results, seconds, contexts used (0 when not CORA)."""
    stream = SettingStream(source, args.corruptions, severities, setting=setting, batch_size=args.batch_size,
                           n_examples=args.gradual_n if setting == "gradual" else None)
    needs_clean = method in NEEDS_CLEAN or get_method(method).requires.source_data
    adapted = tta.adapt(model, method, source_data=clean if needs_clean else None, **overrides)
    counter = ContextCount(adapted) if method == "cora" and overrides.get("contexts") != "single" else None
    started = time.perf_counter()
    df = tta.evaluate(adapted, stream, "domain", device="cpu", model_name=args.arch, seed=0)
    return df, time.perf_counter() - started, len(counter.used) if counter else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--arch", default="resnet20", choices=["resnet20", "resnet32"])
    parser.add_argument("--n", type=int, default=300, help="images per corruption")
    parser.add_argument("--gradual-n", type=int, default=100, help="images per domain of the gradual setting")
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--corruptions", nargs="+", default=list(BENCHMARK_CORRUPTIONS))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD", help="labels of the table to run")
    parser.add_argument("--ablation", action="store_true", help="run CORA's ablation instead of the comparison")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="extra CORA settings for every CORA row (exploration)")
    parser.add_argument("--throughput", action="store_true", help="time CORA against ROID on the same batches "
                        "instead (continual, each twice, interleaved; the faster of the two), with counted costs")
    parser.add_argument("--summarise-recurring", nargs="+", default=None, metavar="[LABEL=]RUN_CSV",
                        help="instead: error (%%) per visit of `tta adapt --setting recurring` result files, one "
                        "row each, labelled LABEL (default: the run's method)")
    parser.add_argument("--part", choices=["online", "ccc"], default=None,
                        help="instead: `tta adapt` runs into --runs and their summary (see the module doc)")
    parser.add_argument("--runs", type=Path, default=Path("runs/own"), help="result files of --part")
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--source-n", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="CSV to write (first line: the command)")
    parser.add_argument("--append", action="store_true", help="keep the other methods' rows of --out")
    args = parser.parse_args()
    if args.summarise_recurring:
        rows = summarise_recurring(args.summarise_recurring)
        if args.out is not None:
            _write(args.out, rows)
        return
    if args.part:
        rows = online(args) if args.part == "online" else ccc(args)
        print(pd.DataFrame(rows).to_string(index=False))
        if args.out is not None:
            _write(args.out, rows)
        return
    torch.set_num_threads(1)
    table = ABLATION if args.ablation else METHODS
    labels = args.methods or list(table)
    extra = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.set)}

    model = tta.load_model(checkpoint=args.shared / "models" / f"cifar10_{args.arch}.th", arch=args.arch)
    needs_gradual = "gradual" in args.settings
    source = load_domains(args.shared, args.n, args.corruptions, [1, 2, 3, 4, 5] if needs_gradual
                          else [args.severity])
    with np.load(args.shared / "data" / "cifar10" / "train_jpeg_10k.npz") as data:
        clean = (data["x"][: args.source_n], data["y"][: args.source_n])
    appending = args.append and args.out is not None and args.out.exists()
    existing = _read(args.out) if appending else []
    previous = _command(args.out) if appending else ""
    rows = [r for r in existing if r["method"] not in labels]
    if args.throughput:
        measured = throughput(model, source, args, clean)
        if args.out is not None:
            _write(args.out, measured)
        return
    baseline: dict[str, pd.Series] = {}
    for label in ["source"] + [m for m in labels if m != "source"]:
        method, overrides = table.get(label, METHODS.get(label, (label, {})))
        if method == "cora":
            overrides = {**overrides, **extra}
        row: dict[str, object] = {"method": label}
        worst, contexts = float("inf"), []
        for setting in args.settings:
            severities = [1, 2, 3, 4, 5] if setting == "gradual" else [args.severity]
            df, seconds, used = run(model, source, setting, severities, method, overrides, args, clean)
            hits = df.accuracy * df.n
            keys = [df.corruption] if setting == "gradual" else [df.corruption, df.severity]  # gradual: few per level
            per_domain = hits.groupby(keys).sum() / df.n.groupby(keys).sum()
            if label == "source":
                baseline[setting] = per_domain
            worst = min(worst, float((per_domain - baseline[setting]).min()))
            row[setting] = round(float(hits.sum() / df.n.sum()), 2)
            contexts.append(str(used))
            print(label, setting, row[setting], f"{seconds:.0f} s", f"contexts {used}", flush=True)
        row["mean"] = round(float(np.mean([row[s] for s in args.settings])), 2)
        row["worst domain vs source"] = round(worst, 2)
        if method == "cora" and overrides.get("contexts") != "single":
            row["contexts"] = " / ".join(contexts)
        if label in labels:
            rows = [r for r in rows if r["method"] != label] + [row]
            if args.out is not None:
                _write(args.out, rows, previous)
    print(pd.DataFrame(rows).to_string(index=False))


def throughput(model: torch.nn.Module, source: WholeDomainCache, args: argparse.Namespace,
               clean: tuple[np.ndarray, np.ndarray]) -> list[dict[str, object]]:
    """Images per second and counted cost of ROID and CORA on the same continual batches, in one run."""
    labels = ["roid", "roid (no consistency)", "cora"]
    specs = {"roid": ("roid", {}), "roid (no consistency)": ("roid", {"use_consistency": False}), "cora": ("cora", {})}
    best: dict[str, float] = {}
    cost: dict[str, float] = {}
    for _ in range(2):
        for label in labels:
            method, overrides = specs[label]
            df, seconds, _ = run(model, source, "continual", [args.severity], method, overrides, args, clean)
            best[label] = min(best.get(label, float("inf")), seconds)
            cost[label] = float((df.relative_cost * df.n).sum() / df.n.sum())
    images = len(args.corruptions) * args.n
    rows = [{"method": label, "images / s": round(images / best[label], 1), "counted cost": round(cost[label], 2),
             "throughput vs roid": round(best["roid"] / best[label], 2)} for label in labels]
    print(pd.DataFrame(rows).to_string(index=False))
    return rows


def adapt(args: argparse.Namespace, name: str, options: list[str]) -> pd.DataFrame:
    """One ``tta adapt`` run into ``--runs/NAME.csv`` (with ``--resume``: a finished run is skipped, a killed one
    continues), its result rows."""
    out = args.runs / f"{name}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "tta.cli", "adapt", *base(args.shared), *options,
               "--data-dir", str(args.runs / "data"), "--out", str(out)]
    print(" ".join(command[1:]), flush=True)
    subprocess.run(command, check=True)
    frame = pd.read_csv(out, comment="#")
    return frame[frame.config_hash == frame.config_hash.iloc[-1]]  # the latest run's rows (a file can hold several)


def online(args: argparse.Namespace) -> list[dict[str, object]]:
    """The source model and CORA on a continual stream under the online protocol at stream speed 1: accuracy over
    every domain, the batches adapted, and the counted cost per image."""
    rows = []
    for method in ("source", "cora"):
        frame = adapt(args, f"online/{method}", ["--method", method, "--setting", "continual", "--protocol", "online",
                                                 "--stream-speed", "1", "--n-examples", str(args.n)])
        rows.append({"method": method,
                     "accuracy": round(float((frame.accuracy * frame.n).sum() / frame.n.sum()), 2),
                     "adapted batches": f"{int(frame.adapted_batches.sum())} / {int(frame.batches.sum())}",
                     "counted cost": round(float((frame.relative_cost * frame.n).sum() / frame.n.sum()), 2)})
    return rows


def ccc(args: argparse.Namespace) -> list[dict[str, object]]:
    """CORA on the 20,000-image CCC-style stream of the long-streams page: per window of 1,000 images, CORA's
    accuracy, the source model's on the same images (same pass), and whether CORA is more than 1 point below it."""
    frame = adapt(args, "ccc/cora", ["--method", "cora", "--setting", "ccc", "--baseline", "20", "--speed", "2000",
                                     "--length", "20000", "--accuracy-window", "1000", "--batch-size", "200"])
    frame = frame.sort_values("window")
    rows = [{"window": int(r.window), "images": int(images), "source (same images)": round(float(r.source_accuracy), 1),
             "cora": round(float(r.accuracy), 1), "cora - source": round(float(r.accuracy - r.source_accuracy), 1),
             "below source - 1": "yes" if str(r.collapse).lower() == "true" else ""}
            for r, images in zip(frame.itertuples(), frame.n.cumsum(), strict=True)]
    below = sum(r["below source - 1"] == "yes" for r in rows)
    print(f"windows below source - 1: {below} / {len(rows)}")
    return rows


def summarise_recurring(files: list[str]) -> list[dict[str, object]]:
    """One row per result file (``LABEL=PATH``, or ``PATH`` named by its method): error (%) per visit, the mean,
    the last visit over the first."""
    rows = []
    for spec in files:
        label, _, path = spec.rpartition("=")  # no "=": ("", "", spec)
        frame = pd.read_csv(Path(path), comment="#")
        error = (frame.error * frame.n).groupby(frame.visit).sum() / frame.n.groupby(frame.visit).sum()
        row: dict[str, object] = {"run": label or str(frame.method.iloc[0])}
        row.update({f"visit {int(v)}": round(float(e), 1) for v, e in error.items()})
        row["mean"] = round(float(error.mean()), 1)
        row["last / first"] = round(float(error.iloc[-1] / error.iloc[0]), 3)
        row["images / visit"] = int(frame.n.groupby(frame.visit).sum().iloc[0])
        rows.append(row)
    print(pd.DataFrame(rows).to_string(index=False))
    return rows


def _read(path: Path) -> list[dict[str, object]]:
    """The rows of a CSV this script wrote (to add methods to it with ``--append``)."""
    frame = pd.read_csv(path, comment="#", dtype=str, keep_default_na=False)
    return frame.to_dict("records")


def _command(path: Path) -> str:
    """The command line(s) that wrote ``path`` (its first line, without ``# command: ``)."""
    with open(path) as f:
        return f.readline().removeprefix("# command: ").strip()


def _write(path: Path, rows: list[dict[str, object]], previous: str = "") -> None:
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/own_method.py", *sys.argv[1:]])
    command = f"{previous} && {command}" if previous and command not in previous else command
    with open(path, "w") as f:
        f.write(f"# command: {command}\n")
        pd.DataFrame(rows).fillna("").to_csv(f, index=False)


def _value(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


if __name__ == "__main__":
    main()
