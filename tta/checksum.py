"""Checksums of cached values (tensors inside lists, tuples and dicts), so a damaged cache is detected, not used."""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def value_digest(value: Any) -> str:
    """SHA-256 over ``value``'s structure and contents: tensors (dtype, shape, bytes), numbers, strings, ``None``,
    and lists, tuples and dicts of them (dict keys in sorted order)."""
    digest = hashlib.sha256()

    def feed(v: Any) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            digest.update(f"T|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, dict):
            digest.update(f"D{len(v)}|".encode())
            for k in sorted(v, key=repr):
                feed(k)
                feed(v[k])
        elif isinstance(v, (list, tuple)):
            digest.update(f"L{len(v)}|".encode())
            for item in v:
                feed(item)
        else:
            digest.update(f"V|{type(v).__name__}|{v!r}|".encode())

    feed(value)
    return digest.hexdigest()
