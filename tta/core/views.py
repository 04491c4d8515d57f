"""Random views of an image batch for methods that compare a prediction with the prediction on another view.

Every function takes a batch ``(N, C, H, W)`` and returns a new one of the same shape; none changes its input.
Random draws come from the ``torch.Generator`` passed in, never from Python's or NumPy's generators. A method keeps
its generator's state as declared state (``new_rng_state`` / ``generator_from``), so that ``reset()`` and a
``state_dict()`` round trip replay the same draws, and ``torch.manual_seed`` before building the method makes a
whole run repeatable.

- ``color_affine_view``: the photometric and geometric view of the reference benchmark's test-time transform
  (ROID's consistency view): one colour jitter (brightness, contrast, saturation, hue, gamma in random order),
  reflect padding, a random rotation/translation/scale, centre crop and a horizontal flip, drawn once per batch
  (as the reference applies its transform to the whole batch tensor).
- ``patch_shuffle``: DeYO's view: each image cut into a ``grid x grid`` array of patches put back in a random order
  (its own order per image), which destroys the object shape but keeps every pixel value.
- ``pixel_shuffle``: every pixel position moved by one random permutation shared by the batch.
- ``occlude``: a square window replaced by each image's per-channel mean.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_SEED_HIGH = 2**62


def new_rng_state() -> torch.Tensor:
    """The state of a fresh CPU generator seeded from torch's global generator (``torch.manual_seed`` fixes it)."""
    seed = int(torch.randint(0, _SEED_HIGH, (1,)).item())
    return torch.Generator().manual_seed(seed).get_state()


@contextmanager
def generator_from(state: torch.Tensor) -> Iterator[torch.Generator]:
    """A CPU generator resumed from ``state``; on exit its new state is written back into ``state`` in place."""
    gen = torch.Generator()
    gen.set_state(state.detach().cpu())
    yield gen
    with torch.no_grad():
        state.copy_(gen.get_state().to(state.device))


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high, generator=gen).item())


def color_affine_view(
    x: torch.Tensor,
    gen: torch.Generator,
    *,
    brightness: tuple[float, float] = (0.6, 1.4),
    contrast: tuple[float, float] = (0.7, 1.3),
    saturation: tuple[float, float] = (0.5, 1.5),
    hue: tuple[float, float] = (-0.06, 0.06),
    gamma: tuple[float, float] = (0.7, 1.3),
    degrees: float = 15.0,
    translate: float = 1 / 16,
    scale: tuple[float, float] = (0.9, 1.1),
    flip_p: float = 0.5,
) -> torch.Tensor:
    """One random colour jitter + affine view of a batch of RGB images in [0, 1], the same draw for every image.

    As the reference transform: clip to [0, 1]; brightness, contrast, saturation, hue and gamma factors applied in
    a random order; reflect-pad by half the image size; rotate by U(-degrees, degrees), translate by a whole number
    of pixels up to ``translate`` of the padded size, scale by U(scale) (bilinear, zero fill); crop the centre back
    to the original size; flip horizontally with probability ``flip_p``; clip to [0, 1].
    """
    import torchvision.transforms.v2.functional as TF  # lazy: torchvision is only needed once a view is drawn
    from torchvision.transforms import InterpolationMode

    out = x.clamp(0.0, 1.0)
    for op in torch.randperm(5, generator=gen).tolist():
        if op == 0:
            out = TF.adjust_brightness(out, _uniform(gen, *brightness))
        elif op == 1:
            out = TF.adjust_contrast(out, _uniform(gen, *contrast))
        elif op == 2:
            out = TF.adjust_saturation(out, _uniform(gen, *saturation))
        elif op == 3:
            out = TF.adjust_hue(out, _uniform(gen, *hue))
        else:
            # Gamma of 0 is not differentiable and gives NaN after a contrast that reaches 0: keep it positive.
            out = TF.adjust_gamma(out.clamp(1e-8, 1.0), _uniform(gen, *gamma))
    h, w = x.shape[-2:]
    out = TF.pad(out, [w // 2, h // 2], padding_mode="reflect")
    ph, pw = out.shape[-2:]
    angle = _uniform(gen, -degrees, degrees)
    tx = round(_uniform(gen, -translate * pw, translate * pw))
    ty = round(_uniform(gen, -translate * ph, translate * ph))
    factor = _uniform(gen, *scale)
    out = TF.affine(out, angle=angle, translate=[tx, ty], scale=factor, shear=[0.0, 0.0],
                    interpolation=InterpolationMode.BILINEAR, fill=0.0)
    out = TF.center_crop(out, [h, w])
    if float(torch.rand(1, generator=gen).item()) < flip_p:
        out = out.flip(-1)
    return out.clamp(0.0, 1.0)


def patch_shuffle(x: torch.Tensor, grid: int, gen: torch.Generator) -> torch.Tensor:
    """Cut each image into ``grid x grid`` patches and reassemble them in a random order of its own.

    An image whose sides are not multiples of ``grid`` is resized to the nearest smaller multiples first and back
    afterwards (bilinear, antialiased), as the reference does.
    """
    import torchvision.transforms.v2.functional as TF  # lazy: torchvision is only needed once a view is drawn

    n, c, h, w = x.shape
    side = (h // grid) * grid, (w // grid) * grid
    out = x if side == (h, w) else TF.resize(x, list(side), antialias=True)
    ph, pw = side[0] // grid, side[1] // grid
    patches = out.reshape(n, c, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, c, ph, pw)
    order = torch.argsort(torch.rand(n, grid * grid, generator=gen), dim=1).to(x.device)
    patches = patches[torch.arange(n, device=x.device).unsqueeze(1), order]
    out = patches.reshape(n, grid, grid, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, *side)
    return out if side == (h, w) else TF.resize(out, [h, w], antialias=True)


def pixel_shuffle(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Move every pixel (all channels together) by one random permutation of the positions, shared by the batch."""
    n, c, h, w = x.shape
    order = torch.randperm(h * w, generator=gen).to(x.device)
    return x.reshape(n, c, h * w)[:, :, order].reshape(n, c, h, w)


def occlude(x: torch.Tensor, size: int, row: int, column: int) -> torch.Tensor:
    """Replace the window ``[row, row + size) x [column, column + size)`` (clipped to the image) by each image's
    per-channel mean; a window outside the image leaves the batch unchanged."""
    out = x.clone()
    mean = x.mean(dim=(2, 3), keepdim=True)
    window = out[:, :, row:row + size, column:column + size]
    window.copy_(mean.expand_as(window))
    return out


__all__ = ["color_affine_view", "generator_from", "new_rng_state", "occlude", "patch_shuffle", "pixel_shuffle"]
