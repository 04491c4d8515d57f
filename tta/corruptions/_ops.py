"""Batched building blocks shared by the corruptions: seeded draws, padding, filters, zoom, HSV, motion blur, plasma.

Every function works on float tensors of shape (..., H, W) or (N, C, H, W) on any device.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F


class Rng:
    """Random draws from one ``torch.Generator``, made on the generator's device and moved to ``device``.

    Drawing on the generator's device (the CPU unless the caller passes a CUDA generator) makes a seeded CPU
    generator give the same corruption on every device.
    """

    def __init__(self, generator: torch.Generator | None, device: torch.device) -> None:
        self.generator = generator if generator is not None else torch.default_generator
        self.source = self.generator.device
        self.device = device

    def uniform(self, *shape: int, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        """Uniform draws in [low, high)."""
        u = torch.rand(shape, generator=self.generator, device=self.source)
        if (low, high) != (0.0, 1.0):
            u = u.mul_(high - low).add_(low)
        return u.to(self.device)

    def normal(self, *shape: int, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
        """Normal draws N(mean, std^2)."""
        z = torch.randn(shape, generator=self.generator, device=self.source)
        if (mean, std) != (0.0, 1.0):
            z = z.mul_(std).add_(mean)
        return z.to(self.device)

    def integers(self, low: int, high: int, *shape: int) -> torch.Tensor:
        """Uniform integers in [low, high)."""
        return torch.randint(low, high, shape, generator=self.generator, device=self.source).to(self.device)

    def poisson(self, rates: torch.Tensor) -> torch.Tensor:
        """Poisson draws with the given rates (float, on ``device``); see ``poisson``."""
        return poisson(rates, self)


def _ptrs(lam: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One attempt of Hoermann's PTRS for rates >= 10 (u uniform in [-0.5, 0.5), v in [0, 1)): (k, accepted)."""
    b = 0.931 + 2.53 * lam.sqrt()
    a = -0.059 + 0.02483 * b
    us = 0.5 - u.abs()
    k = torch.floor((2 * a / us + b) * u + lam + 0.43)
    quick = (us >= 0.07) & (v <= 0.9277 - 3.6224 / (b - 2))
    reject = (k < 0) | ((us < 0.013) & (v > us))
    log_ratio = torch.log(v) + torch.log(1.1239 + 1.1328 / (b - 3.4)) - torch.log(a / (us * us) + b)
    exact = log_ratio <= -lam + k * lam.log() - torch.lgamma(k + 1)
    return k, quick | (~reject & exact)


def poisson(rates: torch.Tensor, rng: Rng) -> torch.Tensor:
    """Exact Poisson draws from uniforms, vectorised (``torch.poisson`` samples one value at a time on CPU).

    Rates below 10 use inversion (one uniform each); larger rates use Hoermann's transformed rejection (PTRS, as
    numpy does): one attempt for every value, of which ~90% pass its cheap squeeze test; values not accepted get
    further attempts (in double precision), so a few small rounds finish them.
    """
    lam = rates.reshape(-1).float()
    n = lam.numel()
    # first attempt for every value at once, in float32 and in place (this is the hot loop): the squeeze test only
    b = lam.sqrt().mul_(2.53).add_(0.931)
    u = rng.uniform(n).sub_(0.5)
    v = rng.uniform(n)
    us = u.abs().neg_().add_(0.5)
    out = b.mul(0.04966).sub_(0.118).div_(us).add_(b).mul_(u).add_(lam).add_(0.43).floor_()  # 2a = 0.04966 b - 0.118
    done = us.ge(0.07).logical_and_(torch.le(v, b.sub_(2).reciprocal_().mul_(-3.6224).add_(0.9277)))
    small = lam < 10
    todo = torch.nonzero(done.logical_or_(small).logical_not_()).flatten()
    if len(todo):  # the rest of the first attempt, in double precision
        k, ok = _ptrs(lam[todo].double(), u[todo].double(), v[todo].double())
        out[todo[ok]] = k[ok].float()
        todo = todo[~ok]
    while len(todo):
        k, ok = _ptrs(lam[todo].double(), rng.uniform(len(todo)).double() - 0.5, rng.uniform(len(todo)).double())
        out[todo[ok]] = k[ok].float()
        todo = todo[~ok]
    idx = torch.nonzero(small).flatten()
    if len(idx):
        ls = lam[idx].double()
        u = rng.uniform(len(idx)).double()
        pmf = torch.exp(-ls)
        cdf, k = pmf.clone(), torch.zeros_like(ls)
        for i in range(1, 64):  # P(X >= 64) < 1e-30 for rates below 10
            above = u > cdf
            if not bool(above.any()):
                break
            k += above
            pmf = pmf * ls / i
            cdf += pmf
        out[idx] = k.float()
    return out.view_as(rates).to(rates.dtype)


