"""Images per second of ``tta.corrupt`` against a straightforward per-image numpy/scipy/PIL implementation.

Both sides use the constants of ``tta.corruptions.constants`` and are timed in the same run on the same images;
the reference follows the published generator one image at a time (numpy random draws, scipy.ndimage filters,
PIL for pixelate and JPEG, the original Python loop for glass blur). Example:

    python benchmarks/corruptions.py --n 500 --severity 3            # CPU, one thread on each side
    python benchmarks/corruptions.py --n 5000 --device cuda           # GPU against the CPU reference
"""

from __future__ import annotations

import argparse
import io
import math
import time

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from tta.corruptions import CORRUPTIONS, PARAMS, corrupt
from tta.corruptions.constants import MUD_RGB, WATER_RGB

# ------------------------------------------------------------------------------------- per-image reference
# Every function takes one HWC float image in [0, 1], the severity's constants and a numpy Generator.


def ref_gaussian_noise(x, c, rng):
    return x + rng.normal(size=x.shape, scale=c)


def ref_shot_noise(x, c, rng):
    return rng.poisson(x * c) / c


def ref_impulse_noise(x, c, rng):
    u = rng.random(x.shape)
    return np.where(u < c / 2, 0.0, np.where(u < c, 1.0, x))


def ref_speckle_noise(x, c, rng):
    return x + x * rng.normal(size=x.shape, scale=c)


def ref_gaussian_blur(x, c, rng):
    return ndimage.gaussian_filter(x, sigma=(c, c, 0), mode="nearest", truncate=4.0)


def ref_glass_blur(x, c, rng):
    sigma, d, iterations = c
    h, w = x.shape[:2]
    x = np.uint8(ndimage.gaussian_filter(x, sigma=(sigma, sigma, 0), mode="nearest") * 255)
    for _ in range(iterations):
        for hh in range(h - d, d, -1):
            for ww in range(w - d, d, -1):
                dx, dy = rng.integers(-d, d, size=(2,))
                hp, wp = hh + dy, ww + dx
                x[hh, ww], x[hp, wp] = x[hp, wp], x[hh, ww]  # the published statement, numpy-view semantics
    return ndimage.gaussian_filter(x / 255.0, sigma=(sigma, sigma, 0), mode="nearest")


def _disk(radius, alias_blur):
    grid = np.arange(-8, 9)
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx**2 + yy**2) <= radius**2).astype(np.float64)
    disk /= disk.sum()
    g = np.exp(-np.array([-1.0, 0, 1]) ** 2 / (2 * alias_blur**2))
    return ndimage.correlate(disk, np.outer(g, g) / g.sum() ** 2, mode="mirror")


def ref_defocus_blur(x, c, rng):
    k = _disk(*c)
    return np.stack([ndimage.correlate(x[..., i], k, mode="mirror") for i in range(3)], -1)


def _shift(image, dx, dy):
    h, w = image.shape[:2]
    rows = np.clip(np.arange(h) - dy, 0, h - 1)
    cols = np.clip(np.arange(w) - dx, 0, w - 1)
    return image[rows][:, cols]


def _motion(x, radius, sigma, angle):
    width = 2 * radius + 1
    k = np.exp(-np.arange(width) ** 2 / (2 * sigma**2))
    k /= k.sum()
    out = np.zeros_like(x)
    for i in range(width):
        dy = -math.ceil(i * math.sin(math.radians(angle)) - 0.5)
        dx = -math.ceil(i * math.cos(math.radians(angle)) - 0.5)
        if abs(dy) >= x.shape[0] or abs(dx) >= x.shape[1]:
            break
        out += k[i] * _shift(x, dx, dy)
    return out


def ref_motion_blur(x, c, rng):
    return _motion(x, c[0], c[1], rng.uniform(-45, 45))


def _clipped_zoom(img, z):
    h = img.shape[0]
    ch = math.ceil(h / z)
    top = (h - ch) // 2
    out = ndimage.zoom(img[top:top + ch, top:top + ch], (z, z, 1)[:img.ndim], order=1)
    trim = (out.shape[0] - h) // 2
    return out[trim:trim + h, trim:trim + h]


def ref_zoom_blur(x, c, rng):
    out = x.copy()
    for z in c:
        out += _clipped_zoom(x, z)
    return out / (len(c) + 1)


