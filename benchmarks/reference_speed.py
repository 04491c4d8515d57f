"""Speed of tta's engine against the reference benchmark's own implementation, on the same batches, in one process.

    python benchmarks/reference_speed.py --md-dir <clone of mariodoebler/test-time-adaptation>/classification \\
        [--methods source,tent,eata] [--checkpoint resnet20.th --arch resnet20] [--data DIR --corruption snow] \\
        [--source-data npz:train.npz] [--n-images 2000] [--memo-images 20] [--repeats 3] [--threads 1] \\
        [--clock wall|cpu] [--out speed.csv]

The reference's methods are imported at run time from ``--md-dir`` (the ``classification/`` folder of the
reference repository; nothing of it is copied here) and built as its ``test_time.py`` builds them: its defaults
merged with ``cfgs/cifar10_c/<method>.yaml``. Both sides get a private copy of the same model and the same uint8
batches from host memory, moved to the device and scaled to [0, 1] per batch; the reference is driven the way its
``get_accuracy`` drives it (``model(x)`` under ``torch.no_grad()``), ``tta`` through ``tta.evaluate``. Building a
method (EATA's Fisher, teacher copies) is not timed. Runs alternate (reference, tta, reference, ...); the median
of ``--repeats`` runs is printed as images per second, with the ratio tta / reference (above 1: tta is faster) and
both accuracies, which should be close (equal for methods without random augmentation); ``--out`` also writes the
rows to a CSV whose first line is the command. ``--clock cpu`` times with this process's CPU time instead of the
elapsed time: on a CPU shared with other work, the time other processes take is then not counted.

Batch size is the reference's CIFAR-10-C one, 200 (MEMO and TTAug: 1, on ``--memo-images`` images). The reference
has no CIFAR-10-C configuration for TTAug: it is built from MEMO's (32 views) with ``MODEL.ADAPTATION ttaug`` and
``MODEL.EPISODIC False`` (TTAug learns nothing; an episodic reset would only add a state copy per image). RMT's
source warm-up (the reference's 50,000 samples, 250 steps) is shortened to ``--rmt-warmup`` samples on both sides
(it is not timed either way); SANTA's and RMT's source prototypes are computed at build time, untimed. The device
is CUDA when available (the reference's methods choose it themselves), else the CPU; ``--device cpu`` hides the GPU
from both.
Without ``--data`` the images are random, without ``--checkpoint`` the weights are: fine to compare speed, but
methods that select samples (EATA, SAR, DeYO) then update on unrepresentative subsets; pass real data and weights
for figures to report.

Runtime adaptations of the reference (none changes a method's computation): its CIFAR-10 training set is served
from ``--source-data`` (default: 512 random images); its EATA call of ``get_source_loader`` gets the ``use_clip``
argument it omits; its LAME is given this model's feature/classifier split (it knows only its own architectures);
its RoTTA's full-precision branch calls ``loss_calculation()`` without the argument it wrongly passes; modules it
imports only for CLIP/webdataset/AutoAttack paths are stubbed when not installed; its RMT, SANTA and GTTA calls of
``get_source_loader`` get the ``use_clip`` argument they omit, as EATA's; its RMT, SANTA and AdaContrast get the same
feature/classifier split as LAME; on the CPU ``.cuda()`` (which its CMF calls) is the identity, and its GTTA's
``reset`` makes its unused style-transfer buffers on the CPU instead of on "cuda" by name.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import types
from functools import partial
from pathlib import Path
from typing import Any

# tta name -> the reference's name for the same method with the same CIFAR-10-C defaults
REFERENCE_NAMES = {"source": "source", "adabn": "norm_test", "tent": "tent", "eta": "eta", "eata": "eata",
                   "rdumb": "rdumb", "sar": "sar", "lame": "lame", "roid": "roid", "deyo": "deyo", "cotta": "cotta",
                   "rotta": "rotta", "memo": "memo", "rpl": "rpl", "cmf": "cmf", "santa": "santa", "rmt": "rmt",
                   "adacontrast": "adacontrast", "ttaug": "ttaug", "gtta": "gtta"}
DEFAULT_METHODS = ("source,tent,eta,eata,sar,lame,roid,deyo,cotta,rotta,memo,rpl,cmf,santa,rmt,gtta,adacontrast,"
                   "ttaug")
PER_IMAGE = ("memo", "ttaug")  # batch size 1 (each image is its own batch of augmented views), on --memo-images
VIEWS = ("memo", "ttaug", "adacontrast")  # the reference's data loader makes their views: timed with the method
FETCH = ("fetch https://github.com/mariodoebler/test-time-adaptation (git clone) and pass --md-dir "
         "<clone>/classification")


def fail(message: str) -> None:
    """Exit with ``message`` on stderr (no traceback: the user has something to fetch or fix)."""
    print(f"reference_speed.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def import_reference(md_dir: Path) -> types.SimpleNamespace:
    """The reference's modules, imported from ``md_dir``; a clear error naming what to fetch when absent."""
    if not (md_dir / "methods" / "base.py").is_file() or not (md_dir / "conf.py").is_file():
        fail(f"{md_dir} is not the reference benchmark's classification/ folder (no methods/base.py, conf.py); "
             + FETCH)
    for name in ("open_clip", "webdataset", "autoattack"):  # imported only for paths never taken here
        if importlib.util.find_spec(name) is None:
            sys.modules[name] = _stub(name)
    sys.path.insert(0, str(md_dir))
    try:
        ref = types.SimpleNamespace(
            conf=importlib.import_module("conf"), methods=importlib.import_module("methods"),
            registry=importlib.import_module("utils.registry").ADAPTATION_REGISTRY,
            eata=importlib.import_module("methods.eata"), lame=importlib.import_module("methods.lame"),
            rotta=importlib.import_module("methods.rotta"), rmt=importlib.import_module("methods.rmt"),
            santa=importlib.import_module("methods.santa"), gtta=importlib.import_module("methods.gtta"),
            model=importlib.import_module("models.model"),
            data_loading=importlib.import_module("datasets.data_loading"))
    except ModuleNotFoundError as err:
        fail(f"the reference's code needs the Python package {err.name!r}: pip install {err.name} (it also uses "
             "yacs, iopath, einops, timm and robustbench)")
    return ref


