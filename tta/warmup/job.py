"""What ``tta warmup`` does, as one value: a ``WarmupJob`` (the model, the clean source data, the conversion and its
settings, the ``Recipe``, the checkpoint file), run by ``run_warmup`` from loading the model to writing the
checkpoint."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tta.devices import resolve_device
from tta.errors import ConfigError
from tta.io import check_writable
from tta.warmup.checkpoint import Warmup
from tta.warmup.registry import get_conversion
from tta.warmup.train import Recipe, warmup


def load_source(spec: str, data_dir: str | Path = "data", download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Clean source images (uint8 NHWC) and labels for a warm-up: ``cifar10``/``cifar100`` or a ``load_clean`` spec.

    ``cifar10`` and ``cifar100`` mean the *training* split here (a warm-up must never see the test images);
    ``npz:PATH`` and ``folder:PATH`` are used as they are.
    """
    from tta.data.clean import load_clean

    return load_clean(spec, data_dir, download, train=True)


@dataclass(frozen=True)
class WarmupJob:
    """What ``tta warmup`` does, as one value: the model to convert, the clean source data, the conversion and its
    settings, the ``Recipe``, and where the checkpoint goes.

    ``source`` is ``cifar10``/``cifar100`` (the training split, downloaded into ``data_dir``) or a
    ``tta.data.clean.load_clean`` spec such as ``npz:PATH`` (see ``load_source``); ``n_images`` keeps the first N.
    The model is ``model`` (a zoo name, see ``tta.load_model``) or a CIFAR ResNet ``checkpoint`` with its ``arch``.
    With ``resume``, the state after every epoch goes to ``<out>.resume``, an interrupted run with the same arguments
    continues from it, and it is deleted once ``out`` is written.
    """

    source: str
    out: str | Path
    method: str = "afn"
    model: str | None = "Standard"
    checkpoint: str | Path | None = None
    arch: str | None = None
    dataset: str = "cifar10"
    data_dir: str | Path = "data"
    n_images: int | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    recipe: Recipe = field(default_factory=Recipe)
    device: str = "auto"
    download: bool = True
    progress: bool = True
    resume: bool = True

    def __post_init__(self) -> None:
        get_conversion(self.method).resolve_settings(self.settings)
        if self.checkpoint is not None and self.arch is None:
            raise ConfigError("warm up from the pretrained weights: pass --checkpoint PATH with its --arch "
                              "(a converted checkpoint cannot be converted again)")

    @classmethod
    def from_options(cls, **options: Any) -> WarmupJob:
        """A job from flat options (as ``tta warmup`` has them): ``Recipe`` fields go to the recipe."""
        recipe_names = {f.name for f in dataclasses.fields(Recipe)}
        recipe = Recipe.of(options.pop("recipe", None), {k: options.pop(k) for k in list(options)
                                                          if k in recipe_names})
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown warm-up option(s) {', '.join(unknown)}")
        return cls(recipe=recipe, **options)


def run_warmup(job: WarmupJob | None = None, /, **options: Any) -> tuple[Warmup, Path]:
    """Run ``job`` (or the ``WarmupJob`` the flat ``options`` describe): load the model and clean source data, warm
    up, save the checkpoint. ``out`` is checked to be writable before anything is loaded. Returns the warm-up and the
    checkpoint path."""
    job = job if job is not None else WarmupJob.from_options(**options)
    settings = get_conversion(job.method).resolve_settings(job.settings)
    out = check_writable(job.out)
    from tta.models import load_model

    resolve_device(job.device)  # a bad device fails before the data is read
    net = load_model(job.model, dataset=job.dataset, checkpoint=job.checkpoint, arch=job.arch, data_dir=job.data_dir)
    if job.checkpoint is not None:
        build: dict[str, Any] = {"arch": job.arch, "num_classes": net[1].linear.out_features}
        base = f"{job.arch}:{Path(job.checkpoint).name}"
    else:
        build, base = {"name": job.model, "dataset": job.dataset}, str(job.model)
    x, y = load_source(job.source, job.data_dir, job.download)
    if job.n_images is not None:
        x, y = x[:job.n_images], y[:job.n_images]
    resume_file = out.with_name(out.name + ".resume") if job.resume else None
    warm = warmup(net, x, y, job.method, recipe=job.recipe, settings=settings, device=job.device,
                  progress=job.progress, base=base, build=build, resume=resume_file)
    warm.warmup["source"] = job.source
    path = warm.save(out)
    if resume_file is not None:
        resume_file.unlink(missing_ok=True)
    return warm, path


__all__ = ["WarmupJob", "load_source", "run_warmup"]
