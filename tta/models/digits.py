"""The demo classifier of the digits benchmark: a small BatchNorm CNN trained at first use and cached.

Three conv-BN-ReLU stages (16, 32, 64 channels, each with stride 2), global average pooling and a linear
layer, behind the training split's per-channel normalisation, so it takes [0, 1] images like every model here.
Training: 15 epochs of Adam (one-cycle schedule peaking at lr 1e-2, batch 64) on the 1,297 training images of
``tta.data.digits``, seeded; about 6 s on one CPU core, 98.6% accuracy on the 500 clean test images. The weights
are cached in ``<data_dir>/models/digits/digits-cnn.pt`` (written under a temporary name, then renamed) with the
recipe they came from, so a changed recipe retrains and a corrupt file is replaced instead of loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from tta.io import save_torch
from tta.models.normalize import normalized

NAME = "digits-cnn"
RECIPE = {"version": 1, "epochs": 15, "lr": 1e-2, "batch_size": 64, "seed": 0}
log = logging.getLogger(__name__)


def digits_cnn(num_classes: int = 10) -> nn.Module:
    """The untrained architecture (see the module docs), without normalisation."""
    def stage(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(*stage(3, 16, 2), *stage(16, 32, 2), *stage(32, 64, 2), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, num_classes))


def train_digits_cnn(images: torch.Tensor, labels: torch.Tensor) -> nn.Module:
    """Train ``digits_cnn`` on float (N, 3, 32, 32) images in [0, 1] with ``RECIPE``; returns it normalised, eval."""
    generator = torch.Generator().manual_seed(RECIPE["seed"])
    torch.manual_seed(RECIPE["seed"])
    mean, std = images.mean(dim=(0, 2, 3)), images.std(dim=(0, 2, 3))
    model = normalized(digits_cnn(), mean.tolist(), std.tolist())
    optimizer = torch.optim.Adam(model.parameters(), lr=RECIPE["lr"])
    batches = -(-len(images) // RECIPE["batch_size"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, RECIPE["lr"], total_steps=RECIPE["epochs"] * batches)
    model.train()
    for _ in range(RECIPE["epochs"]):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), RECIPE["batch_size"]):
            rows = order[start:start + RECIPE["batch_size"]]
            loss = nn.functional.cross_entropy(model(images[rows]), labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def load_digits_cnn(data_dir: str | Path = "data") -> nn.Module:
    """The trained demo classifier from the cache in ``data_dir``, trained and cached first if needed."""
    from tta.data.digits import load_digits_split, one_thread

    path = Path(data_dir) / "models" / "digits" / f"{NAME}.pt"
    model = normalized(digits_cnn(), [0.0] * 3, [1.0] * 3)
    if path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved.get("recipe") == RECIPE:
                model.load_state_dict(saved["state_dict"])
                return model.eval()
        except Exception as err:  # torch raises many types for a bad file (pickle, zip, index, runtime errors)
            log.warning("retraining the digits model: %s is unreadable (%s)", path, err)
    x, y = load_digits_split(train=True)
    with one_thread():
        model = train_digits_cnn(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(y))
    save_torch({"recipe": RECIPE, "state_dict": model.state_dict()}, path)
    return model
