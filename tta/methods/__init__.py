"""Built-in adaptation methods, one file each; importing this package registers them all."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tta.methods import (  # noqa: F401  (registers them)
    adabn,
    adacontrast,
    afn,
    cmf,
    context_norm,
    cora,
    cotta,
    deyo,
    dsbn,
    eata,
    eta,
    foa,
    gtta,
    lame,
    memo,
    petta,
    rdumb,
    rmt,
    roid,
    rotta,
    rpl,
    santa,
    sar,
    shot_im,
    source,
    stream_stats,
    tent,
    tribe,
    ttaug,
    unmix_tns,
)
from tta.registry import METHODS

if TYPE_CHECKING:
    from tta.core.base import AdaptedModel


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    return METHODS.names()


def get_method(name: str) -> type[AdaptedModel]:
    """The class registered under ``name``; a ``ConfigError`` naming the valid choices otherwise."""
    return METHODS.get(name)


def describe(name: str) -> str:
    """The one-line description of a method (the first line of its class docstring)."""
    doc = (get_method(name).__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""


__all__ = ["describe", "get_method", "list_methods"]