def _stub(name: str) -> types.ModuleType:
    module = types.ModuleType(name)

    def attribute(attr: str) -> Any:
        if attr.startswith("__"):  # module protocol (__file__, __path__, ...): absent, as for any module
            raise AttributeError(attr)

        def missing(*_: Any, **__: Any) -> None:
            raise RuntimeError(f"{name}.{attr} is not installed; reference_speed.py stubs it (an unused path)")
        return missing

    module.__getattr__ = attribute  # type: ignore[method-assign]
    return module


def patch_reference(ref: types.SimpleNamespace, source_images: Any, source_labels: Any) -> None:
    """Runtime adaptations listed in the module docstring; none changes a method's computation."""
    import torch
    from torch import nn
    from torch.utils.data import Dataset

    from tta.models.surgery import FeatureSplit

    class SourceCIFAR10(Dataset):
        """Stands in for torchvision's CIFAR10 training split: same fields and item format (PIL, then transform)."""

        def __init__(self, root: str, train: bool = True, transform: Any = None, target_transform: Any = None,
                     download: bool = False) -> None:
            self.data, self.targets, self.transform = source_images, [int(t) for t in source_labels], transform

        def __len__(self) -> int:
            return len(self.data)

        def __getitem__(self, i: int) -> tuple[Any, int]:
            from PIL import Image

            img = Image.fromarray(self.data[i])
            return (self.transform(img) if self.transform else img), self.targets[i]

    ref.data_loading.torchvision.datasets.CIFAR10 = SourceCIFAR10
    for module in (ref.eata, ref.rmt, ref.santa, ref.gtta):
        module.get_source_loader = partial(ref.data_loading.get_source_loader, use_clip=False)

    class Features(nn.Module):
        """The input of the model's head; the model is a submodule, so its parameters are shared and copied along."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return FeatureSplit(self.model)(x)[0]

    def split_up_model(model: nn.Module, *_: Any, **__: Any) -> tuple[nn.Module, nn.Module]:
        return Features(model), FeatureSplit(model).classifier

    for module in (ref.lame, ref.rmt, ref.santa, ref.model):  # ref.model: AdaContrast's BaseModel looks it up there
        module.split_up_model = split_up_model
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *_, **__: self  # type: ignore[method-assign]
        nn.Module.cuda = lambda self, *_, **__: self  # type: ignore[method-assign]
        # Its GTTA.reset makes its (without style transfer unused) moment buffers on "cuda" by name.
        ref.gtta.GTTA.reset = lambda self: (super(ref.gtta.GTTA, self).reset(), setattr(
            self, "moments_list", [[torch.tensor([]), torch.tensor([])] for _ in range(2)]))[0]
    loss_calculation = ref.rotta.RoTTA.loss_calculation
    ref.rotta.RoTTA.loss_calculation = lambda self, *_: loss_calculation(self)


def build_reference(ref: types.SimpleNamespace, md_dir: Path, name: str, model: Any, tmp: str,
                    rmt_warmup: int) -> Any:
    """The reference's method ``name`` around ``model``, configured as its test_time.py does for CIFAR-10-C."""
    import numpy as np
    import torch

    cfg = ref.conf.cfg
    cfg.defrost()
    ref.conf.reset_cfg()
    ref.conf.merge_from_file(str(md_dir / "cfgs" / "cifar10_c" / f"{'memo' if name == 'ttaug' else name}.yaml"))
    options = ["CORRUPTION.DATASET", "cifar10_c", "DATA_DIR", tmp, "CKPT_DIR", tmp, "SAVE_DIR", tmp, "RNG_SEED", 1,
               "TEST.NUM_WORKERS", 0, "SOURCE.NUM_WORKERS", 0, "RMT.NUM_SAMPLES_WARM_UP", rmt_warmup]
    if name == "ttaug":
        options += ["MODEL.ADAPTATION", "ttaug", "MODEL.EPISODIC", False]
    cfg.merge_from_list(options + (["TEST.BATCH_SIZE", 200] if name not in PER_IMAGE else []))
    cfg.freeze()
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    model.model_preprocess = None  # what the reference's get_model gives its own CIFAR models
    return ref.registry.get(cfg.MODEL.ADAPTATION)(cfg=cfg, model=model, num_classes=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--md-dir", type=Path, default=Path(os.environ.get("MD_DIR", "classification")),
                        help="the reference repository's classification/ folder (default: $MD_DIR)")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"tta names, comma-separated, of: {','.join(REFERENCE_NAMES)}")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--checkpoint", help="CIFAR ResNet weights (akamaster format); default: random weights")
    parser.add_argument("--data", type=Path, help="CIFAR-10-C-layout folder; default: random images")
    parser.add_argument("--corruption", default="gaussian_noise")
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--source-data",
                        help="clean source data for EATA, SANTA and RMT (npz:PATH, ...); default: random images")
    parser.add_argument("--n-images", type=int, default=2000)
    parser.add_argument("--memo-images", type=int, default=20,
                        help="MEMO and TTAug run at batch size 1: use fewer images")
    parser.add_argument("--rmt-warmup", type=int, default=2000,
                        help="RMT's source warm-up samples on both sides (the reference's 50000: 250 steps, untimed)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto")
    parser.add_argument("--out", type=Path, help="also write the rows to this CSV (first line: the command)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (on a shared CPU, what other "
                             "processes take from it is not counted)")
    args = parser.parse_args()
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in REFERENCE_NAMES]
    if unknown:
        fail(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(REFERENCE_NAMES)}")
    if args.n_images < 1 or args.memo_images < 1 or args.repeats < 1 or args.rmt_warmup < 0:
        fail("--n-images, --memo-images and --repeats must be at least 1, --rmt-warmup at least 0")
    os.environ.setdefault("TQDM_DISABLE", "1")  # the reference's progress bars (prototypes, warm-up)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch starts: the reference picks CUDA whenever it sees it
    md_dir = args.md_dir.expanduser().resolve()
    ref = import_reference(md_dir)
    run(args, methods, ref, md_dir)


