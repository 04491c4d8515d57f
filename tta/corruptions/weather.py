"""Weather corruptions: snow, frost, fog and spatter.

Frost blends in a frost texture. The published generator crops it from six frost photographs, which we do not
ship; by default we use a procedural ice texture (``frost_texture``: bright crystal ridges of a plasma fractal over
a smoothly varying blue-white base, with the overall brightness of a frost photograph). Pass ``frost_images=DIR``
(``tta corrupt --frost-images DIR``) to use real photographs instead: each is scaled by 0.2, as in the 32x32
generator, and every image gets a random crop of a random photograph.

Spatter follows the paper's generator: water (severities 1-3) shades the thresholded, smoothed noise layer by the
distance to the layer's edges; the edges, distance transform and histogram equalisation are batched torch
approximations of the OpenCV calls there (mask boundary instead of Canny, an octagonal distance instead of the
Euclidean one), so water spatter matches the published files in kind, not pixel for pixel. Mud (4-5) is exact.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from tta.corruptions._ops import Rng, box_blur3, clipped_zoom, filter2d, gaussian_filter, motion_blur, plasma_fractal
from tta.corruptions.constants import FROST_SCALE, MUD_RGB, WATER_RGB
from tta.errors import ConfigError, DataError

_GRAY = (0.299, 0.587, 0.114)  # OpenCV's RGB2GRAY weights
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _quantise(x: torch.Tensor) -> torch.Tensor:
    """Round trip through an 8-bit image, as the generator does between steps."""
    return torch.floor(x.clamp(0, 1) * 255) / 255


def snow(x: torch.Tensor, c: tuple, rng: Rng) -> torch.Tensor:
    """Zoomed, thresholded, motion-blurred snow flakes (twice, rotated by 180 degrees) over a whitened image."""
    loc, scale, zoom, threshold, radius, sigma, blend = c
    n, _, h, w = x.shape
    layer = clipped_zoom(rng.normal(n, 1, h, w, mean=loc, std=scale), zoom)
    layer = _quantise(torch.where(layer < threshold, torch.zeros_like(layer), layer))
    layer = _quantise(motion_blur(layer, radius, sigma, rng.uniform(n, low=-135, high=-45)))
    x = blend * x + (1 - blend) * torch.maximum(x, _gray(x) * 1.5 + 0.5)
    return x + layer + layer.flip(-1, -2)


def frost_texture(rng: Rng, n: int, h: int, w: int) -> torch.Tensor:
    """(n, 3, h, w) procedural frost in [0, 1]: thin bright ice ridges over a blue-white, smoothly varying base."""
    size = max(h, w)
    fine = plasma_fractal(rng, n, size, 1.3)[:, :h, :w]
    base = plasma_fractal(rng, n, size, 2.5)[:, :h, :w]
    ridges = (1 - (2 * fine - 1).abs()) ** 6  # bright where the rough fractal crosses its mid-level: crystal veins
    ice = (0.35 + 0.35 * base + 0.5 * ridges).clamp(0, 1)
    tint = torch.tensor((0.86, 0.93, 1.0), device=rng.device).view(1, 3, 1, 1)
    return ice[:, None] * tint


@lru_cache(maxsize=4)
def load_frost_images(directory: str) -> tuple[torch.Tensor, ...]:
    """The frost photographs of ``directory`` as (3, h, w) float tensors, scaled by 0.2 (cached)."""
    from PIL import Image

    root = Path(directory)
    if not root.is_dir():
        raise ConfigError(f"frost image directory {root} does not exist; pass a folder of frost photographs")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{root} holds no images ({', '.join(_IMAGE_SUFFIXES)}); put frost photographs there")
    textures = []
    for path in files:
        with Image.open(path) as img:
            img = img.convert("RGB")
            size = (max(1, round(img.width * FROST_SCALE)), max(1, round(img.height * FROST_SCALE)))
            img = img.resize(size, Image.Resampling.BILINEAR)
            t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size[1], size[0], 3)
        textures.append(t.permute(2, 0, 1).float().div(255))
    return tuple(textures)


def _photo_crops(textures: tuple[torch.Tensor, ...], rng: Rng, n: int, h: int, w: int) -> torch.Tensor:
    """A random (h, w) crop of a random photograph per image (photographs smaller than that are scaled up)."""
    which = rng.integers(0, len(textures), n)
    u = rng.uniform(n, 2)
    out = torch.empty(n, 3, h, w, device=rng.device)
    for k, tex in enumerate(textures):
        pick = torch.nonzero(which == k).flatten()
        if len(pick) == 0:
            continue
        tex = tex.to(rng.device)
        if tex.shape[1] < h or tex.shape[2] < w:
            f = max(h / tex.shape[1], w / tex.shape[2])
            size = (max(h, round(tex.shape[1] * f)), max(w, round(tex.shape[2] * f)))
            tex = F.interpolate(tex[None], size=size, mode="bilinear", align_corners=False)[0]
        top = (u[pick, 0] * max(tex.shape[1] - h, 1)).long()
        left = (u[pick, 1] * max(tex.shape[2] - w, 1)).long()
        rows = top[:, None] + torch.arange(h, device=rng.device)
        cols = left[:, None] + torch.arange(w, device=rng.device)
        out[pick] = tex[:, rows[:, :, None], cols[:, None, :]].permute(1, 0, 2, 3)
    return out


def frost(x: torch.Tensor, c: tuple[float, float], rng: Rng, frost_images: str | None = None) -> torch.Tensor:
    """c0 x + c1 frost, the frost texture procedural or cropped from the photographs of ``frost_images``."""
    n, _, h, w = x.shape
    if frost_images is None:
        texture = frost_texture(rng, n, h, w)
    else:
        texture = _photo_crops(load_frost_images(str(frost_images)), rng, n, h, w)
    return c[0] * x + c[1] * texture


def fog(x: torch.Tensor, c: tuple[float, float], rng: Rng) -> torch.Tensor:
    """(x + a plasma) m / (m + a), m the image's maximum: a fractal haze that keeps the brightest value."""
    amount, decay = c
    n, _, h, w = x.shape
    m = x.amax((1, 2, 3), keepdim=True)
    haze = plasma_fractal(rng, n, max(h, w), decay)[:, None, :h, :w]
    return (x + amount * haze) * m / (m + amount)


