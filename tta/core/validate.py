"""Range checks for settings: NaN, inf and out-of-range values are errors that name the valid range."""

from __future__ import annotations

import math


def check_range(
    name: str, value: float, *, low: float | None = None, high: float | None = None,
    low_open: bool = False, high_open: bool = False, allow_inf: bool = False,
) -> None:
    """``ValueError`` naming the valid range unless ``low <= value <= high`` (open ends with ``*_open``).

    NaN is always rejected; +inf only with ``allow_inf`` (e.g. a source pseudo-count meaning "source only").
    """
    if math.isnan(value) or (math.isinf(value) and not (allow_inf and value > 0)):
        raise ValueError(f"{name} must be a {'number' if allow_inf else 'finite number'}, got {value}")
    lo = "" if low is None else f"{'(' if low_open else '['}{low}"
    hi = "" if high is None else f"{high}{')' if high_open else ']'}"
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and (value >= high if high_open else value > high))
    if bad:
        if low is not None and high is not None:
            where = f"in {lo}, {hi}"
        elif low is not None:
            where = f"{'>' if low_open else '>='} {low}"
        else:
            where = f"{'<' if high_open else '<='} {high}"
        raise ValueError(f"{name} must be {where}, got {value}")
