"""Update rules beyond a plain gradient step: SAM's ascent to the worst nearby weights and back.

Sharpness-aware minimisation (Foret et al. 2021), as SAR uses it: after the first backward, move every parameter
by ``rho * g / ||g||`` (the global L2 norm of all gradients), take the loss's gradient there, return to the
original weights and let the base optimizer step with that gradient.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def sam_perturb(params: list[nn.Parameter], rho: float) -> list[torch.Tensor | None]:
    """Move ``params`` up their gradient by ``rho`` in global L2 norm; returns the originals for ``sam_restore``."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return [None] * len(params)
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)), 2)
    scale = rho / (norm + 1e-12)
    originals: list[torch.Tensor | None] = []
    for p in params:
        if p.grad is None:
            originals.append(None)
            continue
        originals.append(p.detach().clone())
        p.add_(p.grad * scale.to(p))
    return originals


@torch.no_grad()
def sam_restore(params: list[nn.Parameter], originals: list[torch.Tensor | None]) -> None:
    """Put back the weights ``sam_perturb`` moved away from (exactly, not by subtracting the move)."""
    for p, original in zip(params, originals, strict=True):
        if original is not None:
            p.copy_(original)
