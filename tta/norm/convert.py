"""Swap normalisation layers in any model (the machinery every normalisation-based method shares)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

NORM_TYPES = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)


def batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm1d/2d/3d (and SyncBatchNorm) layer of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def replace_batchnorms(
    model: nn.Module, factory: Callable[[_BatchNorm], nn.Module], types: tuple[type, ...] = (_BatchNorm,)
) -> int:
    """Replace every layer of ``types`` inside ``model`` by ``factory(layer)``, in place; returns how many.

    The replacement is put on the layer's device and dtype. ``model`` itself is never replaced: wrap a bare
    normalisation layer in a container first.
    """
    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, types):
            new = factory(child)
            ref = child.weight if getattr(child, "weight", None) is not None else child.running_mean
            if ref is not None:
                new = new.to(device=ref.device, dtype=ref.dtype)
            setattr(model, name, new)
            count += 1
        else:
            count += replace_batchnorms(child, factory, types)
    return count
