"""The registry of warm-up conversions: what each one converts, what trains, and its defaults.

A conversion replaces a pretrained network's normalisation layers (``afn``, ``proxy-norm``) and is then fine-tuned
on clean source data by the one training loop (``tta.warmup.train``), which asks the conversion everything that
differs between them and never looks at its name. The registry imports none of its entries: ``tta.warmup`` imports
each conversion module up front, and a new one is a module that calls ``register_conversion``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tta.errors import ConfigError


def _accept(model: nn.Module) -> None:
    """Every model can be converted."""


@dataclass(frozen=True)
class Conversion:
    """One warm-up conversion.

    ``settings``: the conversion's settings and their defaults (stored in the checkpoint to rebuild the model);
    ``recipe``: its training defaults (``loss``, ``schedule``, ``epochs``); ``convert(model, settings)`` returns
    the converted model; ``trainable(model)`` the parameters that train (everything else is frozen);
    ``train_mode(model)`` puts a converted model in the mode it trains in; ``check(model)`` raises a
    ``ModelError`` for a model it cannot convert; ``calibrate(converted, base, images)``, when given, sets the
    converted layers' initial parameters from source images before training. ``adapt_with``: the ``tta adapt``
    options that adapt with the warmed-up checkpoint (``{source}``: the warm-up's clean source data).
    """

    name: str
    settings: Mapping[str, Any]
    recipe: Mapping[str, Any]
    convert: Callable[[nn.Module, dict[str, Any]], nn.Module]
    trainable: Callable[[nn.Module], list[nn.Parameter]]
    train_mode: Callable[[nn.Module], None]
    adapt_with: str = ""
    check: Callable[[nn.Module], None] = _accept
    calibrate: Callable[[nn.Module, nn.Module, torch.Tensor], object] | None = field(default=None)

    def resolve_settings(self, given: Mapping[str, Any] | None) -> dict[str, Any]:
        """The defaults updated with ``given``; ``ConfigError`` for a setting this conversion does not have."""
        unknown = sorted(set(given or {}) - set(self.settings))
        if unknown:
            raise ConfigError(f"unknown {self.name} warm-up setting(s) {', '.join(unknown)}; valid: "
                              f"{', '.join(self.settings)}")
        return {**self.settings, **(given or {})}


CONVERSIONS: dict[str, Conversion] = {}


def register_conversion(conversion: Conversion) -> Conversion:
    """Add ``conversion`` to the registry under its name (a name is registered once)."""
    if conversion.name in CONVERSIONS:
        raise ValueError(f"a warm-up conversion named {conversion.name!r} is already registered")
    CONVERSIONS[conversion.name] = conversion
    return conversion


def get_conversion(name: str) -> Conversion:
    """The registered conversion ``name``; ``ConfigError`` naming the choices otherwise."""
    if name not in CONVERSIONS:
        raise ConfigError(f"no source warm-up for method {name!r}; choose one of {', '.join(CONVERSIONS)}")
    return CONVERSIONS[name]
