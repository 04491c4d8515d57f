"""Label-free signals of a batch of predictions, and their moving averages.

All entropies are divided by ``ln(C)`` (C classes), so 0 is a one-hot prediction and 1 the uniform one:

- ``entropy``: mean per-sample entropy (low: confident);
- ``confidence``: mean maximum softmax probability;
- ``marginal_entropy``: entropy of the batch's mean prediction (low: every sample is put in the same few classes,
  the signature of a collapsing adaptation);
- ``agreement``: fraction of samples whose class equals the frozen source model's (when one is kept);
- ``estimated_accuracy``: the ATC estimate, the fraction of samples whose confidence exceeds the threshold
  calibrated on clean source data (see ``tta.monitor.calibrate``).

A guard adds its own (``tta.monitor.guard``): the source model's signals on the subsample it reads
(``source_*``), ``estimated_loss`` (source minus adapted ATC estimate, paired, averaged over recent batches) with
its standard error, and ``source_range`` (the source model's marginal entropy relative to clean data).
"""

from __future__ import annotations

import math

import torch

SIGNALS: tuple[str, ...] = ("entropy", "confidence", "marginal_entropy", "agreement", "estimated_accuracy")


def batch_signals(
    logits: torch.Tensor, source_logits: torch.Tensor | None = None, threshold: float | None = None
) -> dict[str, torch.Tensor]:
    """The signals of one batch of ``logits`` (N, C), as 0-d tensors on the logits' device (no synchronisation).

    ``agreement`` needs ``source_logits``; ``estimated_accuracy`` needs the ATC ``threshold``.
    """
    logits = logits.detach().float()
    norm = _norm(logits.shape[1])
    log_p = logits.log_softmax(1)
    p = log_p.exp()
    conf = p.amax(1)
    out = {
        "entropy": -(p * log_p).sum(1).mean() / norm,
        "confidence": conf.mean(),
        "marginal_entropy": _entropy_of_mean(p, norm),
    }
    if source_logits is not None:
        out["agreement"] = (logits.argmax(1) == source_logits.argmax(1)).float().mean()
    if threshold is not None:
        out["estimated_accuracy"] = (conf > threshold).float().mean()
    return out


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``batch_signals``' ``marginal_entropy`` alone: the entropy of the batch's mean prediction over log(C)."""
    logits = logits.detach().float()
    return _entropy_of_mean(logits.log_softmax(1).exp(), _norm(logits.shape[1]))


def _norm(n_classes: int) -> float:
    return math.log(n_classes) if n_classes > 1 else 1.0


def _entropy_of_mean(p: torch.Tensor, norm: float) -> torch.Tensor:
    mean_p = p.mean(0)
    return -(mean_p * mean_p.clamp_min(1e-12).log()).sum() / norm


class MovingAverage:
    """Exponential moving averages of named values: ``avg = decay * avg + (1 - decay) * value``."""

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self.values: dict[str, float] = {}

    def update(self, values: dict[str, float]) -> dict[str, float]:
        """Fold in one batch's values (the first batch starts the average) and return the averages."""
        for name, value in values.items():
            old = self.values.get(name)
            self.values[name] = value if old is None or not math.isfinite(old) else (
                self.decay * old + (1 - self.decay) * value)
        return dict(self.values)

    def clear(self) -> None:
        """Forget every average (after a reset: the next batch starts afresh)."""
        self.values.clear()
