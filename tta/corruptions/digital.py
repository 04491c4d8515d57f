"""Digital corruptions: brightness, contrast, saturate, elastic transform, pixelate and JPEG compression.

JPEG is a batched torch codec, not a call into libjpeg: baseline JPEG as Pillow writes and reads it (JFIF YCbCr,
4:2:0 chroma subsampling with libjpeg's rounding, the IJG quality-scaled standard tables, 8x8 DCT, libjpeg's
"fancy" triangular chroma upsampling when decoding). It uses a float DCT where libjpeg uses integer arithmetic, so
a few values differ from Pillow's by one or two levels; the test suite bounds the difference.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from tta.corruptions._ops import Rng, gaussian_filter, hsv_to_rgb, pil_box_matrix, rgb_to_hsv


def brightness(x: torch.Tensor, c: float, rng: Rng) -> torch.Tensor:
    """HSV value + c, clipped to 1."""
    hsv = rgb_to_hsv(x)
    hsv[:, 2] = (hsv[:, 2] + c).clamp(0, 1)
    return hsv_to_rgb(hsv)


def saturate(x: torch.Tensor, c: tuple[float, float], rng: Rng) -> torch.Tensor:
    """HSV saturation s a + b, clipped to [0, 1]."""
    hsv = rgb_to_hsv(x)
    hsv[:, 1] = (hsv[:, 1] * c[0] + c[1]).clamp(0, 1)
    return hsv_to_rgb(hsv)


def contrast(x: torch.Tensor, c: float, rng: Rng) -> torch.Tensor:
    """(x - mean) c + mean, the mean over each image's pixels per channel."""
    mean = x.mean((2, 3), keepdim=True)
    return (x - mean) * c + mean