def run(args: argparse.Namespace, methods: list[str], ref: types.SimpleNamespace, md_dir: Path) -> None:
    """Build both sides per method and time them, alternating; prints one row per method."""
    import numpy as np
    import torch
    from PIL import Image

    import tta
    import tta.methods
    from tta.data.arrays import array_stream
    from tta.models import cifar_resnet, load_model
    from tta.models.zoo import CIFAR_RESNET_NORM, normalized
    from tta.source import as_source_data

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.clock == "cpu" and device.type != "cpu":
        fail("--clock cpu measures the CPU time of this process: use it with --device cpu")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    if args.checkpoint:
        model = load_model(checkpoint=args.checkpoint, arch=args.arch)
    else:
        model = normalized(cifar_resnet(args.arch), *CIFAR_RESNET_NORM).eval()
    n = max(args.n_images, args.memo_images)
    if args.data:
        start = (args.severity - 1) * 10000
        folder = args.data / "CIFAR-10-C"
        x_all = np.array(np.load(folder / f"{args.corruption}.npy", mmap_mode="r")[start:start + n])
        y_all = np.load(folder / "labels.npy")[start:start + n].astype(np.int64)
    else:
        x_all = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        y_all = rng.integers(0, 10, n)
    source = as_source_data(args.source_data) if args.source_data else None
    if source is None:
        source = as_source_data((rng.integers(0, 256, (512, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 512)))
    patch_reference(ref, *source.arrays())

    def views_transform(name: str, method: Any) -> Any:
        """MEMO, TTAug and AdaContrast take their views from the reference's data loader's transform (timed too)."""
        return ref.data_loading.get_transform("cifar10_c", name, None, False, method.cfg.TEST.N_AUGMENTATIONS)

    def reference_run(name: str, x: Any, y: Any, batch: int) -> tuple[float, float]:
        method = build_reference(ref, md_dir, REFERENCE_NAMES[name], copy.deepcopy(model).to(device), tmp,
                                 args.rmt_warmup)
        views = views_transform(name, method) if name in VIEWS else None
        correct = 0
        sync(device)
        begin = clock()
        with torch.no_grad():  # as the reference's get_accuracy
            for i in range(0, len(x), batch):
                if views is None:
                    xb = x[i:i + batch].to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
                else:  # per image, the list of views its data loader makes (MEMO/TTAug: [image, augmentation 1,
                    # ...]; AdaContrast: [test, weak, strong, strong]), collated position by position
                    per_image = [views(Image.fromarray(img.numpy())) for img in x[i:i + batch]]
                    xb = [torch.stack(v).to(device) for v in zip(*per_image, strict=True)]
                correct += int((method(xb).argmax(1) == y[i:i + batch].to(device)).sum())
        sync(device)
        return len(x) / (clock() - begin), 100 * correct / len(x)

    def tta_run(name: str, x: Any, y: Any, batch: int) -> tuple[float, float]:
        needs_source = tta.methods.get_method(name).requires.source_data
        options = {"warmup_samples": args.rmt_warmup} if name == "rmt" else {}
        adapted = tta.adapt(copy.deepcopy(model), name, source_data=source if needs_source else None, **options)
        stream = array_stream(x, y, batch_size=batch)
        sync(device)
        begin = clock()
        rows = tta.evaluate(adapted, stream, reset="never", device=device)
        sync(device)
        return len(x) / (clock() - begin), float((rows["accuracy"] * rows["n"]).sum() / rows["n"].sum())

    print(f"device={device} arch={args.arch} weights={args.checkpoint or 'random'} "
          f"data={f'{args.data} {args.corruption} s{args.severity}' if args.data else 'random'} "
          f"images={args.n_images} (memo, ttaug {args.memo_images}) rmt warm-up={args.rmt_warmup} "
          f"repeats={args.repeats} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} clock={args.clock} reference={md_dir}", flush=True)
    print(f"{'method':11s} {'reference img/s':>15s} {'tta img/s':>10s} {'tta/ref':>8s} {'acc ref':>8s} {'acc tta':>8s}")
    x_all, y_all = torch.from_numpy(x_all), torch.from_numpy(np.asarray(y_all))
    rows = []
    # The reference's checkpoint folder, kept for the whole run: it caches SANTA's and RMT's source prototypes and
    # RMT's warm-up there, as it does between its own runs (their building is not timed either way).
    tmp = tempfile.mkdtemp(prefix="reference_speed_")
    reference_run("source", x_all[:400], y_all[:400], 200)  # warm-up (allocator, threads)
    tta_run("source", x_all[:400], y_all[:400], 200)
    for name in methods:
        count, batch = (args.memo_images, 1) if name in PER_IMAGE else (args.n_images, 200)
        x, y = x_all[:count], y_all[:count]
        times: dict[str, list[float]] = {"ref": [], "tta": []}
        accuracy = {}
        for _ in range(args.repeats):
            for side, fn in (("ref", reference_run), ("tta", tta_run)):
                speed, accuracy[side] = fn(name, x, y, batch)
                times[side].append(speed)
        r, t = statistics.median(times["ref"]), statistics.median(times["tta"])
        print(f"{name:11s} {r:15.1f} {t:10.1f} {t / r:8.3f} {accuracy['ref']:8.2f} {accuracy['tta']:8.2f}", flush=True)
        rows.append([name, f"{r:.1f}", f"{t:.1f}", f"{t / r:.3f}", f"{accuracy['ref']:.2f}", f"{accuracy['tta']:.2f}"])
        if args.out:  # rewritten after every method: a long run keeps what it measured
            write_csv(args.out, rows)
    shutil.rmtree(tmp, ignore_errors=True)


def write_csv(path: Path, rows: list[list[str]]) -> None:
    """The rows under the command that made them (``# command: ...``) and the table's header."""
    import csv
    import shlex

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        f.write("# command: python benchmarks/reference_speed.py " + " ".join(map(shlex.quote, sys.argv[1:])) + "\n")
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["method", "reference img/s", "tta img/s", "tta/ref", "acc ref", "acc tta"])
        writer.writerows(rows)


def sync(device: Any) -> None:
    """Wait for the device's queued work (timings must include it)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    main()
