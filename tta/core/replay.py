"""Labelled clean source images replayed during adaptation (RMT's and GTTA's source replay)."""

from __future__ import annotations

import math

import torch


def replay_batch(images: torch.Tensor, labels: torch.Tensor, index: int, batch_size: int, seed: int,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``index``-th batch of the source stream: passes over ``images`` (uint8, N x C x H x W) and ``labels``,
    each pass in its own shuffled order (seeded by ``seed + 1 + pass``), cut into batches of ``batch_size``, a last
    single image joining the batch before it; the images come back as ``dtype`` in [0, 1]."""
    n = len(labels)
    per_pass = max(1, math.ceil(n / batch_size) - (1 if n % batch_size == 1 and n > batch_size else 0))
    epoch, k = divmod(index, per_pass)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1 + epoch))
    pick = order[k * batch_size:n if k == per_pass - 1 else (k + 1) * batch_size].to(labels.device)
    return images[pick].to(dtype).div(255), labels[pick]


__all__ = ["replay_batch"]