def _equalize_hist(v: torch.Tensor) -> torch.Tensor:
    """OpenCV ``equalizeHist`` of each (1, H, W) uint8-valued plane of v (values 0..255 as floats)."""
    n = v.shape[0]
    flat = v.reshape(n, -1).long()
    hist = torch.zeros(n, 256, device=v.device).scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float))
    cdf = hist.cumsum(1)
    first = hist.gt(0).float().argmax(1, keepdim=True)
    h0 = hist.gather(1, first)
    total = float(flat.shape[1])
    lut = torch.round((cdf - h0) * 255 / (total - h0).clamp_min(1)).clamp(0, 255)
    out = lut.gather(1, flat)
    constant = (h0 == total).expand_as(out)
    return torch.where(constant, flat.float(), out).view_as(v)


def _dilate(x: torch.Tensor, square: bool) -> torch.Tensor:
    """Binary dilation of (N, 1, H, W) by the 3x3 square or the 3x3 cross (shifted maxima; zero outside)."""
    p = F.pad(x, (1, 1, 1, 1))
    cols = torch.maximum(torch.maximum(p[..., :-2, :], p[..., 1:-1, :]), p[..., 2:, :])  # vertical 3-max
    if square:
        return torch.maximum(torch.maximum(cols[..., :-2], cols[..., 1:-1]), cols[..., 2:])
    return torch.maximum(torch.maximum(cols[..., 1:-1], p[..., 1:-1, :-2]), p[..., 1:-1, 2:])


def _edge_distance(mask: torch.Tensor, cap: int = 20) -> torch.Tensor:
    """Distance (octagonal approximation of Euclidean) of each pixel to the mask's boundary, capped at ``cap``."""
    inside = mask.float()
    reached = inside * _dilate(1 - inside, square=True)  # mask pixels with a non-mask 8-neighbour
    dist = 1 - reached
    for step in range(1, cap):
        # alternate square and cross dilations: an octagonal distance, closer to Euclidean than either alone
        reached = _dilate(reached, square=bool(step % 2))
        dist += 1 - reached  # each pixel counts the steps before the boundary reaches it
    return dist


def spatter(x: torch.Tensor, c: tuple, rng: Rng) -> torch.Tensor:
    """Water (severities 1-3) or mud (4-5) splashes from thresholded smoothed noise (see the module docstring)."""
    loc, scale, sigma, threshold, intensity, mud = c
    n, _, h, w = x.shape
    liquid = gaussian_filter(rng.normal(n, 1, h, w, mean=loc, std=scale), sigma)
    liquid = torch.where(liquid < threshold, torch.zeros_like(liquid), liquid)
    if not mud:
        dist = box_blur3(_edge_distance(liquid > 0))
        dist = _equalize_hist(torch.floor(dist))
        emboss = torch.tensor([[-2.0, -1, 0], [-1, 1, 1], [0, 1, 2]])
        dist = box_blur3(torch.round(filter2d(dist, emboss, "mirror")).clamp(0, 255))
        m = liquid * dist
        m = m / m.amax((1, 2, 3), keepdim=True).clamp_min(1e-12) * intensity
        color = torch.tensor(WATER_RGB, device=x.device).view(1, 3, 1, 1)
        return x + m * color
    m = gaussian_filter((liquid > threshold).float(), intensity)
    m = torch.where(m < 0.8, torch.zeros_like(m), m)
    color = torch.tensor(MUD_RGB, device=x.device).view(1, 3, 1, 1)
    return x * (1 - m) + color * m
