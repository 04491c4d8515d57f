"""Source warm-up of converted normalisation layers (AFN, Proxy Normalization) and the checkpoint it writes.

Both conversions replace a pretrained network's BatchNorm layers and need a short fine-tuning on clean source data:

- ``afn`` (Zhou & Chen 2023): every BatchNorm2d becomes an AFN layer and only the AFN parameters train, with
  cross-entropy, while every pretrained weight stays frozen in eval mode (the official recipe).
- ``proxy-norm`` (Labatie et al. 2021): every BN -> activation becomes a per-image norm -> PN-Act
  (``tta.norm.proxy_norm``). The normalisation changes from the training set's statistics to each image's own, so
  every parameter trains; by default with cross-entropy plus distillation from the original BN model's logits.

``warmup`` runs either, with a progress bar, on CPU or GPU, seeded (same inputs, same device: same weights), and
optionally resumable: with ``resume=FILE`` the state after every epoch is written there and a later call with the
same inputs and settings continues from it. ``Warmup.save`` writes a self-describing checkpoint
(``tta.models.saved``) that ``tta.load_model(checkpoint=FILE)`` and ``tta adapt --checkpoint FILE`` load without
``--arch``; an AFN one also still loads onto its base model with ``--afn-checkpoint`` (``apply_afn_checkpoint``).
``run_warmup`` is what ``tta warmup`` does.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tta.errors import ConfigError, InputError, ModelError
from tta.models.saved import FORMAT, VERSION, convert, model_fingerprint

METHODS: tuple[str, ...] = ("afn", "proxy-norm")
LOSSES: tuple[str, ...] = ("ce", "distill", "ce+distill")
SCHEDULES: tuple[str, ...] = ("constant", "cosine")
# Conversion settings of each method and their defaults; they are stored in the checkpoint to rebuild the model.
SETTINGS: dict[str, dict[str, Any]] = {
    "afn": {"lambda_init": "paper", "identity_init": True, "p_drop": 0.3},
    "proxy-norm": {"norm": "layer", "groups": 8, "eps": 1e-5},
}
# Training defaults per method: AFN's official recipe; for proxy-norm, see the README's Proxy Normalization section.
DEFAULTS: dict[str, dict[str, Any]] = {
    "afn": {"loss": "ce", "schedule": "constant", "epochs": 5},
    "proxy-norm": {"loss": "ce+distill", "schedule": "cosine", "epochs": 12},
}
LEGACY_AFN_FORMAT = "tta.afn-warmup"  # AFN warm-ups written before the self-describing format; still readable


@dataclass
class Warmup:
    """A warmed-up converted model (eval mode, on the CPU) with what is needed to save and rebuild it.

    ``build`` says how to rebuild the base architecture (see ``tta.models.saved``); without it the checkpoint only
    loads onto its base model (``apply_afn_checkpoint``).
    """

    model: nn.Module
    method: str
    base_fingerprint: str
    settings: dict[str, Any]
    warmup: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    base: str = ""
    build: dict[str, Any] = field(default_factory=dict)

    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint dict that ``save`` writes."""
        return {"format": FORMAT, "version": VERSION, "method": self.method, "build": dict(self.build),
                "settings": dict(self.settings), "base": self.base, "base_fingerprint": self.base_fingerprint,
                "warmup": dict(self.warmup), "history": list(self.history),
                "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()}}

    def save(self, path: str | Path) -> Path:
        """Write the checkpoint atomically (temporary file, then rename); returns the path."""
        return _save_atomic(self.checkpoint(), path)


def _save_atomic(obj: object, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def check_writable(path: str | Path, option: str = "--out") -> Path:
    """``ConfigError`` unless a file can be written at ``path`` (its folder is created); call before long work."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{option} {str(path)!r} is a folder; pass a file name such as {path / 'warm.pt'}")
    probe = path.with_name(f".{path.name}.probe{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb"):
            pass
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write {option} {str(path)!r} ({err.strerror or type(err).__name__}); pick a path "
                          "in a folder you can write to") from None
    return path


def _method_settings(method: str, settings: Mapping[str, Any] | None) -> dict[str, Any]:
    if method not in METHODS:
        raise ConfigError(f"no source warm-up for method {method!r}; choose one of {', '.join(METHODS)}")
    unknown = sorted(set(settings or {}) - set(SETTINGS[method]))
    if unknown:
        raise ConfigError(f"unknown {method} warm-up setting(s) {', '.join(unknown)}; valid: "
                          f"{', '.join(SETTINGS[method])}")
    return {**SETTINGS[method], **(settings or {})}


def _trainable(method: str, model: nn.Module) -> list[nn.Parameter]:
    """What trains: AFN's own parameters (the rest frozen), or every parameter of a proxy-norm model."""
    from tta.norm.afn import afn_parameters

    model.requires_grad_(False)
    params = afn_parameters(model, "all") if method == "afn" else list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


def _train_mode(method: str, model: nn.Module) -> None:
    """AFN: only the AFN layers in train mode (dropout on their statistics); proxy-norm: the whole model."""
    from tta.norm.afn import afn_layers

    if method == "afn":
        model.eval()
        for layer in afn_layers(model):
            layer.train()
    else:
        model.train()


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
    _save_atomic(state, path)


def warmup(
    model: nn.Module,
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    method: str = "proxy-norm",
    *,
    settings: Mapping[str, Any] | None = None,
    epochs: int | None = None,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    augment: bool = True,
    loss: str | None = None,
    schedule: str | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = True,
    base: str = "",
    build: Mapping[str, Any] | None = None,
    resume: str | Path | None = None,
    calibrate: int = 512,
) -> Warmup:
    """Convert a copy of ``model`` for ``method`` (``afn`` or ``proxy-norm``) and fine-tune it on (x, y).

    ``x`` holds clean source images in [0, 1] (float) or 0..255 (uint8), as an (N, C, H, W) tensor or the
    (N, H, W, C) arrays of ``tta.data.clean.load_clean``; ``model`` takes [0, 1] images. ``settings`` are the
    conversion's (``SETTINGS[method]`` lists them and their defaults). Adam, random crop and flip when
    ``augment``. ``loss``: ``ce`` (cross-entropy with the labels), ``distill`` (KL divergence from the softmax of
    ``model``'s own logits on the same augmented batch, temperature 1) or ``ce+distill`` (their sum);
    ``schedule``: ``constant`` or ``cosine`` learning rate (decaying to 0 over the run); they and ``epochs`` default
    per method (``DEFAULTS``). ``resume``: a file where the state is written after every epoch and read back on the
    next call with the same inputs, so an interrupted warm-up continues where it stopped; it is left in place
    (delete it once the result is saved). ``base`` and ``build`` describe the pretrained model in the checkpoint.
    ``calibrate``: for proxy-norm, how many source images (a seeded random subset, without augmentation) set the
    converted layers' initial parameters (``tta.norm.proxy_norm.calibrate_proxy_norm``) before training; 0 skips it.
    """
    settings = _method_settings(method, settings)
    loss = loss or DEFAULTS[method]["loss"]
    schedule = schedule or DEFAULTS[method]["schedule"]
    epochs = DEFAULTS[method]["epochs"] if epochs is None else epochs
    if loss not in LOSSES:
        raise ConfigError(f"unknown warm-up loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown learning-rate schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if epochs < 0:
        raise ConfigError(f"epochs must be >= 0, got {epochs}")
    if batch_size < 2:
        raise ConfigError(f"batch_size must be >= 2, got {batch_size}")
    if lr <= 0:
        raise ConfigError(f"lr must be > 0, got {lr}")
    if calibrate < 0:
        raise ConfigError(f"calibrate must be >= 0 (0 = no calibration), got {calibrate}")
    # Lazy: tta.methods imports this module (through tta.methods.afn), and importing it must stay cheap.
    from tqdm.auto import tqdm

    from tta.run.engine import resolve_device

    x, y = _as_images(x, y)
    dev = resolve_device(device)
    base_model = copy.deepcopy(model).eval()
    fingerprint = model_fingerprint(base_model)
    torch.manual_seed(seed)  # AFN's encoders are initialised randomly
    if method == "afn" and not any(isinstance(m, nn.BatchNorm2d) for m in base_model.modules()):
        raise ModelError("the afn warm-up converts BatchNorm2d layers to AFN and this model has none; use a BN network")
    net = convert(method, copy.deepcopy(base_model), settings).to(dev)
    params = _trainable(method, net)
    base_model.to(dev).requires_grad_(False)  # the calibration's reference and the distillation's teacher
    teacher = base_model if "distill" in loss else None
    optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    config = {"method": method, "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
              "augment": augment, "loss": loss, "schedule": schedule, "seed": seed, "n_images": n,
              "calibrate": calibrate if method == "proxy-norm" else 0}
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
    if state is None and config["calibrate"]:
        from tta.norm.proxy_norm import calibrate_proxy_norm

        pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[:calibrate].to(dev)
        xc = images[pick]
        calibrate_proxy_norm(net.eval(), base_model, xc.float().div_(255.0) if xc.dtype == torch.uint8 else xc.float())
    for epoch in range(first_epoch, epochs):
        _train_mode(method, net)
        order = torch.randperm(n, generator=generator).to(dev)
        # Summed on the device and read back once per epoch (every 20 batches for the bar): no per-batch sync.
        total_loss = torch.zeros((), device=dev)
        correct = torch.zeros((), dtype=torch.long, device=dev)
        bar = tqdm(range(0, n, batch_size), desc=f"{method} warm-up {epoch + 1}/{epochs}", disable=not progress,
                   leave=False)
        for step, i in enumerate(bar):
            if schedule == "cosine":
                done = (epoch * steps_per_epoch + step) / (epochs * steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * done))
            idx = order[i:i + batch_size]
            xb = images[idx]
            xb = xb.float().div_(255.0) if xb.dtype == torch.uint8 else xb.float()
            if augment:
                xb = _random_crop_flip(xb, generator)
            logits = net(xb)
            batch_loss = _loss(loss, logits, labels[idx], teacher, xb)
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
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    augment: bool = True,
    lambda_init: str = "paper",
    identity_init: bool = True,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = True,
    base: str = "",
) -> Warmup:
    """``warmup(method="afn")``: train only the AFN parameters of a converted copy with cross-entropy on (x, y)."""
    return warmup(model, x, y, "afn", settings={"lambda_init": lambda_init, "identity_init": identity_init},
                  epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, augment=augment,
                  device=device, seed=seed, progress=progress, base=base)


def load_afn_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read an AFN warm-up checkpoint (written by ``Warmup.save``, or by earlier versions), checking that it is one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"AFN checkpoint {str(path)!r} does not exist; pass the file written by `tta warmup --out`")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for unreadable files; all mean the same to the user
        raise ModelError(f"{str(path)!r} could not be read as a torch checkpoint ({type(err).__name__}); "
                         "pass the file written by `tta warmup --out`") from None
    legacy = isinstance(ckpt, dict) and ckpt.get("format") == LEGACY_AFN_FORMAT
    if not legacy and not (isinstance(ckpt, dict) and ckpt.get("format") == FORMAT and ckpt.get("method") == "afn"):
        raise ModelError(f"{str(path)!r} is not an AFN warm-up checkpoint; pass the file written by "
                         "`tta warmup --out` with --method afn")
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
    from tta.norm.afn import convert_to_afn

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
    epochs: int | None = None,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    augment: bool = True,
    loss: str | None = None,
    settings: Mapping[str, Any] | None = None,
    device: str = "auto",
    seed: int = 0,
    download: bool = True,
    progress: bool = True,
    resume: bool = True,
    calibrate: int = 512,
) -> tuple[Warmup, Path]:
    """What ``tta warmup`` does: load the model and clean ``source`` data, warm up, save to ``out``.

    ``source`` is ``cifar10``/``cifar100`` (the training split, downloaded into ``data_dir``) or a
    ``tta.data.clean.load_clean`` spec such as ``npz:PATH`` (see ``load_source``). ``out`` is checked to be
    writable before anything is loaded. With ``resume``, the state after every epoch goes to ``<out>.resume``, an
    interrupted run with the same arguments continues from it, and it is deleted once ``out`` is written.
    Returns the warm-up and the checkpoint path.
    """
    settings = _method_settings(method, settings)
    out = check_writable(out)
    from tta.models import load_model
    from tta.run.engine import resolve_device

    resolve_device(device)  # a bad device fails before the data is read
    if checkpoint is not None and arch is None:
        raise ConfigError("warm up from the pretrained weights: pass --checkpoint PATH with its --arch "
                          "(a converted checkpoint cannot be converted again)")
    net = load_model(model, dataset=dataset, checkpoint=checkpoint, arch=arch, data_dir=data_dir)
    if checkpoint is not None:
        build: dict[str, Any] = {"arch": arch, "num_classes": net[1].linear.out_features}
        base = f"{arch}:{Path(checkpoint).name}"
    else:
        build, base = {"name": model, "dataset": dataset}, str(model)
    x, y = load_source(source, data_dir, download)
    if n_images is not None:
        x, y = x[:n_images], y[:n_images]
    resume_file = out.with_name(out.name + ".resume") if resume else None
    warm = warmup(net, x, y, method, settings=settings, epochs=epochs, batch_size=batch_size, lr=lr,
                  weight_decay=weight_decay, augment=augment, loss=loss, device=device, seed=seed,
                  progress=progress, base=base, build=build, resume=resume_file, calibrate=calibrate)
    warm.warmup["source"] = source
    path = warm.save(out)
    if resume_file is not None:
        resume_file.unlink(missing_ok=True)
    return warm, path