def _pixel_grid(coords: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """Pixel coordinates (..., 2) as (x, y) to grid_sample's normalised coordinates."""
    h, w = size
    scale = torch.tensor([w, h], device=coords.device, dtype=coords.dtype)
    if align_corners:
        return coords / (scale - 1).clamp_min(1) * 2 - 1
    return (coords * 2 + 1) / scale - 1


def elastic_transform(x: torch.Tensor, c: tuple[float, float, float], rng: Rng) -> torch.Tensor:
    """Random affine of three points around the centre, then smoothed random displacement fields.

    The affine uses OpenCV's reflect-101 border (grid_sample's ``reflection`` with aligned corners), the
    displacement scipy's ``map_coordinates(mode='reflect')`` (``reflection`` without aligned corners).
    """
    alpha, sigma, offset = c
    n, _, h, w = x.shape
    centre = torch.tensor([w // 2, h // 2], dtype=torch.float64)
    half = min(h, w) // 3
    pts1 = torch.stack([centre + half, torch.stack([centre[0] + half, centre[1] - half]), centre - half])
    pts2 = pts1 + rng.uniform(n, 3, 2, low=-offset, high=offset).double().cpu()
    # warpAffine samples the source at M^-1 p, where M maps pts1 to pts2; solve for the map pts2 -> pts1 directly
    ones = torch.ones(n, 3, 1, dtype=torch.float64)
    inverse = torch.linalg.solve(torch.cat([pts2, ones], 2), pts1.expand(n, 3, 2))  # (n, 3, 2): [x y 1] @ inv
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")
    pix = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, h * w, 3)
    src = (pix @ inverse).view(n, h, w, 2).float().to(x.device)
    x = F.grid_sample(x, _pixel_grid(src, (h, w), True), mode="bilinear", padding_mode="reflection",
                      align_corners=True)
    dx = rng.uniform(n, 1, h, w, low=-1, high=1)
    dy = rng.uniform(n, 1, h, w, low=-1, high=1)
    if alpha == 0:
        return x
    dx = gaussian_filter(dx, sigma, mode="reflect", truncate=3) * alpha
    dy = gaussian_filter(dy, sigma, mode="reflect", truncate=3) * alpha
    base = torch.stack([xs, ys], -1).float().to(x.device)
    coords = base + torch.cat([dx, dy], 1).permute(0, 2, 3, 1)
    return F.grid_sample(x, _pixel_grid(coords, (h, w), False), mode="bilinear", padding_mode="reflection",
                         align_corners=False)


def pixelate(x: torch.Tensor, c: float, rng: Rng) -> torch.Tensor:
    """PIL ``BOX`` resize to int(size c) and back: one (H x H) and one (W x W) matrix product per image."""
    h, w = x.shape[-2:]
    small_h, small_w = max(1, int(h * c)), max(1, int(w * c))
    rows = (pil_box_matrix(small_h, h) @ pil_box_matrix(h, small_h)).to(x.device, x.dtype)
    cols = (pil_box_matrix(small_w, w) @ pil_box_matrix(w, small_w)).to(x.device, x.dtype)
    # PIL resizes the width first (the horizontal pass), then the height
    return rows @ (x @ cols.T)


_LUMA = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
         14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
         49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
_CHROMA = (17, 18, 24, 47, 99, 99, 99, 99, 18, 21, 26, 66, 99, 99, 99, 99, 24, 26, 56, 99, 99, 99, 99, 99,
           47, 66, 99, 99, 99, 99, 99, 99, *([99] * 32))


@lru_cache(maxsize=16)
def quant_tables(quality: int) -> torch.Tensor:
    """(2, 8, 8) luminance and chrominance tables of libjpeg's ``jpeg_set_quality`` (baseline: at most 255)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    base = torch.tensor([_LUMA, _CHROMA], dtype=torch.float64).view(2, 8, 8)
    return torch.floor((base * scale + 50) / 100).clamp(1, 255)


@lru_cache(maxsize=1)
def _dct_matrix() -> torch.Tensor:
    """The orthonormal 8-point DCT-II matrix."""
    k = torch.arange(8, dtype=torch.float64)
    m = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return m


def _blocks_roundtrip(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """DCT, quantise, dequantise and inverse-DCT every 8x8 block of (N, P, H, W) level-shifted samples."""
    n, p, h, w = plane.shape
    d = _dct_matrix().to(plane.device, plane.dtype)
    q = table.to(plane.device, plane.dtype)
    blocks = plane.reshape(n, p, h // 8, 8, w // 8, 8).transpose(3, 4)
    coef = d @ blocks @ d.T
    coef = torch.round(coef / q) * q
    return (d.T @ coef @ d).transpose(3, 4).reshape(n, p, h, w)


def _fancy_upsample(c: torch.Tensor) -> torch.Tensor:
    """libjpeg's h2v2 "fancy" (triangular) upsampling of (N, P, h, w) chroma to (N, P, 2h, 2w), integer rounding."""
    up = torch.cat([c[:, :, :1], c[:, :, :-1]], 2)
    down = torch.cat([c[:, :, 1:], c[:, :, -1:]], 2)
    # vertical: 3 x nearer row + farther row, for the upper and the lower output row of each input row
    v = torch.stack([3 * c + up, 3 * c + down], 3).flatten(2, 3)
    left = torch.cat([v[..., :1], v[..., :-1]], 3)
    right = torch.cat([v[..., 1:], v[..., -1:]], 3)
    even = torch.floor((3 * v + left + 8) / 16)
    odd = torch.floor((3 * v + right + 7) / 16)
    even[..., 0] = torch.floor((4 * v[..., 0] + 8) / 16)
    odd[..., -1] = torch.floor((4 * v[..., -1] + 7) / 16)
    return torch.stack([even, odd], 4).flatten(3, 4)


def jpeg_compression(x: torch.Tensor, c: int, rng: Rng) -> torch.Tensor:
    """Encode and decode as a baseline 4:2:0 JPEG of quality c (see the module docstring)."""
    h, w = x.shape[-2:]
    ph, pw = -h % 16, -w % 16  # libjpeg replicates the last row and column to fill whole 16x16 MCUs
    rgb = torch.round(x.clamp(0, 1) * 255)
    if ph or pw:
        rgb = F.pad(rgb, (0, pw, 0, ph), mode="replicate")
    r, g, b = rgb.unbind(1)
    y = torch.round(0.299 * r + 0.587 * g + 0.114 * b)
    cb = torch.round(-0.168735892 * r - 0.331264108 * g + 0.5 * b + 128)
    cr = torch.round(0.5 * r - 0.418687589 * g - 0.081312411 * b + 128)
    chroma = torch.stack([cb, cr], 1)
    # libjpeg's h2v2 downsampling: the 2x2 sum plus an alternating bias of 1 and 2, divided by 4
    sums = F.avg_pool2d(chroma, 2) * 4
    bias = torch.tensor([1.0, 2.0], device=x.device).repeat(sums.shape[-1] // 2)
    chroma = torch.floor((sums + bias) / 4)
    tables = quant_tables(int(c))
    y = (_blocks_roundtrip(y[:, None] - 128, tables[0]) + 128).round().clamp(0, 255)[:, 0]
    chroma = (_blocks_roundtrip(chroma - 128, tables[1]) + 128).round().clamp(0, 255)
    cb, cr = _fancy_upsample(chroma).unbind(1)
    out = torch.stack([y + 1.402 * (cr - 128), y - 0.344136286 * (cb - 128) - 0.714136286 * (cr - 128),
                       y + 1.772 * (cb - 128)], 1)
    out = torch.round(out).clamp(0, 255) / 255
    return out[..., :h, :w]
