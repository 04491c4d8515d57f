"""The one training loop of the source warm-up, for every registered conversion (``tta.warmup.registry``).

``warmup`` converts a copy of a pretrained model with a conversion (``afn``, ``proxy-norm``) and fine-tunes it on
clean source data, with a progress bar, on CPU or GPU, seeded (same inputs, same device: same weights), and
optionally resumable: with ``resume=FILE`` the state after every epoch is written there and a later call with the
same inputs and settings continues from it. How it trains is a ``Recipe``; everything that differs between
conversions (what trains, the train mode, a calibration, the defaults) comes from the conversion.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tta.devices import resolve_device
from tta.errors import ConfigError, InputError
from tta.io import save_torch
from tta.models.fingerprint import model_fingerprint
from tta.warmup.checkpoint import Warmup
from tta.warmup.registry import get_conversion

LOSSES: tuple[str, ...] = ("ce", "distill", "ce+distill")
SCHEDULES: tuple[str, ...] = ("constant", "cosine")


@dataclass(frozen=True)
class Recipe:
    """How a warm-up trains. ``None`` for ``epochs``, ``loss`` or ``schedule`` takes the conversion's default.

    Adam with ``lr`` and ``weight_decay``; random crop and flip when ``augment``. ``loss``: ``ce`` (cross-entropy
    with the labels), ``distill`` (KL divergence from the softmax of the base model's own logits on the same
    augmented batch, temperature 1) or ``ce+distill`` (their sum); ``schedule``: ``constant`` or ``cosine``
    learning rate (decaying to 0 over the run). ``calibrate``: for a conversion with a calibration, how many source
    images (a seeded random subset, without augmentation) set the converted layers' initial parameters before
    training; 0 skips it.
    """

    epochs: int | None = None
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    augment: bool = True
    loss: str | None = None
    schedule: str | None = None
    seed: int = 0
    calibrate: int = 512

    def __post_init__(self) -> None:
        if self.loss is not None and self.loss not in LOSSES:
            raise ConfigError(f"unknown warm-up loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown learning-rate schedule {self.schedule!r}; choose one of "
                              f"{', '.join(SCHEDULES)}")
        if self.epochs is not None and self.epochs < 0:
            raise ConfigError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 2:
            raise ConfigError(f"batch_size must be >= 2, got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.calibrate < 0:
            raise ConfigError(f"calibrate must be >= 0 (0 = no calibration), got {self.calibrate}")

    @classmethod
    def of(cls, recipe: Recipe | None, fields: Mapping[str, Any]) -> Recipe:
        """``recipe`` (or the defaults) with ``fields`` replaced; ``ConfigError`` for a name that is not a field."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - names)
        if unknown:
            raise ConfigError(f"unknown warm-up option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        return dataclasses.replace(recipe or cls(), **fields)

    def resolved(self, defaults: Mapping[str, Any]) -> Recipe:
        """Every ``None`` replaced by the conversion's default."""
        return dataclasses.replace(self, **{k: defaults[k] for k in ("epochs", "loss", "schedule")
                                             if getattr(self, k) is None})


def _digest(x: torch.Tensor, y: torch.Tensor, **settings: Any) -> str:
    """Identifies a warm-up's inputs for its resume file: the data's bytes and every setting."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for t in (x, y):
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _rng_states(dev: torch.device) -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if dev.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(dev)
    return states


def _read_resume(path: Path, key: str) -> dict[str, Any] | None:
    """The state in a resume file if it belongs to this warm-up; None (with a warning) for anything else."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a file cut short by the interruption itself: start over
        warnings.warn(f"ignoring unreadable resume file {path} ({type(err).__name__}); starting the warm-up over",
                      stacklevel=3)
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        warnings.warn(f"ignoring resume file {path}: it belongs to a warm-up with other data or settings; starting "
                      "over (it will be overwritten)", stacklevel=3)
        return None
    return state


def _write_resume(path: Path, state: dict[str, Any]) -> None:
    save_torch(state, path)


def warmup(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    method: str = "proxy-norm",
    *,
    recipe: Recipe | None = None,
    settings: Mapping[str, Any] | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
    base: str = "",
    build: Mapping[str, Any] | None = None,
    resume: str | Path | None = None,
    **recipe_fields: Any,
) -> Warmup:
    """Convert a copy of ``model`` with the conversion ``method`` (``afn``, ``proxy-norm``) and fine-tune it on (x, y).

    ``x`` holds clean source images in [0, 1] (float) or 0..255 (uint8), as an (N, C, H, W) tensor or the
    (N, H, W, C) arrays of ``tta.data.clean.load_clean``; ``model`` takes [0, 1] images. ``settings`` are the
    conversion's (``CONVERSIONS[method].settings`` lists them and their defaults). How it trains is ``recipe``
    (a ``Recipe``), with any of its fields given by name (``epochs=2, lr=1e-2``) replacing the recipe's.
    ``resume``: a file where the state is written after every epoch and read back on the next call with the same
    inputs, so an interrupted warm-up continues where it stopped; it is left in place (delete it once the result is
    saved). ``base`` and ``build`` describe the pretrained model in the checkpoint.
    """
    conversion = get_conversion(method)
    settings = conversion.resolve_settings(settings)
    recipe = Recipe.of(recipe, recipe_fields).resolved(conversion.recipe)
    assert recipe.epochs is not None and recipe.loss is not None  # resolved
    from tqdm.auto import tqdm  # here: importing the package stays cheap

    x, y = _as_images(x, y)
    dev = resolve_device(device)
    base_model = copy.deepcopy(model).eval()
    fingerprint = model_fingerprint(base_model)
    torch.manual_seed(recipe.seed)  # AFN's encoders are initialised randomly
    conversion.check(base_model)
    net = conversion.convert(copy.deepcopy(base_model), settings).to(dev)
    net.requires_grad_(False)
    params = conversion.trainable(net)
    for p in params:
        p.requires_grad_(True)
    base_model.to(dev).requires_grad_(False)  # the calibration's reference and the distillation's teacher
    teacher = base_model if "distill" in recipe.loss else None
    optimizer = torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    generator = torch.Generator().manual_seed(recipe.seed)
    n, batch_size, epochs = x.shape[0], recipe.batch_size, recipe.epochs
    steps_per_epoch = math.ceil(n / batch_size)
    calibrate = recipe.calibrate if conversion.calibrate is not None else 0
    config = {"method": method, "epochs": epochs, "batch_size": batch_size, "lr": recipe.lr,
              "weight_decay": recipe.weight_decay, "augment": recipe.augment, "loss": recipe.loss,
              "schedule": recipe.schedule, "seed": recipe.seed, "n_images": n, "calibrate": calibrate}
    history: list[dict[str, float]] = []
    first_epoch, elapsed = 0, 0.0
    resume = None if resume is None else Path(resume)
    key = "" if resume is None else _digest(x, y, settings=settings, base=fingerprint, **config)
    state = None if resume is None else _read_resume(resume, key)
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["rng"]["cpu"])
        if dev.type == "cuda" and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], dev)
        first_epoch, elapsed, history = state["epoch"], state["seconds"], list(state["history"])
        if progress:
            tqdm.write(f"resuming the {method} warm-up after epoch {first_epoch}/{epochs} from {resume}")
    images, labels = x.to(dev), y.to(dev)
    start = time.perf_counter() - elapsed
    if state is None and calibrate and conversion.calibrate is not None:
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(recipe.seed + 1))[:calibrate].to(dev)
        xc = images[pick]
        conversion.calibrate(net.eval(), base_model,
                             xc.float().div_(255.0) if xc.dtype == torch.uint8 else xc.float())
    for epoch in range(first_epoch, epochs):
        conversion.train_mode(net)
        order = torch.randperm(n, generator=generator).to(dev)
        # Summed on the device and read back once per epoch (every 20 batches for the bar): no per-batch sync.
        total_loss = torch.zeros((), device=dev)
        correct = torch.zeros((), dtype=torch.long, device=dev)
        bar = tqdm(range(0, n, batch_size), desc=f"{method} warm-up {epoch + 1}/{epochs}", disable=not progress,
                   leave=False)
        for step, i in enumerate(bar):
            if recipe.schedule == "cosine":
                done = (epoch * steps_per_epoch + step) / (epochs * steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = recipe.lr * 0.5 * (1.0 + math.cos(math.pi * done))
            idx = order[i:i + batch_size]
            xb = images[idx]
            xb = xb.float().div_(255.0) if xb.dtype == torch.uint8 else xb.float()
            if recipe.augment:
                xb = _random_crop_flip(xb, generator)
            logits = net(xb)
            batch_loss = _loss(recipe.loss, logits, labels[idx], teacher, xb)
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            optimizer.step()
            total_loss += batch_loss.detach() * len(idx)
            correct += (logits.argmax(1) == labels[idx]).sum()
            if progress and step % 20 == 0:
                bar.set_postfix(loss=f"{float(batch_loss.detach()):.3f}")
        mean_loss, accuracy = float(total_loss) / n, int(correct) / n
        history.append({"epoch": epoch + 1, "loss": mean_loss, "train_accuracy": accuracy,
                        "seconds": time.perf_counter() - start})
        if progress:
            tqdm.write(f"{method} warm-up epoch {epoch + 1}/{epochs}: loss {mean_loss:.4f}, train accuracy "
                       f"{accuracy:.4f}")
        if resume is not None:
            _write_resume(resume, {"key": key, "epoch": epoch + 1, "seconds": time.perf_counter() - start,
                                   "history": history, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                                   "generator": generator.get_state(), "rng": _rng_states(dev)})
    net.eval().requires_grad_(False)
    net.cpu()
    config.update(device=str(dev), seconds=time.perf_counter() - start)
    return Warmup(net, method, fingerprint, settings, config, history, base, dict(build or {}))


def _loss(kind: str, logits: torch.Tensor, labels: torch.Tensor, teacher: nn.Module | None,
          xb: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, distillation (KL from the teacher's softmax, temperature 1) or their sum."""
    total = F.cross_entropy(logits, labels) if "ce" in kind.split("+") else logits.new_zeros(())
    if teacher is not None:
        with torch.no_grad():
            target = F.log_softmax(teacher(xb), dim=1)
        total = total + F.kl_div(F.log_softmax(logits, dim=1), target, log_target=True, reduction="batchmean")
    return total


def warmup_afn(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    epochs: int = 5,
    *,
    lambda_init: str = "paper",
    identity_init: bool = True,
    device: str | torch.device = "auto",
    progress: bool = True,
    base: str = "",
    **recipe_fields: Any,
) -> Warmup:
    """``warmup(method="afn")``: train only the AFN parameters of a converted copy with cross-entropy on (x, y);
    ``recipe_fields`` are ``Recipe`` fields (``batch_size``, ``lr``, ``weight_decay``, ``augment``, ``seed``)."""
    return warmup(model, x, y, "afn", settings={"lambda_init": lambda_init, "identity_init": identity_init},
                  device=device, progress=progress, base=base, epochs=epochs, **recipe_fields)


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


__all__ = ["LOSSES", "SCHEDULES", "Recipe", "warmup", "warmup_afn"]
