"""The corruption names of the CIFAR-10-C/ImageNet-C benchmarks and the severities, shared by the generator and
the loaders (this module imports nothing from ``tta.data``)."""

from __future__ import annotations

from collections.abc import Sequence

from tta.errors import ConfigError

BENCHMARK_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
EXTRA_CORRUPTIONS: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
ALL_CORRUPTIONS: tuple[str, ...] = BENCHMARK_CORRUPTIONS + EXTRA_CORRUPTIONS
SEVERITIES: tuple[int, ...] = (5, 4, 3, 2, 1)  # the Tent protocol's order



def check_selection(corruptions: Sequence[str], severities: Sequence[int]) -> None:
    """``ConfigError`` for unknown corruption names or severities outside 1..5."""
    unknown = [c for c in corruptions if c not in ALL_CORRUPTIONS]
    if unknown:
        raise ConfigError(f"unknown corruption(s) {', '.join(map(repr, unknown))}; valid names are: "
                          f"{', '.join(ALL_CORRUPTIONS)}")
    bad = [s for s in severities if not (isinstance(s, int) and 1 <= s <= 5)]
    if bad:
        raise ConfigError(f"severities must be integers from 1 to 5, got {', '.join(map(str, bad))}")
    if not corruptions or not severities:
        raise ConfigError("select at least one corruption and one severity")