def ref_snow(x, c, rng):
    loc, scale, zoom, threshold, radius, sigma, blend = c
    layer = _clipped_zoom(rng.normal(loc, scale, size=x.shape[:2]), zoom)
    layer[layer < threshold] = 0
    layer = np.floor(np.clip(layer, 0, 1) * 255) / 255
    layer = np.floor(np.clip(_motion(layer, radius, sigma, rng.uniform(-135, -45)), 0, 1) * 255)[..., None] / 255
    gray = x @ np.array([0.299, 0.587, 0.114])
    x = blend * x + (1 - blend) * np.maximum(x, gray[..., None] * 1.5 + 0.5)
    return x + layer + np.rot90(layer, k=2)


def _plasma(size, decay, rng):
    m = 1 << max(1, (size - 1).bit_length())
    a = np.zeros((m, m))
    step, wibble = m, 100.0
    while step >= 2:
        half = step // 2
        corners = a[0:m:step, 0:m:step]
        sq = corners + np.roll(corners, -1, 0)
        sq = sq + np.roll(sq, -1, 1)
        a[half:m:step, half:m:step] = sq / 4 + wibble * rng.uniform(-wibble, wibble, sq.shape)
        dr, ul = a[half:m:step, half:m:step], a[0:m:step, 0:m:step]
        lt = dr + np.roll(dr, 1, 0) + ul + np.roll(ul, -1, 1)
        a[0:m:step, half:m:step] = lt / 4 + wibble * rng.uniform(-wibble, wibble, lt.shape)
        tt = dr + np.roll(dr, 1, 1) + ul + np.roll(ul, -1, 0)
        a[half:m:step, 0:m:step] = tt / 4 + wibble * rng.uniform(-wibble, wibble, tt.shape)
        step, wibble = half, wibble / decay
    a -= a.min()
    return a / a.max()


def ref_fog(x, c, rng):
    amount, decay = c
    m = x.max()
    h, w = x.shape[:2]
    return (x + amount * _plasma(max(h, w), decay, rng)[:h, :w, None]) * m / (m + amount)


def ref_frost(x, c, rng):
    h, w = x.shape[:2]
    fine = _plasma(max(h, w), 1.3, rng)[:h, :w]
    base = _plasma(max(h, w), 2.5, rng)[:h, :w]
    ice = np.clip(0.35 + 0.35 * base + 0.5 * (1 - np.abs(2 * fine - 1)) ** 6, 0, 1)
    return c[0] * x + c[1] * ice[..., None] * np.array([0.86, 0.93, 1.0])


def _rgb2hsv(x):
    v = x.max(-1)
    delta = v - x.min(-1)
    s = np.where(v > 0, delta / np.maximum(v, 1e-12), 0)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    d = np.maximum(delta, 1e-12)
    h = np.where(v == r, (g - b) / d, np.where(v == g, 2 + (b - r) / d, 4 + (r - g) / d))
    return np.stack([np.where(delta > 0, (h / 6) % 1, 0), s, v], -1)


def _hsv2rgb(hsv):
    h, s, v = hsv[..., 0:1], hsv[..., 1:2], hsv[..., 2:3]
    k = (np.array([5.0, 3.0, 1.0]) + h * 6) % 6
    return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)


def ref_brightness(x, c, rng):
    hsv = _rgb2hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return _hsv2rgb(hsv)


def ref_saturate(x, c, rng):
    hsv = _rgb2hsv(x)
    hsv[..., 1] = np.clip(hsv[..., 1] * c[0] + c[1], 0, 1)
    return _hsv2rgb(hsv)


def ref_contrast(x, c, rng):
    mean = x.mean((0, 1), keepdims=True)
    return (x - mean) * c + mean


def ref_elastic_transform(x, c, rng):
    alpha, sigma, offset = c
    h, w = x.shape[:2]
    centre, half = np.array([w // 2, h // 2], float), min(h, w) // 3
    pts1 = np.array([centre + half, [centre[0] + half, centre[1] - half], centre - half])
    pts2 = pts1 + rng.uniform(-offset, offset, size=pts1.shape)
    inv = np.linalg.solve(np.hstack([pts2, np.ones((3, 1))]), pts1)  # [x y 1] @ inv: output -> source
    matrix = np.array([[inv[1, 1], inv[0, 1]], [inv[1, 0], inv[0, 0]]])  # in (row, col) order
    x = np.stack([ndimage.affine_transform(x[..., i], matrix, offset=(inv[2, 1], inv[2, 0]), order=1,
                                           mode="mirror") for i in range(3)], -1)
    dx = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="reflect", truncate=3) * alpha
    dy = ndimage.gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma, mode="reflect", truncate=3) * alpha
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    coords = [yy + dy, xx + dx]
    return np.stack([ndimage.map_coordinates(x[..., i], coords, order=1, mode="reflect") for i in range(3)], -1)


