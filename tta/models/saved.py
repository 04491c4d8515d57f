"""Self-describing model checkpoints: a converted (warmed-up) model that loads without knowing how it was made.

``tta warmup`` converts a pretrained model's normalisation layers (AFN, Proxy Normalization) and fine-tunes it. The
file it writes is a ``torch.save`` dict that says how to rebuild the network before loading its weights:

- ``format`` = ``tta.model``, ``version``;
- ``build``: the base architecture, ``{"arch": "resnet20", "num_classes": 10}`` for a CIFAR ResNet or
  ``{"name": ..., "dataset": ...}`` for a named model (robustbench, torchvision, timm; its pretrained weights are
  fetched like ``load_model`` does, then overwritten);
- ``method`` and ``settings``: the conversion applied to the base (``afn``, ``proxy-norm``) and its settings;
- ``state_dict``: every weight of the converted model; plus provenance (``base``, ``base_fingerprint``, ``warmup``,
  ``history``).

It holds only tensors and plain values, so it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tta.errors import ModelError

FORMAT = "tta.model"
VERSION = 1


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every state_dict entry's name, dtype, shape and bytes: equal iff the weights are identical."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def convert(method: str, model: nn.Module, settings: dict[str, Any]) -> nn.Module:
    """``model`` with the normalisation layers of ``method`` (``afn`` or ``proxy-norm``) built from ``settings``.

    AFN converts in place and returns ``model``; Proxy Normalization returns a converted copy.
    """
    if method == "afn":
        from tta.norm.afn import convert_to_afn

        convert_to_afn(model, lambda_init=settings["lambda_init"], identity_init=settings["identity_init"],
                       p_drop=settings["p_drop"])
        return model
    if method == "proxy-norm":
        from tta.norm.proxy_norm import convert_to_proxy_norm

        return convert_to_proxy_norm(model, norm=settings["norm"], groups=settings["groups"], eps=settings["eps"])
    raise ModelError(f"this tta cannot rebuild a model converted by {method!r}; use the tta version that wrote it")


def is_saved_model(ckpt: object) -> bool:
    """Whether a loaded checkpoint object is a self-describing model checkpoint."""
    return isinstance(ckpt, dict) and ckpt.get("format") == FORMAT


def build_saved_model(ckpt: dict[str, Any], path: str | Path, data_dir: str | Path = "data") -> nn.Module:
    """Rebuild the converted model a self-describing checkpoint describes and load its weights (eval mode)."""
    from tta.models.resnet_cifar import cifar_resnet
    from tta.models.zoo import CIFAR_RESNET_NORM, load_model, normalized

    if ckpt.get("version") != VERSION:
        raise ModelError(f"{str(path)!r} is a tta model checkpoint of version {ckpt.get('version')} and this tta "
                         f"reads version {VERSION}; warm up again with this version")
    build = ckpt.get("build") or {}
    if "arch" in build:
        base: nn.Module = normalized(cifar_resnet(build["arch"], build["num_classes"]), *CIFAR_RESNET_NORM)
    elif "name" in build:
        base = load_model(build["name"], dataset=build["dataset"], data_dir=data_dir)
    else:
        raise ModelError(f"{str(path)!r} does not say which architecture it holds; warm up again with this tta")
    model = convert(ckpt["method"], base.eval(), ckpt["settings"])
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise ModelError(f"the weights in {str(path)!r} do not fit the model it describes ({str(err)[:200]}); the "
                         "file is damaged or was edited, so warm up again") from None
    return model.eval()
