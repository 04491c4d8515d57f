"""Train the small ViT that the transformer table measures on: a timm VisionTransformer for 32x32 CIFAR-10 images.

No pretrained transformer weights can be downloaded offline, so this trains one from scratch, on one CPU thread in
about 15 minutes, on the 10,000-image CIFAR-10 training subset of ``../shared`` (or any npz with uint8 ``x``
(N, 32, 32, 3) and int ``y``): timm's ``vit_tiny_patch16_224`` family at patch size 4 (64 patch tokens and a class
token), width 96, depth 4, 3 heads, MLP ratio 2 (0.31M parameters); AdamW with a linear warm-up and cosine decay,
label smoothing, random crops (4-pixel reflection padding) and horizontal flips. Seeded: the same command writes the
same weights on the same machine.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python benchmarks/train_small_vit.py \\
        --data ../shared/data/cifar10/train_jpeg_10k.npz --test ../shared/data/cifar10/test_jpeg.npz \\
        --out models/small_vit_cifar10.pt

The weights go outside the repository (never commit them), as a self-describing ``tta`` model file that names its
timm architecture, so ``tta run --checkpoint FILE ...`` and ``tta.load_model(checkpoint=FILE)`` load it without
further arguments (32x32 inputs, mean = std = 0.5 inside the model).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from guard_train_small import augment  # the same crop-and-flip as the guard models
from torch import nn

from tta.models.saved import FORMAT, VERSION

ARCH = "timm:vit_tiny_patch16_224"
MODEL_KWARGS: dict[str, Any] = {"img_size": 32, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3,
                                "mlp_ratio": 2.0, "num_classes": 10}
RECIPE = {"epochs": 30, "lr": 2e-3, "weight_decay": 0.05, "warmup_epochs": 3, "batch_size": 128,
          "label_smoothing": 0.1, "seed": 0}


def build(model_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The untrained small ViT with its input normalisation, as ``tta.load_model`` rebuilds it from the file."""
    from tta.models import load_model

    return load_model(ARCH, pretrained=False, model_kwargs=dict(model_kwargs or MODEL_KWARGS))


def load_npz(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float [0, 1] NCHW and labels from an npz with uint8 ``x`` (N, H, W, 3) and ``y``."""
    with np.load(path) as data:
        x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).float().div(255)
        y = torch.from_numpy(data["y"]).long()
    return x, y


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy (%) of ``model`` in eval mode."""
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return 100.0 * correct / len(x)


def train(x: torch.Tensor, y: torch.Tensor, recipe: dict[str, Any]) -> tuple[nn.Module, list[dict[str, float]]]:
    """The small ViT trained on ``x``, ``y`` with ``recipe``, and the per-epoch training loss and accuracy."""
    torch.manual_seed(recipe["seed"])
    model = build()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe["lr"])
    steps_per_epoch = math.ceil(len(x) / recipe["batch_size"])
    total, warmup = recipe["epochs"] * steps_per_epoch, recipe["warmup_epochs"] * steps_per_epoch
    def factor(s: int) -> float:  # linear warm-up, then cosine decay to zero
        return (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"])
    gen = torch.Generator().manual_seed(recipe["seed"])
    history = []
    for epoch in range(recipe["epochs"]):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        seen = correct = 0
        loss_sum = 0.0
        for i in range(0, len(x), recipe["batch_size"]):
            idx = order[i:i + recipe["batch_size"]]
            xb, yb = augment(x[idx], gen), y[idx]
            logits = model(xb)
            loss = loss_fn(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            loss_sum += loss.item() * len(idx)
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": 100.0 * correct / seen})
        print(f"epoch {epoch + 1}: loss {loss_sum / seen:.3f}, train acc {100.0 * correct / seen:.1f}%", flush=True)
    return model.eval(), history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="training npz with uint8 x (N, 32, 32, 3) and labels y")
    parser.add_argument("--test", help="test npz (same keys) to report clean accuracy on")
    parser.add_argument("--out", required=True, help="where to write the model file (outside the repository)")
    parser.add_argument("--epochs", type=int, default=RECIPE["epochs"], help="training epochs")
    parser.add_argument("--seed", type=int, default=RECIPE["seed"], help="seed of initialisation and augmentation")
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = dict(RECIPE, epochs=args.epochs, seed=args.seed)
    x, y = load_npz(args.data)
    start = time.perf_counter()
    model, history = train(x, y, recipe)
    seconds = time.perf_counter() - start
    info: dict[str, Any] = {"recipe": recipe, "train_seconds": round(seconds, 1), "train_data": Path(args.data).name,
                            "history": history}
    if args.test:
        info["test_data"] = Path(args.test).name
        info["test_accuracy"] = accuracy(model, *load_npz(args.test))
    ckpt = {"format": FORMAT, "version": VERSION, "method": None,
            "build": {"name": ARCH, "dataset": "cifar10", "pretrained": False, "model_kwargs": dict(MODEL_KWARGS)},
            "settings": {}, "base": ARCH, "training": json.dumps(info), "state_dict": model.state_dict()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, out)
    summary = {k: v for k, v in info.items() if k != "history"}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