def ref_pixelate(x, c, rng):
    h, w = x.shape[:2]
    im = Image.fromarray(np.uint8(x * 255)).resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX)
    return np.asarray(im) / 255.0


def ref_jpeg_compression(x, c, rng):
    buf = io.BytesIO()
    Image.fromarray(np.uint8(x * 255)).save(buf, "JPEG", quality=c)
    return np.asarray(Image.open(buf)) / 255.0


def ref_spatter(x, c, rng):
    loc, scale, sigma, threshold, intensity, mud = c
    liquid = ndimage.gaussian_filter(rng.normal(loc, scale, size=x.shape[:2]), sigma, mode="nearest")
    liquid[liquid < threshold] = 0
    if not mud:
        mask = liquid > 0
        edges = mask & ~ndimage.binary_erosion(mask, np.ones((3, 3)), border_value=1)
        dist = np.minimum(ndimage.distance_transform_edt(~edges), 20) if edges.any() else np.full(mask.shape, 20.0)
        dist = np.floor(ndimage.uniform_filter(dist, 3, mode="mirror"))
        hist = np.bincount(dist.astype(int).ravel(), minlength=256)
        cdf = hist.cumsum()
        first = hist[np.nonzero(hist)[0][0]]
        dist = np.round((cdf[dist.astype(int)] - first) * 255 / max(dist.size - first, 1))
        emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
        dist = ndimage.uniform_filter(np.clip(np.round(ndimage.correlate(dist, emboss, mode="mirror")), 0, 255), 3,
                                      mode="mirror")
        m = liquid * dist
        m = m / max(m.max(), 1e-12) * intensity
        return x + m[..., None] * np.array(WATER_RGB)
    m = ndimage.gaussian_filter((liquid > threshold).astype(float), intensity, mode="nearest")
    m[m < 0.8] = 0
    return x * (1 - m[..., None]) + np.array(MUD_RGB) * m[..., None]


REFERENCE = {name: globals()[f"ref_{name}"] for name in CORRUPTIONS}


# ------------------------------------------------------------------------------------------------ timing
def sample_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth coloured fields with edges and texture, uint8 NHWC (no dataset needed)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bicubic")
    x = (low.clamp(0, 1) * 0.8 + 0.1 + torch.rand(n, 3, size, size, generator=g) * 0.1).clamp(0, 1)
    return (x * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def time_torch(x: torch.Tensor, name: str, severity: int, batch: int, device: torch.device) -> float:
    """Images per second of tta.corrupt over x, in batches, on device (warm-up excluded)."""
    g = torch.Generator().manual_seed(0)
    corrupt(x[:batch].to(device), name, severity, generator=g)  # warm-up: caches, kernels, allocator
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(x), batch):
        corrupt(x[i:i + batch].to(device, non_blocking=True), name, severity, generator=g)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(x) / (time.perf_counter() - start)


def time_reference(images: np.ndarray, name: str, severity: int) -> float:
    """Images per second of the per-image reference."""
    rng = np.random.default_rng(0)
    fn, c = REFERENCE[name], PARAMS[name][severity - 1]
    fn(images[0] / 255.0, c, rng)  # warm-up, as on the torch side
    start = time.perf_counter()
    for im in images:
        np.clip(fn(im / 255.0, c, rng), 0, 1)
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=500, help="images timed on the torch side")
    p.add_argument("--n-ref", type=int, default=100, help="images timed on the reference side")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--severity", type=int, default=3)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the reference uses one)")
    p.add_argument("--corruptions", nargs="*", default=list(CORRUPTIONS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images = sample_images(max(args.n, args.n_ref), args.size)
    x = torch.from_numpy(images[:args.n]).permute(0, 3, 1, 2).float() / 255
    print(f"# {args.n} torch / {args.n_ref} reference images of {args.size}x{args.size}, severity {args.severity}, "
          f"device {device}, torch threads {args.threads}, torch {torch.__version__}")
    print(f"{'corruption':<18} {'torch img/s':>12} {'reference img/s':>16} {'ratio':>8}")
    ratios = []
    for name in args.corruptions:
        ours = time_torch(x, name, args.severity, args.batch, device)
        ref = time_reference(images[:args.n_ref], name, args.severity)
        ratios.append(ours / ref)
        print(f"{name:<18} {ours:>12.0f} {ref:>16.0f} {ours / ref:>7.1f}x", flush=True)
    print(f"{'geometric mean':<18} {'':>12} {'':>16} {math.exp(np.mean(np.log(ratios))):>7.1f}x")


if __name__ == "__main__":
    main()
