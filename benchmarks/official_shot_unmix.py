"""Parity driver: runs the authors' own code of UnMix-TNS (devavratTomar/unmixtns, tta_experiments/: its UnMix-TNS layer
and its source/tent/roid/rotta methods, built from its cfg defaults + cfgs/cifar10_c/<method>.yaml) or of online
SHOT-IM (MotasemAlfarra/Online_Test_Time_Adaptation, tta_methods/shot_im.py) on a CIFAR-10-C-layout folder, feeding
the images in the exact order of an order file written by md_reference.py (--order-out), with the CIFAR ResNet of
cifar_resnet.py; writes accuracy per corruption in md_reference.py's CSV format, for benchmarks/parity.py.

Usage: python benchmarks/official_shot_unmix.py --code unmix --repo <export>/tta_experiments --method tent \\
           --components 16 ...
       python benchmarks/official_shot_unmix.py --code shotim --repo <export> --method shotim ...
Patches (none changes an algorithm): the unmix code's models.model (timm/robustbench model zoo, unused here) is
stubbed with the one class its methods import; UnMix-TNS's random component start is drawn right after
torch.manual_seed(--init-seed) (test_time.py draws it after building its model). The loop is the authors' eval loop
without its bookkeeping: reset before the first pass (and before every pass for reset_each_shift), then
predictions = method(x) batch after batch. Alfarra's delayed_eval_online with eta=0 also times an extra forward of
the adapted model in train mode, which only moves BatchNorm running statistics that train mode never reads: left out
(it calls torch.cuda.synchronize, which needs a GPU)."""
import argparse
import csv
import importlib.util
import sys
import time
import types
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "shared" / "tools"))  # cifar_resnet.py
from cifar_resnet import load


def unmix_method(a):
    sys.path.insert(0, str(a.repo))
    stub = types.ModuleType("models.model")
    stub.ResNetDomainNet126 = type("ResNetDomainNet126", (nn.Module,), {})
    stub.split_up_model = lambda *_, **__: (_ for _ in ()).throw(RuntimeError("stubbed"))  # LAME only
    pkg = types.ModuleType("models")
    pkg.__path__ = []
    sys.modules["models"], sys.modules["models.model"] = pkg, stub
    import conf
    import methods  # noqa: F401
    from unmixtns import replace_bn_layers
    from utils.registry import ADAPTATION_REGISTRY
    cfg = conf.cfg
    cfg.defrost()
    conf.merge_from_file(str(a.repo / "cfgs" / "cifar10_c" / f"{a.method}.yaml"))
    cfg.merge_from_list(["TEST.BATCH_SIZE", a.batch_size, "CORRUPTION.DATASET", "cifar10_c", "RNG_SEED", a.seed,
                        *a.opts])
    cfg.freeze()
    model = load(a.checkpoint, 20)
    if a.components > 0:
        torch.manual_seed(a.init_seed)
        replace_bn_layers(model, a.components, cfg.TEST.BATCH_SIZE, cfg.UNMIXTNS.BATCH_SIZE_MAX)
    name = {"source": "Source", "tent": "Tent", "roid": "ROID", "rotta": "RoTTA"}[a.method]
    return ADAPTATION_REGISTRY.get(name)(cfg=cfg, model=model, num_classes=10)


def shot_method(a):
    spec = importlib.util.spec_from_file_location("shot_im", a.repo / "tta_methods" / "shot_im.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = argparse.Namespace(steps=1, beta_clustering_loss=0.0, update_bn_only=False)
    shot = mod.SHOTIM(load(a.checkpoint, 20), args)
    shot.model_state, shot.optimizer_state = mod.copy_model_and_optimizer(shot.model, shot.optimizer)
    return shot


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", choices=["unmix", "shotim"], required=True)
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--name", help="method name written to the CSV (default: --method)")
    p.add_argument("--components", type=int, default=16, help="UnMix-TNS K (0: keep BatchNorm)")
    p.add_argument("--init-seed", type=int, default=0)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--order", type=Path, required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--batch-size", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--opts", nargs="*", default=[])
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.set_num_threads(1)
    model = unmix_method(a) if a.code == "unmix" else shot_method(a)
    torch.manual_seed(a.seed)
    passes = defaultdict(list)
    with open(a.order) as f:
        for r in csv.DictReader(f):
            passes[(r["setting"], r["pass"], int(r["severity"]))].append((int(r["position"]), r["corruption"],
                                                                         int(r["row"])))
    labels = np.load(a.data / "CIFAR-10-C" / "labels.npy")
    files, hits = {}, defaultdict(lambda: [0, 0])
    t0 = time.perf_counter()
    for i, ((setting, _, sev), order) in enumerate(passes.items()):
        order = [(c, r) for _, c, r in sorted(order)]
        if i == 0 or setting.startswith("reset_each_shift"):
            model.reset()
        for s in range(0, len(order), a.batch_size):
            chunk = order[s:s + a.batch_size]
            x = np.stack([files.setdefault(c, np.load(a.data / "CIFAR-10-C" / f"{c}.npy", mmap_mode="r"))[r]
                          for c, r in chunk])
            x = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255)
            y = torch.tensor([int(labels[r]) for _, r in chunk])
            with torch.no_grad():
                pred = model(x).argmax(1)
            for (c, _), ok in zip(chunk, (pred == y).tolist(), strict=True):
                hits[(c, sev)][0] += int(ok)
                hits[(c, sev)][1] += 1
    dt = time.perf_counter() - t0
    with open(a.out, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "model", "corruption", "severity", "n", "accuracy", "seconds",
                                          "setting"])
        if f.tell() == 0:
            w.writeheader()
        for (c, sev), (ok, n) in hits.items():
            row = dict(method=a.name or a.method, model="resnet20", corruption=c, severity=sev, n=n,
                       accuracy=round(ok / n, 6), seconds=round(dt, 2), setting=setting)
            w.writerow(row)
            print(row, flush=True)


if __name__ == "__main__":
    main()
