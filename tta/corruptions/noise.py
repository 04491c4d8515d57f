"""Noise corruptions: gaussian, shot (Poisson), impulse (salt and pepper) and speckle noise."""

from __future__ import annotations

import torch

from tta.corruptions._ops import Rng


def gaussian_noise(x: torch.Tensor, c: float, rng: Rng) -> torch.Tensor:
    """x + N(0, c^2), independently per value."""
    return x + rng.normal(*x.shape, std=c)


def shot_noise(x: torch.Tensor, c: float, rng: Rng) -> torch.Tensor:
    """Poisson(x c) / c: photon noise with c photons at full intensity."""
    return rng.poisson(x * c) / c


def impulse_noise(x: torch.Tensor, c: float, rng: Rng) -> torch.Tensor:
    """Salt and pepper on a fraction c of the values (per channel value), half set to 0 and half to 1."""
    u = rng.uniform(*x.shape)
    return x.masked_fill(u < c, 1.0).masked_fill(u < c / 2, 0.0)


def speckle_noise(x: torch.Tensor, c: float, rng: Rng) -> torch.Tensor:
    """x + x N(0, c^2): multiplicative noise."""
    return x + x * rng.normal(*x.shape, std=c)
