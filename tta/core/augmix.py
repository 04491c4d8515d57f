"""AugMix views of images (Hendrycks et al., ICLR 2020) as batched tensor operations, as MEMO uses them.

Each view: a random crop and horizontal flip of the image (``pad``: shift by up to 4 pixels with zero padding, the
CIFAR recipe; ``resized``: a random-resized crop back to the image's size, the ImageNet recipe), then three chains
of 1 to 3 operations drawn from autocontrast, equalize, posterize, rotate, solarize, shear x/y and translate x/y
(AugMix's set, which leaves out the operations that overlap the ImageNet-C corruptions), mixed with Dirichlet(1, 1, 1)
weights and blended with the cropped image by a Beta(1, 1) weight. Operation strengths follow AugMix's
``severity``: a level drawn uniformly from [0.1, severity] on a 0..10 scale. As PIL does, pixel values are kept on
the 8-bit grid after every operation, and geometric operations resample bilinearly with black outside the image.

Every random draw comes from the ``torch.Generator`` passed in (on the CPU; only the images live on their device),
so the views are reproducible.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F

Crop = Literal["pad", "resized"]
OPS = ("autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y", "translate_x",
       "translate_y")
WIDTH = 3  # chains mixed per view
MAX_DEPTH = 3  # operations per chain: uniform in 1..MAX_DEPTH
PAD = 4  # the CIFAR crop's padding


def content_seed(x: torch.Tensor, seed: int) -> int:
    """A 63-bit seed from ``seed`` and the image's values: the same image always gets the same views."""
    digest = hashlib.blake2b(x.detach().cpu().numpy().tobytes(), digest_size=8, key=seed.to_bytes(8, "little"))
    return int.from_bytes(digest.digest(), "little") >> 1


def check_view_settings(config: object) -> None:
    """Check the view settings that MEMO and TTAug share (``n_augmentations``, ``augmix_severity``, ``crop``,
    ``bn_alpha``, ``seed``) on a method's config; raises ``ValueError`` naming the setting."""
    from tta.core.validate import check_range

    n, seed = config.n_augmentations, config.seed  # type: ignore[attr-defined]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1024:
        raise ValueError(f"n_augmentations must be an integer in [1, 1024], got {n!r}")
    if config.crop not in ("pad", "resized"):  # type: ignore[attr-defined]
        raise ValueError(f"crop must be pad or resized, got {config.crop!r}")  # type: ignore[attr-defined]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**62:
        raise ValueError(f"seed must be an integer in [0, 2**62), got {seed!r}")
    check_range("augmix_severity", config.augmix_severity, low=0.1, high=10.0)  # type: ignore[attr-defined]
    check_range("bn_alpha", config.bn_alpha, low=0.0, high=1.0)  # type: ignore[attr-defined]


def seeded_views(x: torch.Tensor, config: object) -> torch.Tensor:
    """``config.n_augmentations`` AugMix views of ``x`` drawn from a generator seeded with ``config.seed`` and
    ``x``'s content (``content_seed``), so the views never depend on what came before."""
    cfg: Any = config
    generator = torch.Generator().manual_seed(content_seed(x, cfg.seed))
    return augmix_views(x, cfg.n_augmentations, generator, severity=cfg.augmix_severity, crop=cfg.crop)


def augmix_views(x: torch.Tensor, n_views: int, generator: torch.Generator, *, severity: float = 1.0,
                 crop: Crop = "pad") -> torch.Tensor:
    """``n_views`` AugMix views of each image of ``x`` (N, C, H, W) in [0, 1]: (N * n_views, C, H, W), image-major."""
    x = x.repeat_interleave(n_views, dim=0)
    n = x.shape[0]
    x = _to_grid(_random_crop(x, generator) if crop == "pad" else _random_resized_crop(x, generator))
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    weights = -torch.rand(n, WIDTH, generator=generator).log()  # Dirichlet(1, ..., 1) from exponentials
    weights = weights / weights.sum(1, keepdim=True)
    blend = torch.rand(n, generator=generator)  # Beta(1, 1)
    depth = torch.randint(1, MAX_DEPTH + 1, (n * WIDTH,), generator=generator)
    ops = torch.randint(0, len(OPS), (MAX_DEPTH, n * WIDTH), generator=generator)
    levels = 0.1 + (severity - 0.1) * torch.rand(MAX_DEPTH, n * WIDTH, generator=generator, dtype=torch.float64)
    signs = torch.where(torch.rand(MAX_DEPTH, n * WIDTH, generator=generator) < 0.5, -1.0, 1.0).double()
    chains = x.repeat_interleave(WIDTH, dim=0)
    for step in range(MAX_DEPTH):
        active = depth > step
        for k, name in enumerate(OPS):
            idx = torch.nonzero(active & (ops[step] == k)).flatten()
            if idx.numel():
                dev_idx = idx.to(x.device)
                out = _apply(name, chains[dev_idx], levels[step, idx], signs[step, idx])
                chains.index_copy_(0, dev_idx, out)
    mix = (chains.view(n, WIDTH, *x.shape[1:]) * weights.to(x)[:, :, None, None, None]).sum(1)
    b = blend.to(x)[:, None, None, None]
    return b * x + (1 - b) * mix


def _to_grid(x: torch.Tensor) -> torch.Tensor:
    """Round to the 8-bit grid, as an 8-bit image would store the result."""
    return (x * 255).round().clamp(0, 255) / 255


