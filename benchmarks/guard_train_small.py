"""Train the guard evaluation's third model family: a small BatchNorm CNN with label smoothing, on CIFAR-10 images.

The guard is evaluated on models it was not designed on; this one is trained here, on CPU in a few minutes (one
thread), on the 10,000-image CIFAR-10 training subset of ``../shared`` (or any npz with uint8 ``x`` (N, 32, 32, 3)
and ``y``). Label smoothing (0.1) makes its confidences differ in kind from the cross-entropy-trained ResNets: it is
never fully confident on clean images, yet, like most models, confidently wrong under strong corruption.

    PYTHONPATH=$PWD python benchmarks/guard_train_small.py --data ../shared/data/cifar10/train_jpeg_10k.npz \\
        --out /tmp/guard_models/smallcnn_ls.pt

The weights are written outside the repository (never commit them); ``load_small_cnn`` loads them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tta.models.normalize import normalized

RECIPE = {"epochs": 12, "lr": 5e-3, "batch_size": 128, "label_smoothing": 0.1, "seed": 0, "width": 32}


def small_cnn(width: int = 32, num_classes: int = 10) -> nn.Module:
    """Four conv-BN-ReLU stages (width, 2 width, 4 width, 4 width; stride 2 from the second), pooling, linear."""
    def stage(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(*stage(3, width, 1), *stage(width, 2 * width, 2), *stage(2 * width, 4 * width, 2),
                         *stage(4 * width, 4 * width, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4 * width, num_classes))


def load_small_cnn(path: str | Path) -> nn.Module:
    """The model ``main`` saved at ``path`` (normalisation included), in eval mode."""
    saved = torch.load(path, map_location="cpu", weights_only=True)
    model = normalized(small_cnn(saved["recipe"]["width"]), saved["mean"], saved["std"])
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
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(RECIPE["seed"])
    generator = torch.Generator().manual_seed(RECIPE["seed"])
    data = np.load(args.data)
    x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(data["y"]).long()
    mean, std = x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()
    model = normalized(small_cnn(RECIPE["width"]), mean, std)
    optimizer = torch.optim.AdamW(model.parameters(), lr=RECIPE["lr"], weight_decay=5e-4)
    batches = -(-len(x) // RECIPE["batch_size"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, RECIPE["lr"], total_steps=RECIPE["epochs"] * batches)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=RECIPE["label_smoothing"])
    start = time.perf_counter()
    model.train()
    for epoch in range(RECIPE["epochs"]):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for i in range(0, len(x), RECIPE["batch_size"]):
            rows = order[i:i + RECIPE["batch_size"]]
            loss = loss_fn(model(augment(x[rows], generator)), y[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(rows)
        print(f"epoch {epoch + 1}: loss {total / len(x):.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"recipe": RECIPE, "mean": mean, "std": std, "state_dict": model.eval().state_dict()}, args.out)


if __name__ == "__main__":
    main()
