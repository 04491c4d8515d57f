"""The image preprocessing a pretrained model was evaluated with: resize, centre crop, interpolation.

Normalisation (mean/std) lives inside the models ``tta.models.load_model`` returns; what remains is the geometry,
applied to decoded images before they become uint8 tensors: torchvision weights' ``transforms()`` (``resize_size``,
``crop_size``, ``interpolation``; e.g. ResNet-50's default weights: resize 232, crop 224, bilinear) and timm's
pretrained config (``input_size``, ``crop_pct``, ``interpolation``: resize ``floor(size / crop_pct)``, crop ``size``).
CIFAR-sized models (robustbench's CIFAR zoo, ``--checkpoint``, the digits demo model) take 32x32 images; a
``timm:NAME`` model takes its pretrained config's geometry whatever the benchmark.

Every decoded image first becomes 8-bit RGB through ``to_rgb``: 16-bit images (PIL modes ``I;16*``, and ``I``
holding values in 0..65535) are scaled from 0..65535 to 0..255 instead of being clipped at 255, float images
(mode ``F``) must hold values in [0, 1], palette, grey, CMYK, YCbCr and other modes are converted by PIL, and an
alpha channel is dropped; an image that fits none of these is a ``DataError`` saying why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tta.errors import ConfigError, DataError

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize`` (None: keep), then centre-crop ``crop`` x ``crop`` (None: keep).

    Calling it on a PIL image gives a uint8 (3, H, W) tensor; batches become [0, 1] floats on the device.
    """

    resize: int | None = None
    crop: int | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"unknown interpolation {self.interpolation!r}; choose one of: "
                              f"{', '.join(INTERPOLATIONS)}")
        for value in (self.resize, self.crop):
            if value is not None and value < 1:
                raise ConfigError(f"resize and crop sizes must be >= 1, got {value}")

    def __call__(self, image: Any) -> torch.Tensor:
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        image = to_rgb(image)
        if self.resize is not None:
            image = F.resize(image, self.resize, InterpolationMode(self.interpolation), antialias=True)
        if self.crop is not None:
            image = F.center_crop(image, [self.crop, self.crop])
        return F.pil_to_tensor(image)


CIFAR = Preprocess(resize=32, crop=32)


def to_rgb(image: Any) -> Any:
    """A PIL image as 8-bit RGB, its brightness scale kept (see the module docs); a ``DataError`` if it cannot be."""
    import numpy as np
    from PIL import Image

    where = getattr(image, "filename", "") or "the image"
    mode = image.mode
    if mode.startswith("I") or mode == "F":
        values = np.asarray(image).astype(np.float64)
        if values.ndim != 2:
            raise DataError(f"{where} has {values.ndim} dimensions in PIL mode {mode}; save it as an RGB or grey image")
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if mode == "F":
            if not np.isfinite(values).all() or low < 0 or high > 1:
                raise DataError(f"{where} is a floating-point image with values from {low:g} to {high:g}, not in "
                                "[0, 1]; save it as an 8- or 16-bit image")
            scale = 255.0
        else:
            if low < 0 or high > 65535:
                raise DataError(f"{where} holds {mode} integers from {low:g} to {high:g}, beyond the 16-bit range "
                                "0..65535; save it as an 8- or 16-bit image")
            scale = 255.0 / 65535.0
        grey = np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    try:
        return image if mode == "RGB" else image.convert("RGB")
    except ValueError as err:
        raise DataError(f"{where} is in PIL mode {mode}, which cannot be converted to RGB ({err}); save it as an RGB "
                        "or grey image") from None


def _interpolation(mode: Any) -> str:
    name = str(getattr(mode, "value", mode)).lower()
    return name if name in INTERPOLATIONS else "bilinear"


def torchvision_preprocess(name: str) -> Preprocess:
    """The geometry of ``name``'s default torchvision weights (the ones ``load_model`` fetches)."""
    import torchvision

    transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    return Preprocess(int(transforms.resize_size[0]), int(transforms.crop_size[0]),
                      _interpolation(transforms.interpolation))


TIMM_PREFIX = "timm:"


def timm_name(name: str | None) -> str | None:
    """The timm model name of a ``timm:NAME`` model (None for any other name)."""
    if name is None or not name.startswith(TIMM_PREFIX):
        return None
    return name.removeprefix(TIMM_PREFIX)


def check_timm_name(name: str) -> None:
    """A ``ConfigError`` unless timm is installed and knows ``name`` (an architecture, optionally ``.tag``)."""
    try:
        import timm
    except ImportError:
        raise ConfigError(f"model timm:{name} needs timm; install it with pip install timm") from None
    if not name or not timm.is_model(name):
        raise ConfigError(f"unknown timm model {name!r}; pick a name from timm.list_models() (for example "
                          "timm:vit_base_patch16_224.augreg_in21k_ft_in1k)")


def timm_preprocess(name: str) -> Preprocess:
    """The geometry of timm's pretrained config for ``name``: resize ``floor(size / crop_pct)``, crop ``size``."""
    import timm

    check_timm_name(name)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise ConfigError(f"timm has no pretrained config for {name!r}; pass a pretrained timm model name")
    size = int(cfg.input_size[-1])
    crop_pct = float(cfg.crop_pct or 1.0)
    return Preprocess(math.floor(size / crop_pct), size, _interpolation(cfg.interpolation))


def preprocess_for(model: str | None, dataset: str) -> Preprocess:
    """The preprocessing ``load_model(model, dataset=dataset)``'s model expects (see the module docs).

    CIFAR-sized datasets (``cifar10``, ``cifar100`` and their ``-c`` benchmarks, ``digits``) and local checkpoints
    (``model`` None) give 32x32; ImageNet models give their torchvision or timm geometry, and ``timm:NAME`` models
    their timm geometry for every dataset.
    """
    timm_model = timm_name(model)
    if timm_model is not None:
        return timm_preprocess(timm_model)
    if model is None or not dataset.startswith("imagenet"):
        return CIFAR
    import torchvision

    if model in torchvision.models.list_models(torchvision.models):
        return torchvision_preprocess(model)
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(model):
        return timm_preprocess(model)
    return Preprocess(256, 224, "bilinear")  # the classic ImageNet evaluation, for models of neither library