def pad_index(n: int, before: int, after: int, mode: str, device: torch.device) -> torch.Tensor:
    """Source indices of a padded axis of length ``n``: ``nearest`` (aaa|abcd|ddd), ``reflect`` (scipy's
    half-sample symmetric, cba|abcd|dcb) or ``mirror`` (OpenCV's default reflect-101, dcb|abcd|cba)."""
    i = torch.arange(-before, n + after, device=device)
    if mode == "nearest" or n == 1:
        return i.clamp(0, n - 1)
    if mode == "reflect":
        i = i % (2 * n)
        return torch.where(i >= n, 2 * n - 1 - i, i)
    if mode == "mirror":
        i = i % (2 * n - 2)
        return torch.where(i >= n, 2 * n - 2 - i, i)
    raise ValueError(f"unknown padding mode {mode!r}")


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """scipy's normalised 1-D Gaussian kernel (radius ``int(truncate * sigma + 0.5)``)."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).float()


def filter2d(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Correlate every (H, W) plane of ``x`` with one odd-sized 2-D ``kernel``, borders padded by ``mode``.

    A weighted sum of shifted views, one per non-zero tap: for the small kernels here this is several times faster
    than a single-channel ``conv2d`` on CPU, and as fast on GPU.
    """
    kh, kw = kernel.shape
    h, w = x.shape[-2:]
    rows = pad_index(h, kh // 2, kh // 2, mode, x.device)
    cols = pad_index(w, kw // 2, kw // 2, mode, x.device)
    padded = x.index_select(-2, rows).index_select(-1, cols)
    out = torch.zeros_like(x)
    for (i, j), weight in zip(torch.nonzero(kernel).tolist(), kernel[kernel != 0].tolist(), strict=True):
        out.add_(padded[..., i:i + h, j:j + w], alpha=weight)
    return out


@lru_cache(maxsize=128)
def _filter_matrix(n: int, kernel: tuple[float, ...], mode: str) -> torch.Tensor:
    """(n, n) matrix of correlating a length-n axis with ``kernel``, its borders padded by ``mode``."""
    r = len(kernel) // 2
    src = pad_index(n, r, r, mode, torch.device("cpu"))
    m = torch.zeros(n, n, dtype=torch.float64)
    for k, weight in enumerate(kernel):
        m.index_put_((torch.arange(n), src[k:k + n]), torch.full((n,), weight, dtype=torch.float64), accumulate=True)
    return m.float()


def separable_filter(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Filter every (H, W) plane with the same 1-D ``kernel`` along rows and columns.

    Both passes, borders included, are one (H, H) and one (W, W) matrix product: on 32x32 images a batched matmul
    is faster than summing shifted copies and much faster than a single-channel ``conv2d``.
    """
    taps = tuple(kernel.tolist())
    rows = _filter_matrix(x.shape[-2], taps, mode).to(x.device, x.dtype)
    cols = _filter_matrix(x.shape[-1], taps, mode).to(x.device, x.dtype)
    return rows @ x @ cols.T


def gaussian_filter(x: torch.Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> torch.Tensor:
    """skimage/scipy ``gaussian`` of every (H, W) plane (skimage's default border is ``nearest``)."""
    return separable_filter(x, gaussian_kernel1d(sigma, truncate), mode)


def box_blur3(x: torch.Tensor) -> torch.Tensor:
    """OpenCV ``blur(x, (3, 3))``: the 3x3 mean with reflect-101 borders."""
    return separable_filter(x, torch.full((3,), 1 / 3), "mirror")


def clipped_zoom(x: torch.Tensor, zoom: float) -> torch.Tensor:
    """Zoom into the centre of (..., H, W) planes by ``zoom`` (crop ceil(H/z), bilinear back up, trim to H x W).

    The bilinear resize uses corner-aligned sampling, as scipy's ``zoom(order=1)`` of the original generator.
    """
    h, w = x.shape[-2:]
    ch, cw = math.ceil(h / zoom), math.ceil(w / zoom)
    top, left = (h - ch) // 2, (w - cw) // 2
    crop = x[..., top:top + ch, left:left + cw]
    oh, ow = round(ch * zoom), round(cw * zoom)
    if (oh, ow) == (ch, cw):
        out = crop
    else:
        lead = crop.shape[:-2]
        out = F.interpolate(crop.reshape(-1, 1, ch, cw), size=(oh, ow), mode="bilinear", align_corners=True)
        out = out.reshape(*lead, oh, ow)
    trim_h, trim_w = (oh - h) // 2, (ow - w) // 2
    return out[..., trim_h:trim_h + h, trim_w:trim_w + w]


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] to HSV in [0, 1] (hue as a fraction of a turn), as skimage's ``rgb2hsv``."""
    r, g, b = x.unbind(1)
    v, _ = x.max(1)
    delta = v - x.min(1).values
    s = torch.where(v > 0, delta / v.clamp_min(1e-12), torch.zeros_like(v))
    d = delta.clamp_min(1e-12)
    h = torch.where(v == r, (g - b) / d, torch.where(v == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack((h, s, v), 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of ``rgb_to_hsv``."""
    h, s, v = hsv.unbind(1)
    k = torch.tensor([5.0, 3.0, 1.0], device=hsv.device, dtype=hsv.dtype).view(1, 3, 1, 1)
    k = (k + h.unsqueeze(1) * 6.0) % 6.0
    return v.unsqueeze(1) - (v * s).unsqueeze(1) * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def motion_blur(x: torch.Tensor, radius: int, sigma: float, angle: torch.Tensor) -> torch.Tensor:
    """Motion blur of (N, C, H, W) with one angle (degrees) per image: a one-sided Gaussian-weighted trail.

    Output = sum_i k_i x(p - round(i (sin a, cos a))) with edge replication, the ImageMagick-style kernel of the
    published generator (as ported to numpy by ``imagecorruptions``); shifts stop once they leave the image.
    """
    n, _, h, w = x.shape
    width = 2 * radius + 1
    k = torch.exp(-torch.arange(width, dtype=torch.float64) ** 2 / (2 * sigma**2))
    k = (k / k.sum()).float().tolist()
    rad = torch.deg2rad(angle.double())
    sin, cos = torch.sin(rad), torch.cos(rad)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    out = torch.zeros_like(x)
    alive = torch.ones(n, dtype=torch.bool, device=x.device)
    for i in range(width):
        dy = -torch.ceil(i * sin - 0.5).long().to(x.device)
        dx = -torch.ceil(i * cos - 0.5).long().to(x.device)
        alive &= (dy.abs() < h) & (dx.abs() < w)
        ry = (rows[None, :] - dy[:, None]).clamp(0, h - 1)  # (N, H)
        cx = (cols[None, :] - dx[:, None]).clamp(0, w - 1)  # (N, W)
        shifted = x.gather(2, ry[:, None, :, None].expand(x.shape)).gather(3, cx[:, None, None, :].expand(x.shape))
        out += shifted * (k[i] * alive.to(x.dtype)).view(n, 1, 1, 1)
    return out


def plasma_fractal(rng: Rng, n: int, size: int, decay: float) -> torch.Tensor:
    """(n, size', size') diamond-square plasma in [0, 1] (size' = next power of two >= size), as in the paper.

    Each new point is the mean of its four parents plus ``wibble * uniform(-wibble, wibble)``; the wibble starts at
    100 and is divided by ``decay`` at every level.
    """
    m = 1 << max(1, (size - 1).bit_length())
    a = torch.zeros(n, m, m, device=rng.device)
    step, wibble = m, 100.0
    while step >= 2:
        half = step // 2
        corners = a[:, 0:m:step, 0:m:step]
        sq = corners + corners.roll(-1, 1)
        sq = sq + sq.roll(-1, 2)
        a[:, half:m:step, half:m:step] = sq / 4 + wibble * rng.uniform(*sq.shape, low=-wibble, high=wibble)
        dr = a[:, half:m:step, half:m:step]
        ul = a[:, 0:m:step, 0:m:step]
        lt = dr + dr.roll(1, 1) + ul + ul.roll(-1, 2)
        a[:, 0:m:step, half:m:step] = lt / 4 + wibble * rng.uniform(*lt.shape, low=-wibble, high=wibble)
        tt = dr + dr.roll(1, 2) + ul + ul.roll(-1, 1)
        a[:, half:m:step, 0:m:step] = tt / 4 + wibble * rng.uniform(*tt.shape, low=-wibble, high=wibble)
        step, wibble = half, wibble / decay
    a = a - a.amin((1, 2), keepdim=True)
    return a / a.amax((1, 2), keepdim=True).clamp_min(1e-12)


@lru_cache(maxsize=64)
def pil_box_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """(out, in) matrix of PIL's ``BOX`` resampling along one axis (its ``precompute_coeffs``, in float)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 0.5 * filterscale
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        for j in range(lo, hi):
            t = (j - center + 0.5) / filterscale
            if -0.5 < t <= 0.5:
                m[xx, j] = 1.0
        m[xx] /= m[xx].sum().clamp_min(1e-12)
    return m.float()
