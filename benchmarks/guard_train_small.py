"""Train the guard evaluation's own model families on CIFAR-10 images: models the guard was not designed on.

Each is trained here, on CPU in a few minutes (one thread), on the 10,000-image CIFAR-10 training subset of
``../shared`` (or any npz with uint8 ``x`` (N, 32, 32, 3) and ``y``), with one of three recipes (``--recipe``):

- ``ls``: a small BatchNorm CNN with label smoothing (0.1): its confidences differ in kind from the
  cross-entropy-trained ResNets (never fully confident on clean images, yet confidently wrong under strong shift);
- ``mixup``: the same CNN trained with mixup (alpha 1.0), which also softens confidences, differently;
- ``mlp``: a three-layer MLP with BatchNorm1d on the flattened image (no convolution at all).

    PYTHONPATH=$PWD python benchmarks/guard_train_small.py --data ../shared/data/cifar10/train_jpeg_10k.npz \\
        --recipe mixup --out /tmp/guard_models/smallcnn_mixup.pt

The weights are written outside the repository (never commit them); ``load_small_cnn`` loads them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tta.models.normalize import normalized

RECIPES: dict[str, dict[str, Any]] = {
    "ls": {"arch": "cnn", "epochs": 12, "lr": 5e-3, "batch_size": 128, "label_smoothing": 0.1, "mixup": 0.0,
           "seed": 0, "width": 32},
    "mixup": {"arch": "cnn", "epochs": 12, "lr": 5e-3, "batch_size": 128, "label_smoothing": 0.0, "mixup": 1.0,
              "seed": 0, "width": 32},
    "mlp": {"arch": "mlp", "epochs": 12, "lr": 2e-3, "batch_size": 128, "label_smoothing": 0.0, "mixup": 0.0,
            "seed": 0, "width": 512},
}


def small_cnn(width: int = 32, num_classes: int = 10) -> nn.Module:
    """Four conv-BN-ReLU stages (width, 2 width, 4 width, 4 width; stride 2 from the second), pooling, linear."""
    def stage(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(*stage(3, width, 1), *stage(width, 2 * width, 2), *stage(2 * width, 4 * width, 2),
                         *stage(4 * width, 4 * width, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4 * width, num_classes))


def small_mlp(width: int = 512, num_classes: int = 10) -> nn.Module:
    """Flatten, then Linear-BatchNorm1d-ReLU twice (width, width / 2), then a linear head."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, width, bias=False), nn.BatchNorm1d(width),
                         nn.ReLU(inplace=True), nn.Linear(width, width // 2, bias=False), nn.BatchNorm1d(width // 2),
                         nn.ReLU(inplace=True), nn.Linear(width // 2, num_classes))


def build(recipe: dict[str, Any]) -> nn.Module:
    """The untrained network of ``recipe``."""
    return small_mlp(recipe["width"]) if recipe.get("arch") == "mlp" else small_cnn(recipe["width"])


def load_small_cnn(path: str | Path) -> nn.Module:
    """The model ``main`` saved at ``path`` (normalisation included), in eval mode."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = normalized(build(saved["recipe"]), saved["mean"], saved["std"])
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop (4-pixel reflection padding) and horizontal flip, per image."""
    n = x.shape[0]
    padded = nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2, n), generator=generator)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32] for i in range(n)])
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="npz with uint8 x (N, 32, 32, 3) and labels y")
    parser.add_argument("--out", required=True, help="weights file (outside the repository)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="ls")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    recipe = RECIPES[args.recipe]
    torch.set_num_threads(args.threads)
    torch.manual_seed(recipe["seed"])
    generator = torch.Generator().manual_seed(recipe["seed"])
    data = np.load(args.data)
    x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(data["y"]).long()
    mean, std = x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()
    model = normalized(build(recipe), mean, std)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=5e-4)
    batches = -(-len(x) // recipe["batch_size"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe["lr"], total_steps=recipe["epochs"] * batches)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe["label_smoothing"])
    start = time.perf_counter()
    model.train()
    for epoch in range(recipe["epochs"]):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for i in range(0, len(x), recipe["batch_size"]):
            rows = order[i:i + recipe["batch_size"]]
            images, labels = augment(x[rows], generator), y[rows]
            if recipe["mixup"]:
                weight = float(torch.distributions.Beta(recipe["mixup"], recipe["mixup"]).sample())
                partner = torch.randperm(len(rows), generator=generator)
                out = model(weight * images + (1 - weight) * images[partner])
                loss = weight * loss_fn(out, labels) + (1 - weight) * loss_fn(out, labels[partner])
            else:
                loss = loss_fn(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(rows)
        print(f"epoch {epoch + 1}: loss {total / len(x):.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"recipe": recipe, "mean": mean, "std": std, "state_dict": model.eval().state_dict()}, args.out)


if __name__ == "__main__":
    main()
