"""Source warm-up of converted normalisation layers: a registry of conversions and one training loop.

A pretrained network's BatchNorm layers are replaced (a *conversion*: ``afn``, ``proxy-norm``; see
``tta.warmup.registry`` and one module per conversion) and the result is fine-tuned on clean source data by the one
training loop of ``tta.warmup.train`` (``warmup``), which gives a self-describing checkpoint
(``tta.warmup.checkpoint``); ``tta.warmup.job`` is what ``tta warmup`` does (``run_warmup``). The conversions are
registered on import; the training loop's names are imported on first use, so that reading a checkpoint (the
``afn`` method) never loads the training loop.
"""

from __future__ import annotations

import importlib
from typing import Any

from tta.warmup import afn as _afn  # noqa: F401  (registers the conversion)
from tta.warmup import proxy_norm as _proxy_norm  # noqa: F401  (registers the conversion)
from tta.warmup.checkpoint import LEGACY_AFN_FORMAT, Warmup, apply_afn_checkpoint, load_afn_checkpoint
from tta.warmup.registry import CONVERSIONS, Conversion, get_conversion, register_conversion

_LAZY = {"LOSSES": "train", "SCHEDULES": "train", "Recipe": "train", "warmup": "train", "warmup_afn": "train",
         "WarmupJob": "job", "load_source": "job", "run_warmup": "job"}

__all__ = ["CONVERSIONS", "LEGACY_AFN_FORMAT", "Conversion", "Warmup", "apply_afn_checkpoint", "get_conversion",
           "load_afn_checkpoint", "register_conversion", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"tta.warmup.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tta.warmup' has no attribute {name!r}")
