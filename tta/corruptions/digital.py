"""Digital corruptions: brightness, contrast, saturate, elastic transform, pixelate and JPEG compression.

JPEG is a batched torch codec, not a call into libjpeg: baseline JPEG as Pillow writes and reads it, ported from
libjpeg's integer code paths (fixed-point JFIF YCbCr, 4:2:0 chroma subsampling with its rounding bias, the IJG
quality-scaled standard tables, the "islow" integer DCT and inverse DCT, "fancy" triangular chroma upsampling).
On images whose sides are multiples of 16 it reproduces Pillow's output; other sizes are padded by edge
replication, which can differ from libjpeg at the right and bottom edges.
"""

from __future__ import annotations

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


# libjpeg's fixed-point constants (CONST_BITS = 13) of its "islow" integer DCT, jfdctint.c and jidctint.c
_CONST_BITS, _PASS1_BITS = 13, 2
_F0298, _F0390, _F0541, _F0765, _F0899, _F1175 = 2446, 3196, 4433, 6270, 7373, 9633
_F1501, _F1847, _F1961, _F2053, _F2562, _F3072 = 12299, 15137, 16069, 16819, 20995, 25172


def _descale(x: torch.Tensor, n: int) -> torch.Tensor:
    """Round a fixed-point value right by ``n`` bits (libjpeg's DESCALE, an arithmetic shift)."""
    return (x + (1 << (n - 1))) >> n


