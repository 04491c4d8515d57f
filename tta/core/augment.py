"""Random test-time augmentations as batched tensor ops on the images' own device.

``tta_augment`` is the augmentation CoTTA averages its teacher over and RoTTA trains its student on (KATANA's
test-time transforms as the reference benchmark composes them). One call draws ONE set of random parameters and
applies it to the whole batch, as the reference does when it transforms a batch tensor:

clip to [0, 1]; colour jitter with brightness, contrast, saturation, hue and gamma in a random order; edge padding
by half the image size; a random affine map (rotation, translation by up to 1/16 of the padded size, scaling;
bilinear, zero fill); a 5x5 Gaussian blur; the centre crop back to the original size; a horizontal flip with
probability 1/2; additive Gaussian noise; clip to [0, 1].

Every random number comes from torch's default generators (the scalars from the CPU one, the noise from the
device's), so ``torch.manual_seed`` (the engine seeds it with the run's seed) makes runs reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AugmentRanges:
    """Ranges the parameters of one ``tta_augment`` draw are uniform in (``soft``: the milder set)."""

    brightness: tuple[float, float]
    contrast: tuple[float, float]
    saturation: tuple[float, float]
    hue: tuple[float, float]
    gamma: tuple[float, float]
    degrees: float
    scale: tuple[float, float]
    blur_sigma: tuple[float, float]


STRONG = AugmentRanges(brightness=(0.6, 1.4), contrast=(0.7, 1.3), saturation=(0.5, 1.5), hue=(-0.06, 0.06),
                       gamma=(0.7, 1.3), degrees=15.0, scale=(0.9, 1.1), blur_sigma=(0.001, 0.5))
SOFT = AugmentRanges(brightness=(0.8, 1.2), contrast=(0.85, 1.15), saturation=(0.75, 1.25), hue=(-0.03, 0.03),
                     gamma=(0.85, 1.15), degrees=8.0, scale=(0.95, 1.05), blur_sigma=(0.001, 0.25))
TRANSLATE = 1 / 16  # of the padded image's size, at most, in each direction
BLUR_KERNEL = 5


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high).item())


def color_jitter(x: torch.Tensor, ranges: AugmentRanges = STRONG) -> torch.Tensor:
    """Brightness, contrast, saturation, hue and gamma adjustments in a random order, one draw for the batch."""
    import torchvision.transforms.functional as F

    rgb = x.shape[-3] == 3  # saturation and hue are defined on RGB images only
    for op in torch.randperm(5).tolist():
        if op == 0:
            x = F.adjust_brightness(x, _uniform(*ranges.brightness))
        elif op == 1:
            x = F.adjust_contrast(x, _uniform(*ranges.contrast)) if rgb else _gray_contrast(x, ranges)
        elif op == 2:
            factor = _uniform(*ranges.saturation)
            x = F.adjust_saturation(x, factor) if rgb else x
        elif op == 3:
            factor = _uniform(*ranges.hue)
            x = F.adjust_hue(x, factor) if rgb else x
        else:
            # Clamped away from 0 first: the gradient of x**gamma at 0 is not finite.
            x = F.adjust_gamma(x.clamp(1e-8, 1.0), _uniform(*ranges.gamma))
    return x


def _gray_contrast(x: torch.Tensor, ranges: AugmentRanges) -> torch.Tensor:
    """Contrast for images that are not RGB: blend every channel with its image's mean."""
    factor = _uniform(*ranges.contrast)
    mean = x.mean(dim=(-3, -2, -1), keepdim=True)
    return (factor * x + (1 - factor) * mean).clamp(0, 1)


def tta_augment(x: torch.Tensor, *, soft: bool = False, noise_std: float = 0.005) -> torch.Tensor:
    """One random draw of the test-time augmentation applied to every image of ``x`` (N, C, H, W) in [0, 1]."""
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode

    ranges = SOFT if soft else STRONG
    height, width = x.shape[-2:]
    x = color_jitter(x.clamp(0, 1), ranges)
    pad = int(height / 2)
    x = F.pad(x, [pad], padding_mode="edge")
    angle = _uniform(-ranges.degrees, ranges.degrees)
    max_dx, max_dy = TRANSLATE * x.shape[-1], TRANSLATE * x.shape[-2]
    translate = [round(_uniform(-max_dx, max_dx)), round(_uniform(-max_dy, max_dy))]
    scale = _uniform(*ranges.scale)
    x = F.affine(x, angle=angle, translate=translate, scale=scale, shear=[0.0, 0.0],
                 interpolation=InterpolationMode.BILINEAR, fill=[0.0] * x.shape[-3])
    sigma = _uniform(*ranges.blur_sigma)
    x = F.gaussian_blur(x, [BLUR_KERNEL, BLUR_KERNEL], [sigma, sigma])
    x = F.center_crop(x, [height, width])
    if torch.rand(1).item() < 0.5:
        x = x.flip(-1)
    if noise_std > 0:
        x = x + torch.randn(x.shape, device=x.device, dtype=x.dtype) * noise_std
    return x.clamp(0, 1)


__all__ = ["SOFT", "STRONG", "AugmentRanges", "color_jitter", "tta_augment"]
