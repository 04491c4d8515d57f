"""Corruptions at fractional severities: each corruption's parameters interpolated between its tabulated ones.

Between two tabulated severities ``a < s < a + 1`` every number of the parameters is interpolated linearly (a
number that is an integer at both ends, such as a blur radius or a JPEG quality, is rounded; zoom blur's list of
zoom factors runs up to the interpolated largest zoom). Below severity 1 the tables have no entry, so the image
is the clean one blended with its severity-1 corruption, in proportion ``s``; severity 0 is the clean image.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tta.corruptions import CORRUPTIONS, PARAMS, _check_images
from tta.corruptions._ops import Rng
from tta.corruptions.weather import frost
from tta.errors import InputError

MAX_SEVERITY = 5.0
_ZOOM_STOPS = (1.06, 1.11, 1.16, 1.21, 1.26)  # the zoom blur table's aranges run from 1 to these (step 0.01)


def _lerp(low: Any, high: Any, t: float) -> Any:
    if isinstance(low, tuple):
        return tuple(_lerp(a, b, t) for a, b in zip(low, high, strict=True))
    value = low + (high - low) * t
    both_int = isinstance(low, int) and isinstance(high, int)
    return round(value) if both_int else float(value)


def params_at(name: str, severity: float) -> Any:
    """The parameters of corruption ``name`` at a severity in [1, 5] (tabulated ones exactly as in the table)."""
    if name not in PARAMS:
        raise InputError(f"unknown corruption {name!r}; choose one of: {', '.join(PARAMS)}")
    if not 1.0 <= severity <= MAX_SEVERITY:
        raise InputError(f"params_at needs a severity in [1, 5], got {severity}")
    low = math.floor(severity)
    t = severity - low
    if t == 0:
        return PARAMS[name][low - 1]
    if name == "zoom_blur":
        stop = _lerp(_ZOOM_STOPS[low - 1], _ZOOM_STOPS[low], t)
        return tuple(float(z) for z in np.arange(1, stop, 0.01))
    return _lerp(PARAMS[name][low - 1], PARAMS[name][low], t)


def corrupt_at(
    images: torch.Tensor,
    name: str,
    severity: float,
    generator: torch.Generator | None = None,
    frost_images: str | Path | None = None,
) -> torch.Tensor:
    """Corrupt float images (N, 3, H, W) in [0, 1] with ``name`` at a severity in [0, 5] (see the module doc)."""
    if not (isinstance(severity, (int, float)) and 0.0 <= severity <= MAX_SEVERITY):
        raise InputError(f"severity must be a number in [0, 5], got {severity!r}")
    _check_images(images)
    if severity == 0:
        return images.clone()
    op = CORRUPTIONS.get(name)
    if op is None:
        raise InputError(f"unknown corruption {name!r}; choose one of: {', '.join(CORRUPTIONS)}")
    if name == "frost" and frost_images is not None:
        op = partial(frost, frost_images=str(frost_images))
    x = images.float()
    with torch.no_grad():
        out = op(x, params_at(name, max(severity, 1.0)), Rng(generator, x.device)).clamp_(0, 1)
        if severity < 1:
            out = torch.lerp(x, out, float(severity))
    return out.to(images.dtype)
