"""Swap normalisation layers in any model (the machinery every normalisation-based method shares)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

NORM_TYPES = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)


class Float64State(nn.Module):
    """Keeps float64 buffers (exact pooled statistics) float64 through ``.to(dtype)``/``.float()``/``.half()``.

    Pooled sums over millions of activations lose precision in float32; a model cast to another dtype must not
    silently cast them too. Device moves apply as usual.
    """

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        wide = [name for name, b in self._buffers.items() if b is not None and b.dtype == torch.float64]
        super()._apply(fn, recurse)
        for name in wide:
            self._buffers[name] = self._buffers[name].to(torch.float64)
        return self


def batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm1d/2d/3d (and SyncBatchNorm) layer of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def replace_batchnorms(
    model: nn.Module, factory: Callable[[_BatchNorm], nn.Module], types: tuple[type, ...] = (_BatchNorm,)
) -> int:
    """Replace every layer of ``types`` inside ``model`` by ``factory(layer)``, in place; returns how many.

    The replacement is put on the layer's device (its dtypes are the factory's business). ``model`` itself is never
    replaced: wrap a bare normalisation layer in a container first.
    """
    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, types):
            new = factory(child)
            ref = child.weight if getattr(child, "weight", None) is not None else child.running_mean
            if ref is not None:
                new = new.to(device=ref.device)
            setattr(model, name, new)
            count += 1
        else:
            count += replace_batchnorms(child, factory, types)
    return count
