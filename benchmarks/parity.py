"""Parity with the reference benchmark (mariodoebler/test-time-adaptation): feed ``tta`` the exact batches the
reference implementation saw and compare accuracies per corruption.

    # 1. the reference run writes its accuracies and the exact image order of every pass
    #    (see its own instructions; it needs the reference repository's classification/ folder)
    MD_DIR=... python md_reference.py --data DATA --checkpoint resnet20.th --depth 20 --n 1000 --methods eata \\
        --setting reset_each_shift --severities 5 --batch-size 200 --out md.csv --order-out order.csv
    # 2. tta on the same images, order, model and settings
    python benchmarks/parity.py --data DATA --order order.csv --reference md.csv --checkpoint resnet20.th \\
        --arch resnet20 --method eata --reference-method eata --source-data npz:train.npz [--set key=value ...]

RMT's source warm-up is one random draw per side (the order of the source batches). To compare the adaptation
itself, keep the reference's warm-up: run md_reference.py with a kept ``CKPT_DIR`` instead of its temporary one (the
reference then writes, and on later runs reuses, ``CKPT_DIR/warmup/ckpt_warmup_cifar10_c_Standard_bs200.pth``) and
give that file to ``--reference-warmup`` with ``--set warmup_samples=0``: tta's student, teacher and Adam state
start where the reference's warm-up left them (the projector and the source replay remain each side's own draws).

``--data`` is the CIFAR-10-C-layout folder both runs read (``DATA/CIFAR-10-C/<corruption>.npy``). The reset rule
is the reference's: before every pass for ``reset_each_shift`` (and its ``_correlated`` variant), once at the start
otherwise. Prints one row per corruption with both accuracies and their difference, and appends them to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import tta
from tta.config import parse_overrides
from tta.models import load_model


def read_order(path: Path) -> dict[tuple[str, str, int], list[tuple[str, int]]]:
    """(setting, pass, severity) -> [(corruption, .npy row)] in stream order."""
    passes: dict[tuple[str, str, int], list[tuple[int, str, int]]] = defaultdict(list)
    with open(path) as f:
        for r in csv.DictReader(f):
            passes[(r["setting"], r["pass"], int(r["severity"]))].append((int(r["position"]), r["corruption"],
                                                                            int(r["row"])))
    return {k: [(c, row) for _, c, row in sorted(v)] for k, v in passes.items()}


def load_reference_warmup(adapted: tta.AdaptedModel, path: Path) -> None:
    """Start tta's ``rmt`` from the reference's saved warm-up (student, teacher, Adam state), so that ``reset()``
    returns there. Parameters are matched in module order (the reference saves whole state dicts under its own
    names); its optimizer holds the model's parameters and then the projector's, the order of ``rmt.params()``."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for module, state in ((adapted.model, ckpt["model"]), (adapted.teacher, ckpt["model_ema"])):
        theirs = [v for k, v in state.items() if k.rsplit(".", 1)[-1] in ("weight", "bias")]
        mine = list(module.parameters())
        if [tuple(t.shape) for t in theirs] != [tuple(p.shape) for p in mine]:
            raise SystemExit(f"{path} does not hold this architecture's parameters")
        with torch.no_grad():
            for p, t in zip(mine, theirs, strict=True):
                p.copy_(t)
    state = adapted.optimizer.state_dict()
    state["state"] = ckpt["optimizer"]["state"]
    adapted.optimizer.load_state_dict(state)
    adapted._snapshot = adapted._capture()  # what reset() returns to


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--order", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True, help="the reference run's accuracy CSV")
    parser.add_argument("--reference-method", help="the method's name in the reference CSV (default: --method)")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--method", required=True)
    parser.add_argument("--batch-size", type=int, default=200)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--preset")
    parser.add_argument("--source-data")
    parser.add_argument("--window", type=int, default=0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--reference-warmup", type=Path,
                        help="rmt: start from the reference's warm-up checkpoint (use with --set warmup_samples=0)")
    a = parser.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)

    model = load_model(checkpoint=a.checkpoint, arch=a.arch)
    adapted = tta.adapt(model, a.method, source_data=a.source_data, window=a.window, preset=a.preset,
                        **parse_overrides(a.overrides))
    if a.reference_warmup:
        load_reference_warmup(adapted, a.reference_warmup)
    labels = np.load(a.data / "CIFAR-10-C" / "labels.npy")
    files: dict[str, np.ndarray] = {}
    hits: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    setting = None
    for i, ((setting, _, severity), order) in enumerate(read_order(a.order).items()):
        if i == 0 or setting.startswith("reset_each_shift"):
            adapted.reset()
        for start in range(0, len(order), a.batch_size):
            chunk = order[start:start + a.batch_size]
            x = np.stack([files.setdefault(c, np.load(a.data / "CIFAR-10-C" / f"{c}.npy", mmap_mode="r"))[row]
                          for c, row in chunk])
            y = torch.from_numpy(np.array([labels[row] for _, row in chunk], dtype=np.int64))
            x = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255)
            pred = adapted(x).argmax(1)
            for (c, _), ok in zip(chunk, (pred == y).tolist(), strict=True):
                hits[(c, severity)][0] += int(ok)
                hits[(c, severity)][1] += 1

    ref_name = a.reference_method or a.method
    reference = {}
    with open(a.reference) as f:
        for r in csv.DictReader(f):
            if r["method"] == ref_name and r["setting"] == setting:
                reference[(r["corruption"], int(r["severity"]))] = 100 * float(r["accuracy"])
    rows = []
    for (c, s), (ok, n) in hits.items():
        ours = 100 * ok / n
        ref = reference.get((c, s), float("nan"))
        rows.append({"method": a.method, "setting": setting, "corruption": c, "severity": s, "n": n,
                     "tta": round(ours, 2), "reference": round(ref, 2), "diff": round(ours - ref, 2)})
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("tta", "reference", "diff")}
    for r in rows:
        print(f"{r['corruption']:18s} s{r['severity']} n={r['n']:5d} tta {r['tta']:6.2f} "
              f"reference {r['reference']:6.2f} diff {r['diff']:+.2f}")
    print(f"{a.method} {setting}: mean tta {mean['tta']:.2f} reference {mean['reference']:.2f} "
          f"diff {mean['diff']:+.2f}", file=sys.stderr)
    if a.out:
        new = not a.out.exists()
        with open(a.out, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main()
