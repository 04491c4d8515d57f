"""Blur corruptions: gaussian, glass, defocus, motion and zoom blur.

Glass blur: the published generator "swaps" each pixel (h, w), for h and w from H-d down to d+1, with
(h+dy, w+dx), dx, dy uniform integers in [-d, d), written as ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` on numpy
views. Because the right-hand side holds views, that statement copies x[h', w'] into x[h, w] and leaves x[h', w']
unchanged; and since the scan runs downwards and leftwards while the offsets point upwards and leftwards, every
source pixel is read before it is written. So each iteration is exactly one gather of the unmodified image,
which is what we do, batched over images (one gather per iteration instead of (H-2d)^2 sequential swaps). This
reproduces the published CIFAR-10-C files' behaviour, not the "swap" the comment describes. (The argument needs
offsets that point only upwards and leftwards, i.e. d = 1, which all five published severities use.)
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from tta.corruptions._ops import Rng, clipped_zoom, filter2d, gaussian_filter, motion_blur


def gaussian_blur(x: torch.Tensor, c: float, rng: Rng) -> torch.Tensor:
    """Gaussian filter of each channel with sigma c (skimage's ``gaussian``: truncate 4, nearest borders)."""
    return gaussian_filter(x, c)


def glass_blur(x: torch.Tensor, c: tuple[float, int, int], rng: Rng) -> torch.Tensor:
    """Blur, quantise to uint8, displace pixels locally ``iterations`` times (see the module docstring), blur."""
    sigma, d, iterations = c
    n, ch, h, w = x.shape
    x = torch.floor(gaussian_filter(x, sigma) * 255) / 255  # the generator stores the first blur as uint8
    hs, ws = torch.arange(h - d, d, -1), torch.arange(w - d, d, -1)  # the scan positions, in scan order
    offsets = rng.integers(-d, d, n, iterations, len(hs), len(ws), 2)  # (dx, dy) per position, in scan order
    rows = torch.arange(h, device=x.device).view(1, h, 1).expand(n, h, w).clone()
    cols = torch.arange(w, device=x.device).view(1, 1, w).expand(n, h, w).clone()
    hs_d, ws_d = hs.to(x.device), ws.to(x.device)
    flat = x.reshape(n, ch, h * w)
    for it in range(iterations):
        src_r, src_c = rows.clone(), cols.clone()
        src_r[:, hs_d[:, None], ws_d[None, :]] += offsets[:, it, :, :, 1]
        src_c[:, hs_d[:, None], ws_d[None, :]] += offsets[:, it, :, :, 0]
        index = (src_r * w + src_c).view(n, 1, h * w).expand(n, ch, h * w)
        flat = flat.gather(2, index)
    return gaussian_filter(flat.view(n, ch, h, w), sigma)


@lru_cache(maxsize=16)
def disk_kernel(radius: float, alias_blur: float) -> torch.Tensor:
    """The normalised disk of ``radius`` on a 17x17 grid, smoothed by a 3x3 Gaussian of sigma ``alias_blur``,
    cropped to its non-zero support (the published ``disk``; OpenCV reflect-101 borders for the smoothing)."""
    grid = torch.arange(-8, 9, dtype=torch.float64)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    disk = ((xx**2 + yy**2) <= radius**2).double()
    disk /= disk.sum()
    g = torch.exp(-torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64) ** 2 / (2 * alias_blur**2))
    g /= g.sum()
    k = filter2d(filter2d(disk, g[None, :], "mirror"), g[:, None], "mirror")
    nz = torch.nonzero(k > 1e-12)
    r = int(max(nz[:, 0].sub(8).abs().max(), nz[:, 1].sub(8).abs().max()))
    return k[8 - r:9 + r, 8 - r:9 + r].float()


def defocus_blur(x: torch.Tensor, c: tuple[float, float], rng: Rng) -> torch.Tensor:
    """Convolve each channel with an anti-aliased disk (OpenCV ``filter2D``, reflect-101 borders)."""
    return filter2d(x, disk_kernel(*c), "mirror")


def motion_blur_op(x: torch.Tensor, c: tuple[int, float], rng: Rng) -> torch.Tensor:
    """Linear motion blur (radius, sigma) at a random angle uniform in [-45, 45] degrees per image."""
    radius, sigma = c
    return motion_blur(x, radius, sigma, rng.uniform(x.shape[0], low=-45, high=45))


def zoom_blur(x: torch.Tensor, c: tuple[float, ...], rng: Rng) -> torch.Tensor:
    """Mean of x and its centre zooms by each factor in c."""
    out = x.clone()
    seen: dict[tuple[int, ...], torch.Tensor] = {}
    for z in c:
        # distinct factors often round to the same crop and output size on small images: zoom those once
        key = tuple(v for n in x.shape[-2:] for v in (math.ceil(n / z), round(math.ceil(n / z) * z)))
        if key not in seen:
            seen[key] = clipped_zoom(x, z)
        out += seen[key]
    return out / (len(c) + 1)
