"""The 19 CIFAR-10-C corruptions as batched torch operations (``tta.corrupt``), and their seeded generation.

``corrupt(images, name, severity, generator)`` corrupts a float batch (N, 3, H, W) in [0, 1] on whatever device
it lives on. Random draws come from ``generator`` on the generator's own device (the CPU by default) and are then
moved to the images, so a seeded CPU generator gives the same result on CPU and CUDA (up to float rounding); pass a
CUDA generator to draw on the GPU instead (faster, but a different random stream).

``corrupt_indexed`` is what the dataset writer and the on-the-fly streams use: the output for image i depends only
on (seed, corruption, severity, i), whatever the batch size, device or restart. Images are processed in
index-aligned chunks of ``CHUNK`` images (chunk k holds images [k CHUNK, (k+1) CHUNK)), each with a fresh CPU
generator seeded from (seed, corruption, severity, k); a short last chunk is padded with black images, so every
chunk draws the same random numbers for the same position. One caveat: Poisson sampling (shot noise) consumes a
value-dependent number of draws, so there image i also depends on the clean images before it in its chunk (fixed
for a given dataset, so still independent of batching).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from tta.corruptions._ops import Rng
from tta.corruptions.blur import defocus_blur, gaussian_blur, glass_blur, motion_blur_op, zoom_blur
from tta.corruptions.constants import PARAMS
from tta.corruptions.digital import brightness, contrast, elastic_transform, jpeg_compression, pixelate, saturate
from tta.corruptions.names import ALL_CORRUPTIONS, BENCHMARK_CORRUPTIONS, EXTRA_CORRUPTIONS, check_selection
from tta.corruptions.noise import gaussian_noise, impulse_noise, shot_noise, speckle_noise
from tta.corruptions.weather import fog, frost, snow, spatter
from tta.errors import InputError

Op = Callable[[torch.Tensor, object, Rng], torch.Tensor]

CORRUPTIONS: dict[str, Op] = {
    "gaussian_noise": gaussian_noise,
    "shot_noise": shot_noise,
    "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur,
    "glass_blur": glass_blur,
    "motion_blur": motion_blur_op,
    "zoom_blur": zoom_blur,
    "snow": snow,
    "frost": frost,
    "fog": fog,
    "brightness": brightness,
    "contrast": contrast,
    "elastic_transform": elastic_transform,
    "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
    "speckle_noise": speckle_noise,
    "gaussian_blur": gaussian_blur,
    "spatter": spatter,
    "saturate": saturate,
}
CHUNK = 250  # images per seeded chunk of corrupt_indexed; changing it changes every generated dataset

__all__ = ["ALL_CORRUPTIONS", "BENCHMARK_CORRUPTIONS", "CHUNK", "CORRUPTIONS", "EXTRA_CORRUPTIONS", "PARAMS",
           "chunk_seed", "corrupt", "corrupt_indexed"]


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise InputError(f"expected a torch.Tensor of images, got {type(images).__name__}; use torch.as_tensor")
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"expected RGB images of shape (N, 3, H, W), got {tuple(images.shape)}; "
                         "permute NHWC arrays with x.permute(0, 3, 1, 2)")
    if not images.is_floating_point():
        raise InputError(f"expected float images in [0, 1], got {images.dtype}; convert uint8 with x.float() / 255")
    low, high = torch.aminmax(images) if images.numel() else (torch.zeros(()), torch.zeros(()))
    if not (low >= 0 and high <= 1):  # also catches NaN
        raise InputError("images must be finite and in [0, 1]; divide uint8 data by 255 and clip with x.clamp(0, 1)")


def corrupt(
    images: torch.Tensor,
    name: str,
    severity: int,
    generator: torch.Generator | None = None,
    frost_images: str | Path | None = None,
) -> torch.Tensor:
    """Corrupt float images (N, 3, H, W) in [0, 1] with ``name`` at ``severity`` 1..5; returns them in [0, 1]."""
    check_selection([name], [severity])
    _check_images(images)
    op = CORRUPTIONS[name]
    if name == "frost" and frost_images is not None:
        op = partial(frost, frost_images=str(frost_images))
    x = images.float() if images.dtype != torch.float32 else images
    with torch.no_grad():
        out = op(x, PARAMS[name][severity - 1], Rng(generator, x.device))
    return out.clamp_(0, 1).to(images.dtype)


def chunk_seed(seed: int, name: str, severity: int, chunk: int) -> int:
    """The generator seed of one chunk: a stable 63-bit hash of (seed, corruption, severity, chunk)."""
    digest = hashlib.blake2b(f"{seed}/{name}/{severity}/{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def corrupt_indexed(
    images: torch.Tensor,
    start: int,
    name: str,
    severity: int,
    seed: int,
    frost_images: str | Path | None = None,
) -> torch.Tensor:
    """Corrupt images ``start .. start + N - 1`` of a dataset so that image i depends only on (seed, name, severity,
    i); ``start`` must be a multiple of ``CHUNK`` and only the dataset's last chunk may be short."""
    if start % CHUNK:
        raise ValueError(f"start {start} is not a multiple of the chunk size {CHUNK}")
    out = torch.empty_like(images)
    for offset in range(0, len(images), CHUNK):
        g = torch.Generator().manual_seed(chunk_seed(seed, name, severity, (start + offset) // CHUNK))
        part = images[offset:offset + CHUNK]
        if len(part) < CHUNK:  # pad, so that the draws of each position do not depend on the chunk's length
            part = torch.cat([part, part.new_zeros(CHUNK - len(part), *part.shape[1:])])
        result = corrupt(part, name, severity, generator=g, frost_images=frost_images)
        out[offset:offset + CHUNK] = result[:len(out) - offset]
    return out
