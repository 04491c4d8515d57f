"""Speed of tta against the authors' own implementations of petta, tribe, unmix-tns, shot-im and foa, on the same
batches, in one process per method.

    python benchmarks/official_speed.py --data DATA --checkpoint resnet20.th --source-data npz:test.npz \\
        --petta PETTA --tribe TRIBE --unmix UNMIX --shotim SHOTIM --foa FOA --vit-checkpoint small_vit.pt \\
        [--shared ../shared] [--methods petta,tribe,unmix-tns,shot-im,foa] [--n 1000] [--foa-n 128] [--repeats 3] \\
        [--clock wall|cpu] [--out speed.csv]

The authors' code is imported at run time (nothing of it is copied here) through the parity drivers, which say what
each needs and which runtime adaptations they make: ``official_petta_tribe.py`` (hthieu166/petta, ``--petta``;
Gorilla-Lab-SCUT/TRIBE, ``--tribe``), ``official_shot_unmix.py`` (devavratTomar/unmixtns, ``--unmix``: its
``source`` method with 16 UnMix-TNS components; the online SHOT-IM of MotasemAlfarra/Online_Test_Time_Adaptation,
``--shotim``) and ``vit_foa_parity.py`` (mr-eggplant/FOA, ``--foa``). Each of these options takes an exported
working copy or a bare git directory of the repository, which is then exported to a temporary folder.

The ResNet methods see the first ``--n`` images of each of ``--corruptions`` (severity 5, ``tta``'s continual
stream from the CIFAR-10-C-layout folder ``--data``) at the authors' CIFAR-10 batch size (PeTTA and TRIBE 64,
UnMix-TNS and SHOT-IM 200); both sides get a private copy of the same model (``tta``'s CIFAR ResNet, which the
UnMix-TNS and SHOT-IM drivers are given instead of their own copy of the same network) and the same float batches,
and are timed over the same loop: prediction under ``torch.no_grad()`` batch after batch, accuracy counted on what
each returns. FOA runs on the small CIFAR-10 ViT (``--vit-checkpoint``) over ``--foa-n`` images per corruption,
batch 64, reset between corruptions. Building a method (source statistics, prototypes, copies) is not timed. Runs
alternate (authors', tta, authors', ...); the median of ``--repeats`` runs is printed as images per second with the
ratio tta / authors' (above 1: tta is faster) and both accuracies (%). ``--clock cpu`` times this process's CPU
time instead of the elapsed time (on a shared CPU, what other processes take is then not counted). Each method
runs in a process of its own, with one torch thread: the authors' repositories use clashing top-level module names.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPOSITORIES = {"petta": "hthieu166/petta", "tribe": "Gorilla-Lab-SCUT/TRIBE", "unmix-tns": "devavratTomar/unmixtns",
                "shot-im": "MotasemAlfarra/Online_Test_Time_Adaptation", "foa": "mr-eggplant/FOA"}
BATCH_SIZE = {"petta": 64, "tribe": 64, "unmix-tns": 200, "shot-im": 200, "foa": 64}
OPTION = {"petta": "petta", "tribe": "tribe", "unmix-tns": "unmix", "shot-im": "shotim", "foa": "foa"}
# the folder of each repository the drivers need (bare mirrors may lack the large files elsewhere)
EXPORT = {"petta": ".", "tribe": ".", "unmix-tns": "tta_experiments", "shot-im": "."}
HEADER = ["method", "authors' code", "batch", "images", "authors' img/s", "tta img/s", "tta/authors'",
          "acc authors'", "acc tta"]


def fail(message: str) -> None:
    """Exit with ``message`` on stderr (no traceback: the user has something to fetch or fix)."""
    print(f"official_speed.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def working_copy(path: Path, folder: str, into: Path) -> Path:
    """``path`` itself when it is a working copy, else ``folder`` of HEAD of the bare git directory ``path``,
    exported under ``into``; the returned path is the repository's root either way."""
    if not (path / "HEAD").is_file() or not (path / "objects").is_dir():
        return path
    archive = subprocess.run(["git", "-C", str(path), "archive", "HEAD", folder], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def timed(clock: Callable[[], float], run: Callable[[], float], images: int) -> tuple[float, float]:
    """(images per second, accuracy) of ``run``, which returns the accuracy."""
    begin = clock()
    accuracy = run()
    return images / (clock() - begin), accuracy


def resnet_sides(a: argparse.Namespace, root: Path) -> tuple[Callable[[], Any], Callable[[], Any], Any, int]:
    """Builders of the authors' and of tta's predictor (``predict(x, y)``), the batches and their image count."""
    import official_petta_tribe as pt
    import official_shot_unmix as su

    import tta
    import tta.methods
    from tta.models import load_model

    stream = argparse.Namespace(setting="continual", data=a.data, corruptions=a.corruptions, n=a.n,
                                batch_size=BATCH_SIZE[a.child], seed=a.seed, visits=1)
    batches = pt.stream_batches(stream)
    model = load_model(checkpoint=a.checkpoint, arch=a.arch)
    su.load = lambda *_: copy.deepcopy(model)  # the same network on both sides (the drivers' own is the same one)
    pt.cuda_is_identity()
    if a.child in ("petta", "tribe"):
        build = pt.official_petta if a.child == "petta" else pt.official_tribe
        driver = argparse.Namespace(official=root, seed=a.seed, source_data=a.source_data)

        def official() -> Any:
            return build(driver, copy.deepcopy(model))
    else:
        driver = argparse.Namespace(repo=root / EXPORT[a.child], method="source", components=16, init_seed=0,
                                    batch_size=BATCH_SIZE[a.child], seed=a.seed, opts=[], checkpoint=a.checkpoint)
        make = su.unmix_method if a.child == "unmix-tns" else su.shot_method

        def official() -> Any:
            method = make(driver)
            return lambda x, y: method(x)

    def ours() -> Any:
        source = a.source_data if tta.methods.get_method(a.child).requires.source_data else None
        adapted = tta.adapt(copy.deepcopy(model), a.child, source_data=source)
        return lambda x, y: adapted(x)

    def run(build: Callable[[], Any]) -> Callable[[], float]:
        predict = build()
        return lambda: mean_accuracy(pt.accuracy(predict, batches, a.seed))

    return (lambda: run(official)), (lambda: run(ours)), batches, sum(len(y) for _, y, _ in batches)


def foa_sides(a: argparse.Namespace, root: Path) -> tuple[Callable[[], Any], Callable[[], Any], Any, int]:
    """As ``resnet_sides`` for FOA on the small ViT, through ``vit_foa_parity.py``'s builders and loops."""
    import vit_foa_parity as vf

    import tta

    model = tta.load_model(checkpoint=a.vit_checkpoint)
    source, labels, stream = vf.parity_data(a.shared, a.corruptions.split(","), a.foa_n)
    for _ in stream:  # generate and cache the corrupted images before anything is timed
        pass

    def official() -> Callable[[], float]:
        adapt = vf.build_official(root, copy.deepcopy(model), source, a.seed)
        return lambda: mean_accuracy(vf.official_accuracy(model, adapt, stream))

    def ours() -> Callable[[], float]:
        adapted = vf.build_ours(copy.deepcopy(model), source, labels, a.seed)
        return lambda: mean_accuracy(vf.ours_accuracy(adapted, stream))

    return official, ours, stream, a.foa_n * len(stream.domains)


def mean_accuracy(per_domain: Any) -> float:
    """The mean over domains of a per-domain accuracy (a dict or a list of %)."""
    values = list(per_domain.values()) if isinstance(per_domain, dict) else list(per_domain)
    return float(sum(values) / len(values))


def child(a: argparse.Namespace) -> None:
    """Time one method (``a.child``), alternating, and print its row as JSON on the last line."""
    import torch

    torch.set_num_threads(1)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        path = getattr(a, OPTION[a.child]).expanduser().resolve()
        if a.child == "foa":
            import vit_foa_parity as vf

            official, ours, _, images = foa_sides(a, vf.official_checkout(path, Path(tmp)))
        else:
            official, ours, _, images = resnet_sides(a, working_copy(path, EXPORT[a.child], Path(tmp)))
        times: dict[str, list[float]] = {"official": [], "tta": []}
        accuracy: dict[str, float] = {}
        for _ in range(a.repeats):
            for side, build in (("official", official), ("tta", ours)):
                speed, accuracy[side] = timed(clock, build(), images)  # building is outside the timing
                times[side].append(speed)
    o, t = statistics.median(times["official"]), statistics.median(times["tta"])
    row = [a.child, REPOSITORIES[a.child], str(BATCH_SIZE[a.child]), str(images), f"{o:.1f}", f"{t:.1f}",
           f"{t / o:.3f}", f"{accuracy['official']:.2f}", f"{accuracy['tta']:.2f}"]
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(REPOSITORIES), help=f"of: {','.join(REPOSITORIES)}")
    for name, option in OPTION.items():
        parser.add_argument(f"--{option}", type=Path, help=f"{REPOSITORIES[name]}: a working copy or bare git dir")
    parser.add_argument("--data", type=Path, help="the folder holding CIFAR-10-C/ (ResNet methods)")
    parser.add_argument("--checkpoint", help="CIFAR ResNet weights (ResNet methods)")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--source-data", help="clean source images (petta's source statistics), e.g. npz:PATH")
    parser.add_argument("--corruptions", default="gaussian_noise")
    parser.add_argument("--n", type=int, default=1000, help="images per corruption (ResNet methods)")
    parser.add_argument("--vit-checkpoint", type=Path, help="the small CIFAR-10 ViT (foa)")
    parser.add_argument("--shared", type=Path, default=Path("../shared"), help="holds data/cifar10 (foa)")
    parser.add_argument("--foa-n", type=int, default=128, help="images per corruption for foa")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--out", type=Path, help="also write the rows to this CSV (first line: the command)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one method, in its own process
    a = parser.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the authors' progress bars (source statistics)
    if a.child:
        child(a)
        return
    methods = a.methods.split(",")
    unknown = [m for m in methods if m not in REPOSITORIES]
    if unknown:
        fail(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(REPOSITORIES)}")
    needs = [OPTION[m] for m in methods] + (["data", "checkpoint"] if set(methods) - {"foa"} else [])
    needs += (["vit-checkpoint"] if "foa" in methods else []) + (["source-data"] if "petta" in methods else [])
    missing = [f"--{o}" for o in needs if getattr(a, o.replace("-", "_")) is None]
    if missing:
        fail(f"{', '.join(missing)} missing: pass the authors' repositories and the data the chosen methods need")
    if a.n < 1 or a.foa_n < 1 or a.repeats < 1:
        fail("--n, --foa-n and --repeats must be at least 1")
    print(f"{'method':10s} {'authors img/s':>13s} {'tta img/s':>10s} {'tta/authors':>11s} {'acc authors':>11s} "
          f"{'acc tta':>8s}", flush=True)
    rows = []
    for method in methods:
        result = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", method], stdout=subprocess.PIPE,
                                text=True)
        if result.returncode != 0:
            fail(f"timing {method} failed (exit status {result.returncode}); its error is printed above")
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row[0]:10s} {row[4]:>13s} {row[5]:>10s} {row[6]:>11s} {row[7]:>11s} {row[8]:>8s}", flush=True)
        if a.out:  # rewritten after every method: a long run keeps what it measured
            a.out.parent.mkdir(parents=True, exist_ok=True)
            with a.out.open("w", newline="") as f:
                f.write("# command: python benchmarks/official_speed.py " + " ".join(map(shlex.quote, sys.argv[1:]))
                        + "\n")
                csv.writer(f, lineterminator="\n").writerows([HEADER, *rows])


if __name__ == "__main__":
    main()
