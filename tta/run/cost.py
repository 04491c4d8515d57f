"""What a method costs: counted passes, timings relative to plain inference, and peak memory.

Counted quantities are the same on every machine. A *forward pass* is one image through a classifier: every call of
a linear layer with one output per class (the model's head, a teacher's, an anchor's, a guard's source model's)
counts the rows it returns; a *backward pass* is one image's gradient reaching such a head (a tensor hook on its
output). Per image of the stream, ``forward_passes`` is 1 for plain inference, 2 for a method that also predicts
with a teacher, 1 + the number of augmentations for MEMO; ``backward_passes`` 1 for Tent, 2 for SAR's two-step
update.

``counted_cost`` weighs a backward pass as two forward passes, the standard estimate of its arithmetic (the
gradients with respect to the activations and to the weights each cost about one forward pass), so Tent costs 3
times plain inference and SAR (two forward and two backward passes) 6. ``time_relative_cost`` is the method's
measured time over the time of the source model's forward on the same batches, in the same run (the
``reference``), so it depends on the machine.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

BACKWARD_WEIGHT = 2.0  # a backward pass costs about two forward passes (activation and weight gradients)
# timed columns: ``seconds`` (the method), ``reference_seconds`` (the source forward), ``time_relative_cost``
COST_COLUMNS: list[str] = ["forward_passes", "backward_passes", "relative_cost", "reference_seconds",
                           "time_relative_cost", "peak_memory_mb"]


def counted_cost(forward_rows: float, backward_rows: float, images: float) -> float:
    """Cost relative to one forward pass per image: (forward + 2 backward) / images (0 images: NaN)."""
    if images <= 0:
        return float("nan")
    return (forward_rows + BACKWARD_WEIGHT * backward_rows) / images


def heads(module: nn.Module, num_classes: int | None) -> list[nn.Module]:
    """The classifier heads inside ``module`` and the models its guard holds (``tta.monitor``: the source model it
    predicts with): linear layers with ``num_classes`` outputs (else ``module`` itself)."""
    guard = getattr(module, "guard", None)
    roots = [module, *(v for v in vars(guard).values() if isinstance(v, nn.Module))] if guard is not None else [module]
    found: dict[int, nn.Module] = {}
    for root in roots:
        for m in root.modules():
            if isinstance(m, nn.Linear) and m.out_features == num_classes:
                found.setdefault(id(m), m)
    return list(found.values()) or [module]


class PassCounter:
    """Counts the forward and backward rows through the classifier heads of a model (see the module doc).

    ``with counter.attached(model):`` hooks it for the duration; ``forward`` and ``backward`` are running totals.
    """

    def __init__(self) -> None:
        self.forward = 0
        self.backward = 0

    def _on_forward(self, _: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not isinstance(output, torch.Tensor) or output.ndim == 0:
            return
        rows = int(output.reshape(-1, output.shape[-1]).shape[0]) if output.ndim > 1 else 1
        self.forward += rows
        if output.requires_grad:
            output.register_hook(self._on_backward)

    def _on_backward(self, grad: torch.Tensor) -> None:
        self.backward += int(grad.reshape(-1, grad.shape[-1]).shape[0]) if grad.ndim > 1 else 1

    @contextmanager
    def attached(self, model: nn.Module, num_classes: int | None = None) -> Iterator[PassCounter]:
        """Hook the heads of ``model`` (``num_classes`` outputs; by default its ``num_classes`` attribute)."""
        n = num_classes if num_classes is not None else getattr(model, "num_classes", None)
        handles = [m.register_forward_hook(self._on_forward) for m in heads(model, n)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def peak_memory_mb(device: torch.device) -> float:
    """The peak memory so far: CUDA's max allocated on a GPU, else the process's peak resident set size, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def reset_peak_memory(device: torch.device) -> None:
    """Start CUDA's peak count afresh (the process's peak RSS cannot be reset: it is the peak so far)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def cost_row(forward: int, backward: int, images: int, seconds: float, reference_seconds: float,
             device: torch.device) -> dict[str, float]:
    """The cost columns of one result row (``COST_COLUMNS``)."""
    per = (lambda v: v / images) if images else (lambda v: float("nan"))
    return {"forward_passes": per(forward), "backward_passes": per(backward),
            "relative_cost": counted_cost(forward, backward, images), "reference_seconds": reference_seconds,
            "time_relative_cost": seconds / reference_seconds if reference_seconds > 0 else float("nan"),
            "peak_memory_mb": peak_memory_mb(device)}
