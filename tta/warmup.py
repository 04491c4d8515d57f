"""Source warm-up of AFN layers and its checkpoint format.

The AFN recipe (Zhou & Chen 2023; METHODS.md section 5) trains only the AFN parameters with cross-entropy on clean
source data while every pretrained weight stays frozen. ``warmup_afn`` does that for any BN network (converting it
first) and returns an ``AFNWarmup`` whose ``save`` writes a checkpoint that ``tta adapt --method afn
--afn-checkpoint FILE`` and ``tta.adapt(model, "afn", afn_checkpoint=FILE)`` load.

A checkpoint is a ``torch.save`` dict: ``format``/``version``, ``state_dict`` (the whole converted model), the
``settings`` needed to rebuild its AFN layers, a ``base_fingerprint`` (SHA-256 of the base model's state_dict, so
that loading it onto other weights is a clear error instead of silently wrong numbers), a human-readable ``base``
description and the ``warmup`` settings and per-epoch history. It holds only tensors and plain values, so it loads
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tta.errors import ConfigError, InputError, ModelError
from tta.norm.afn import afn_layers, afn_parameters, convert_to_afn

FORMAT = "tta.afn-warmup"
VERSION = 1


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every state_dict entry's name, dtype, shape and bytes: equal iff the weights are identical."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class AFNWarmup:
    """A warmed-up AFN model (eval mode, on the CPU) with what is needed to save and reload it."""

    model: nn.Module
    base_fingerprint: str
    settings: dict[str, Any]
    warmup: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    base: str = ""

    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint dict that ``save`` writes."""
        return {"format": FORMAT, "version": VERSION, "base": self.base, "base_fingerprint": self.base_fingerprint,
                "settings": dict(self.settings), "warmup": dict(self.warmup), "history": list(self.history),
                "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}

    def save(self, path: str | Path) -> Path:
        """Write the checkpoint atomically (temporary file, then rename); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save(self.checkpoint(), tmp)
        os.replace(tmp, path)
        return path


def _as_images(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as (N, C, H, W) uint8 or float tensor and labels as int64; numpy arrays are NHWC (as the npz files)."""
    if isinstance(x, np.ndarray):
        if x.ndim != 4:
            raise InputError(f"expected source images of shape (N, H, W, C), got {x.shape}; pass NHWC uint8 arrays")
        x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise InputError("expected source images as an (N, C, H, W) tensor or an (N, H, W, C) numpy array")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise InputError(f"source images must be uint8 or float in [0, 1], got dtype {x.dtype}")
    y = torch.as_tensor(y).long()
    if y.shape != (x.shape[0],):
        raise InputError(f"expected one label per image ({x.shape[0]}), got labels of shape {tuple(y.shape)}")
    if x.shape[0] < 2:
        raise InputError("the warm-up needs at least 2 source images; pass the clean training set")
    return x, y


def _random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation on a batch: zero-pad by ``pad``, random crop back, random horizontal flip."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()  # advanced indexing put the channel axis last


def warmup_afn(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    augment: bool = True,
    lambda_init: Literal["paper", "official"] = "paper",
    identity_init: bool = True,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = True,
    base: str = "",
) -> AFNWarmup:
    """Convert a copy of ``model`` to AFN and train only the AFN parameters with cross-entropy on (x, y).

    ``x`` holds clean source images in [0, 1] (float) or 0..255 (uint8), as an (N, C, H, W) tensor or the
    (N, H, W, C) arrays of ``tta.data.clean.load_clean``; ``model`` takes [0, 1] images. Adam over every AFN
    parameter, random crop and flip when ``augment``, dropout active in the AFN layers, everything else frozen
    in eval mode. Seeded: the same inputs give the same checkpoint on the same device. ``base`` describes the
    pretrained model in the checkpoint (e.g. ``resnet20:cifar10_resnet20.th``) for error messages.
    """
    if epochs < 0:
        raise ConfigError(f"epochs must be >= 0, got {epochs}")
    if batch_size < 2:
        raise ConfigError(f"batch_size must be >= 2 (AFN normalises with batch statistics), got {batch_size}")
    if lr <= 0:
        raise ConfigError(f"lr must be > 0, got {lr}")
    # Lazy: tta.methods imports this module, and importing it must stay cheap.
    from tqdm.auto import tqdm

    from tta.engine import resolve_device

    x, y = _as_images(x, y)
    dev = resolve_device(device)
    model = copy.deepcopy(model).eval()
    fingerprint = model_fingerprint(model)
    torch.manual_seed(seed)  # the encoders' initialisation
    if convert_to_afn(model, lambda_init=lambda_init, identity_init=identity_init) == 0:
        raise ModelError("the warm-up converts BatchNorm2d layers to AFN and this model has none; use a BN network")
    model.requires_grad_(False)
    params = afn_parameters(model, "all")
    for p in params:
        p.requires_grad_(True)
    model.to(dev)
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    images, labels = x.to(dev), y.to(dev)
    n = images.shape[0]
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for epoch in range(epochs):
        for layer in afn_layers(model):
            layer.train()  # dropout on the statistic vectors; the rest of the network stays in eval mode
        order = torch.randperm(n, generator=generator).to(dev)
        # Summed on the device and read back once per epoch (every 20 batches for the bar): no per-batch sync.
        total_loss = torch.zeros((), device=dev)
        correct = torch.zeros((), dtype=torch.long, device=dev)
        bar = tqdm(range(0, n, batch_size), desc=f"AFN warm-up {epoch + 1}/{epochs}", disable=not progress,
                   leave=False)
        for step, i in enumerate(bar):
            idx = order[i:i + batch_size]
            xb = images[idx]
            xb = xb.float().div_(255.0) if xb.dtype == torch.uint8 else xb.float()
            if augment:
                xb = _random_crop_flip(xb, generator)
            logits = model(xb)
            loss = F.cross_entropy(logits, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total_loss += loss.detach() * len(idx)
            correct += (logits.argmax(1) == labels[idx]).sum()
            if progress and step % 20 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        mean_loss, accuracy = float(total_loss) / n, int(correct) / n
        history.append({"epoch": epoch + 1, "loss": mean_loss, "train_accuracy": accuracy,
                        "seconds": time.perf_counter() - start})
        if progress:
            tqdm.write(f"AFN warm-up epoch {epoch + 1}/{epochs}: loss {mean_loss:.4f}, train accuracy {accuracy:.4f}")
    model.eval().requires_grad_(False)
    model.cpu()
    settings = {"lambda_init": lambda_init, "identity_init": identity_init, "p_drop": afn_layers(model)[0].drop.p}
    warmup = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "augment": augment,
              "seed": seed, "n_images": n, "device": str(dev), "seconds": time.perf_counter() - start}
    return AFNWarmup(model, fingerprint, settings, warmup, history, base)


def load_afn_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by ``AFNWarmup.save``, checking that it is one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"AFN checkpoint {str(path)!r} does not exist; pass the file written by `tta warmup --out`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for unreadable files; all mean the same to the user
        raise ModelError(f"{str(path)!r} could not be read as a torch checkpoint ({type(err).__name__}); "
                         "pass the file written by `tta warmup --out`") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ModelError(f"{str(path)!r} is not an AFN warm-up checkpoint; pass the file written by `tta warmup --out`")
    if ckpt.get("version") != VERSION:
        raise ModelError(f"{str(path)!r} has AFN checkpoint version {ckpt.get('version')}, this tta reads version "
                         f"{VERSION}; warm up again with this version")
    return ckpt


def apply_afn_checkpoint(
    model: nn.Module, path: str | Path, source_prior_n: float | None = None
) -> nn.Module:
    """Convert ``model`` (the pretrained base, in place) to AFN and load the warm-up in ``path`` into it.

    ``ModelError`` when ``model`` is not the base the checkpoint was warmed up on. ``source_prior_n`` is a
    test-time choice and is not stored in the checkpoint.
    """
    ckpt = load_afn_checkpoint(path)
    if model_fingerprint(model) != ckpt["base_fingerprint"]:
        made_from = f" ({ckpt['base']})" if ckpt.get("base") else ""
        raise ModelError(f"AFN checkpoint {str(path)!r} was warmed up on a different model{made_from} than the one "
                         "given; load the same pretrained weights it was made from, or warm up again on this model")
    settings = ckpt["settings"]
    convert_to_afn(model, lambda_init=settings["lambda_init"], identity_init=settings["identity_init"],
                   source_prior_n=source_prior_n, p_drop=settings["p_drop"])
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model


def load_source(spec: str, data_dir: str | Path = "data", download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Clean source images (uint8 NHWC) and labels for a warm-up: ``cifar10``/``cifar100`` or a ``load_clean`` spec.

    ``cifar10`` and ``cifar100`` mean the *training* split here (a warm-up must never see the test images);
    ``npz:PATH`` and ``folder:PATH`` are used as they are.
    """
    from tta.data.clean import load_clean

    return load_clean(spec, data_dir, download, train=True)


def run_warmup(
    method: str = "afn",
    *,
    source: str,
    out: str | Path,
    model: str | None = "Standard",
    checkpoint: str | Path | None = None,
    arch: str | None = None,
    dataset: str = "cifar10",
    data_dir: str | Path = "data",
    n_images: int | None = None,
    epochs: int = 5,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    augment: bool = True,
    lambda_init: Literal["paper", "official"] = "paper",
    identity_init: bool = True,
    device: str = "auto",
    seed: int = 0,
    download: bool = True,
    progress: bool = True,
) -> tuple[AFNWarmup, Path]:
    """What ``tta warmup`` does: load the model and clean ``source`` data, warm up, save to ``out``.

    ``source`` is ``cifar10``/``cifar100`` (the training split, downloaded into ``data_dir``) or a
    ``tta.data.clean.load_clean`` spec such as ``npz:PATH`` (see ``load_source``). Returns the warm-up and the
    checkpoint path.
    """
    if method != "afn":
        raise ConfigError(f"only afn has a source warm-up, got method {method!r}; use --method afn")
    from tta.engine import resolve_device
    from tta.models import load_model

    resolve_device(device)  # a bad device fails before the data is read
    net = load_model(model, dataset=dataset, checkpoint=checkpoint, arch=arch, data_dir=data_dir)
    x, y = load_source(source, data_dir, download)
    if n_images is not None:
        x, y = x[:n_images], y[:n_images]
    base = f"{arch}:{Path(checkpoint).name}" if checkpoint is not None else str(model)
    warm = warmup_afn(net, x, y, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      augment=augment, lambda_init=lambda_init, identity_init=identity_init, device=device,
                      seed=seed, progress=progress, base=base)
    warm.warmup["source"] = source
    return warm, warm.save(out)