def _odd_part(t0: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, t3: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The shared rotation of the odd coefficients in libjpeg's islow forward and inverse DCTs."""
    z1, z2, z3, z4 = t0 + t3, t1 + t2, t0 + t2, t1 + t3
    z5 = (z3 + z4) * _F1175
    z1, z2 = z1 * -_F0899, z2 * -_F2562
    z3, z4 = z3 * -_F1961 + z5, z4 * -_F0390 + z5
    return t0 * _F0298 + z1 + z3, t1 * _F2053 + z2 + z4, t2 * _F3072 + z2 + z3, t3 * _F1501 + z1 + z4


def _fdct_1d(d: torch.Tensor, first: bool) -> torch.Tensor:
    """One pass of ``jpeg_fdct_islow`` along the last axis (the rows first, then the columns)."""
    x = d.unbind(-1)
    t0, t7, t1, t6 = x[0] + x[7], x[0] - x[7], x[1] + x[6], x[1] - x[6]
    t2, t5, t3, t4 = x[2] + x[5], x[2] - x[5], x[3] + x[4], x[3] - x[4]
    t10, t13, t11, t12 = t0 + t3, t0 - t3, t1 + t2, t1 - t2
    shift = _CONST_BITS - _PASS1_BITS if first else _CONST_BITS + _PASS1_BITS
    if first:
        o0, o4 = (t10 + t11) << _PASS1_BITS, (t10 - t11) << _PASS1_BITS
    else:
        o0, o4 = _descale(t10 + t11, _PASS1_BITS), _descale(t10 - t11, _PASS1_BITS)
    z1 = (t12 + t13) * _F0541
    o2, o6 = _descale(z1 + t13 * _F0765, shift), _descale(z1 - t12 * _F1847, shift)
    a7, a5, a3, a1 = _odd_part(t4, t5, t6, t7)
    o7, o5, o3, o1 = (_descale(v, shift) for v in (a7, a5, a3, a1))
    return torch.stack([o0, o1, o2, o3, o4, o5, o6, o7], -1)


def _idct_1d(c: torch.Tensor, first: bool) -> torch.Tensor:
    """One pass of ``jpeg_idct_islow`` along the last axis (the columns first, then the rows)."""
    x = c.unbind(-1)
    z1 = (x[2] + x[6]) * _F0541
    t2, t3 = z1 - x[6] * _F1847, z1 + x[2] * _F0765
    t0, t1 = (x[0] + x[4]) << _CONST_BITS, (x[0] - x[4]) << _CONST_BITS
    t10, t13, t11, t12 = t0 + t3, t0 - t3, t1 + t2, t1 - t2
    o0, o1, o2, o3 = _odd_part(x[7], x[5], x[3], x[1])  # tmp0..tmp3 of jidctint.c
    shift = _CONST_BITS - _PASS1_BITS if first else _CONST_BITS + _PASS1_BITS + 3
    out = (t10 + o3, t11 + o2, t12 + o1, t13 + o0, t13 - o0, t12 - o1, t11 - o2, t10 - o3)
    return torch.stack([_descale(v, shift) for v in out], -1)


def _blocks_roundtrip(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """libjpeg's integer DCT, quantisation, dequantisation and inverse DCT of every 8x8 block of (N, P, H, W)
    integer samples in 0..255; returns the decoded samples (int64, 0..255)."""
    n, p, h, w = plane.shape
    q = table.to(plane.device, torch.int64)
    blocks = plane.reshape(n, p, h // 8, 8, w // 8, 8).transpose(3, 4).long() - 128  # (..., row, col)
    coef = _fdct_1d(_fdct_1d(blocks, True).transpose(-1, -2), False).transpose(-1, -2)  # scaled up by 8
    qval = q * 8
    quant = torch.sign(coef) * torch.div(coef.abs() + qval // 2, qval, rounding_mode="floor")
    deq = quant * q
    rows = _idct_1d(deq.transpose(-1, -2), True).transpose(-1, -2)  # columns first
    out = (_idct_1d(rows, False) + 128).clamp(0, 255)
    return out.transpose(3, 4).reshape(n, p, h, w)


def _fancy_upsample(c: torch.Tensor) -> torch.Tensor:
    """libjpeg's h2v2 "fancy" (triangular) upsampling of (N, P, h, w) int chroma to (N, P, 2h, 2w), jdsample.c."""
    up = torch.cat([c[:, :, :1], c[:, :, :-1]], 2)
    down = torch.cat([c[:, :, 1:], c[:, :, -1:]], 2)
    # vertical: 3 x nearer row + farther row, for the upper and the lower output row of each input row
    v = torch.stack([3 * c + up, 3 * c + down], 3).flatten(2, 3)
    left = torch.cat([v[..., :1], v[..., :-1]], 3)
    right = torch.cat([v[..., 1:], v[..., -1:]], 3)
    even = (3 * v + left + 8) >> 4
    odd = (3 * v + right + 7) >> 4
    even[..., 0] = (4 * v[..., 0] + 8) >> 4
    odd[..., -1] = (4 * v[..., -1] + 7) >> 4
    return torch.stack([even, odd], 4).flatten(3, 4)


def jpeg_compression(x: torch.Tensor, c: int, rng: Rng) -> torch.Tensor:
    """Encode and decode as a baseline 4:2:0 JPEG of quality c (see the module docstring)."""
    h, w = x.shape[-2:]
    ph, pw = -h % 16, -w % 16  # libjpeg replicates the last row and column to fill whole 16x16 MCUs
    rgb = torch.round(x.clamp(0, 1) * 255)
    if ph or pw:
        rgb = F.pad(rgb, (0, pw, 0, ph), mode="replicate")
    r, g, b = rgb.long().unbind(1)
    # jccolor.c: 16-bit fixed-point RGB -> YCbCr
    y = (19595 * r + 38470 * g + 7471 * b + 32768) >> 16
    cb = (-11059 * r - 21709 * g + 32768 * b + (128 << 16) + 32767) >> 16
    cr = (32768 * r - 27439 * g - 5329 * b + (128 << 16) + 32767) >> 16
    chroma = torch.stack([cb, cr], 1)
    # jcsample.c h2v2: the 2x2 sum plus an alternating bias of 1 and 2, divided by 4
    sums = chroma[..., 0::2, 0::2] + chroma[..., 0::2, 1::2] + chroma[..., 1::2, 0::2] + chroma[..., 1::2, 1::2]
    bias = torch.tensor([1, 2], device=x.device).repeat(sums.shape[-1] // 2)
    chroma = (sums + bias) >> 2
    tables = quant_tables(int(c))
    y = _blocks_roundtrip(y[:, None], tables[0])[:, 0]
    cb, cr = _fancy_upsample(_blocks_roundtrip(chroma, tables[1])).unbind(1)
    # jdcolor.c: YCbCr -> RGB through its rounded fixed-point tables
    cb, cr = cb - 128, cr - 128
    red = y + ((91881 * cr + 32768) >> 16)
    green = y + ((-22554 * cb + 32768 - 46802 * cr) >> 16)
    blue = y + ((116130 * cb + 32768) >> 16)
    out = torch.stack([red, green, blue], 1).clamp(0, 255).to(x.dtype) / 255
    return out[..., :h, :w]