def _apply(name: str, x: torch.Tensor, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """One operation on a batch; ``level`` in [0.1, severity] and ``sign`` +-1 per image (CPU, float64)."""
    h, w = x.shape[-2:]
    if name == "autocontrast":
        return _autocontrast(x)
    if name == "equalize":
        return _equalize(x)
    if name == "posterize":
        shift = 2.0 ** (8 - (4 - (level * 4 / 10).floor()))  # keep 4 - int(level * 4 / 10) bits
        v = (x * 255).round()
        s = shift.to(x)[:, None, None, None]
        return (v / s).floor() * s / 255
    if name == "solarize":
        threshold = (256 - (level * 256 / 10).floor()).to(x)[:, None, None, None]
        v = (x * 255).round()
        return torch.where(v >= threshold, 255 - v, v) / 255
    a = torch.eye(2, dtype=torch.float64).repeat(x.shape[0], 1, 1)  # output -> input pixel coordinates
    t = torch.zeros(x.shape[0], 2, dtype=torch.float64)
    if name == "rotate":
        rad = -(level * 30 / 10).floor() * sign * math.pi / 180  # counter-clockwise by int degrees
        cos, sin = rad.cos(), rad.sin()
        a = torch.stack([torch.stack([cos, sin], 1), torch.stack([-sin, cos], 1)], 1)
        centre = torch.tensor([w / 2, h / 2], dtype=torch.float64)
        t = centre - (a @ centre)
    elif name == "shear_x":
        a[:, 0, 1] = level * 0.3 / 10 * sign
    elif name == "shear_y":
        a[:, 1, 0] = level * 0.3 / 10 * sign
    elif name == "translate_x":
        t[:, 0] = (level * w / 3 / 10).floor() * sign
    else:  # translate_y
        t[:, 1] = (level * h / 3 / 10).floor() * sign
    return _to_grid(_warp(x, a, t))


def _warp(x: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling at input = a @ output + t (continuous pixel coordinates), black outside the image."""
    h, w = x.shape[-2:]
    d = torch.tensor([w / 2, h / 2], dtype=torch.float64)
    m = a * d[None, None, :] / d[None, :, None]  # D^-1 a D, from normalised output to normalised input coordinates
    offset = (m @ torch.ones(2, dtype=torch.float64)) + t / d - 1
    theta = torch.cat([m, offset[:, :, None]], 2).to(x)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    """PIL's autocontrast: stretch each channel's 8-bit range to 0..255 (a constant channel stays as it is)."""
    v = (x * 255).round()
    lo = v.amin(dim=(2, 3), keepdim=True)
    hi = v.amax(dim=(2, 3), keepdim=True)
    scale = 255 / (hi - lo).clamp_min(1)
    return torch.where(hi > lo, (v * scale - lo * scale).floor().clamp(0, 255), v) / 255


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """PIL's histogram equalisation per channel, on the 8-bit grid."""
    n, c, h, w = x.shape
    v = (x * 255).round().long().clamp(0, 255).reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, v, torch.ones_like(v))
    last = 255 - (hist.flip(1) > 0).long().argmax(1)  # the highest value present
    step = (h * w - hist.gather(1, last[:, None]).squeeze(1)) // 255
    before = hist.cumsum(1) - hist  # pixels below each value
    safe = step.clamp_min(1)[:, None]
    lut = ((safe // 2 + before) // safe).clamp(max=255)
    lut = torch.where(step[:, None] > 0, lut, torch.arange(256, device=x.device).expand(n * c, 256))
    return (lut.gather(1, v).to(x) / 255).view(n, c, h, w)


def _random_crop(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift by up to ``PAD`` pixels each way with zero padding (a crop of the padded image), per image."""
    n, _, h, w = x.shape
    offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=generator).to(x.device)
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    rows = (offsets[:, 0, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (offsets[:, 1, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def _random_resized_crop(x: torch.Tensor, generator: torch.Generator, attempts: int = 10) -> torch.Tensor:
    """torchvision's RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, 10 tries then a centre crop) to the same size."""
    n, _, h, w = x.shape
    area = torch.empty(n, attempts, dtype=torch.float64).uniform_(0.08, 1.0, generator=generator) * h * w
    log_ratio = torch.empty(n, attempts, dtype=torch.float64).uniform_(math.log(3 / 4), math.log(4 / 3),
                                                                        generator=generator)
    ratio = log_ratio.exp()
    cw = (area * ratio).sqrt().round()
    ch = (area / ratio).sqrt().round()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.long().argmax(1)
    found = ok.any(1)
    # No valid try: the largest centred crop whose aspect ratio lies within 3/4-4/3.
    fw, fh = float(w), float(h)
    if w / h < 3 / 4:
        fh = float(round(w / (3 / 4)))
    elif w / h > 4 / 3:
        fw = float(round(h * 4 / 3))
    cw = torch.where(found, cw.gather(1, first[:, None]).squeeze(1), torch.tensor(fw, dtype=torch.float64))
    ch = torch.where(found, ch.gather(1, first[:, None]).squeeze(1), torch.tensor(fh, dtype=torch.float64))
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.where(found, (u[:, 0] * (h - ch + 1)).floor(), ((h - ch) / 2).floor())
    left = torch.where(found, (u[:, 1] * (w - cw + 1)).floor(), ((w - cw) / 2).floor())
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cw / w
    theta[:, 0, 2] = (2 * left + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * top + ch) / h - 1
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


__all__ = ["OPS", "Crop", "augmix_views"]
