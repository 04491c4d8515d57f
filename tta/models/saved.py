"""Self-describing model checkpoints: a converted (warmed-up) model that loads without knowing how it was made.

``tta warmup`` converts a pretrained model's normalisation layers (AFN, Proxy Normalization) and fine-tunes it. The
file it writes is a ``torch.save`` dict that says how to rebuild the network before loading its weights:

- ``format`` = ``tta.model``, ``version``;
- ``build``: the base architecture, ``{"arch": "resnet20", "num_classes": 10}`` for a CIFAR ResNet or
  ``{"name": ..., "dataset": ...}`` for a named model (robustbench, torchvision, timm; its pretrained weights are
  fetched like ``load_model`` does, then overwritten; a ``timm:`` name may add ``"pretrained": False`` and
  ``model_kwargs``, e.g. a small ViT trained from scratch);
- ``method`` and ``settings``: the conversion applied to the base (``afn``, ``proxy-norm``; None for none) and its
  settings;
- ``state_dict``: every weight of the converted model; plus provenance (``base``, ``base_fingerprint``, ``warmup``,
  ``history``).

It holds only tensors and plain values, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tta.errors import ModelError
from tta.models.fingerprint import model_fingerprint  # noqa: F401  (part of the checkpoint format)

FORMAT = "tta.model"
VERSION = 1


def convert(method: str, model: nn.Module, settings: dict[str, Any]) -> nn.Module:
    """``model`` with the normalisation layers of the warm-up conversion ``method`` (``tta.warmup.registry``: ``afn``,
    ``proxy-norm``) built from ``settings``; AFN converts in place, Proxy Normalization returns a converted copy."""
    from tta.warmup.registry import CONVERSIONS

    if method not in CONVERSIONS:
        raise ModelError(f"this tta cannot rebuild a model converted by {method!r}; use the tta version that wrote it")
    return CONVERSIONS[method].convert(model, settings)


def is_saved_model(ckpt: object) -> bool:
    """Whether a loaded checkpoint object is a self-describing model checkpoint."""
    return isinstance(ckpt, dict) and ckpt.get("format") == FORMAT
