"""Label-free signals of a batch of predictions, and their moving averages.

All entropies are divided by ``ln(C)`` (C classes), so 0 is a one-hot prediction and 1 the uniform one:

- ``entropy``: mean per-sample entropy (low: confident);
- ``confidence``: mean maximum softmax probability;
- ``marginal_entropy``: entropy of the batch's mean prediction (low: every sample is put in the same few classes,
  the signature of a collapsing adaptation);
- ``agreement``: fraction of samples whose class equals the frozen source model's (when one is kept);
- ``estimated_accuracy``: the ATC estimate, the fraction of samples whose confidence exceeds the threshold
  calibrated on clean source data (see ``tta.monitor.calibrate``);
- ``confident_disagreement``: fraction of samples on which the source model is above that threshold (so most
  likely right) and the prediction disagrees with it (needs both the source logits and the threshold).
"""

from __future__ import annotations

import math

import torch

SIGNALS: tuple[str, ...] = ("entropy", "confidence", "marginal_entropy", "agreement", "estimated_accuracy",
                            "confident_disagreement")


def batch_signals(
    logits: torch.Tensor, source_logits: torch.Tensor | None = None, threshold: float | None = None
) -> dict[str, torch.Tensor]:
    """The signals of one batch of ``logits`` (N, C), as 0-d tensors on the logits' device (no synchronisation).

    ``agreement`` needs ``source_logits``; ``estimated_accuracy`` needs the ATC ``threshold``.
    """
    logits = logits.detach().float()
    n_classes = logits.shape[1]
    norm = math.log(n_classes) if n_classes > 1 else 1.0
    log_p = logits.log_softmax(1)
    p = log_p.exp()
    conf = p.amax(1)
    mean_p = p.mean(0)
    out = {
        "entropy": -(p * log_p).sum(1).mean() / norm,
        "confidence": conf.mean(),
        "marginal_entropy": -(mean_p * mean_p.clamp_min(1e-12).log()).sum() / norm,
    }
    if source_logits is not None:
        out["agreement"] = (logits.argmax(1) == source_logits.argmax(1)).float().mean()
    if threshold is not None:
        out["estimated_accuracy"] = (conf > threshold).float().mean()
    if source_logits is not None and threshold is not None:
        source_p = source_logits.detach().float().softmax(1)
        confident = source_p.amax(1) > threshold
        out["confident_disagreement"] = (confident & (logits.argmax(1) != source_p.argmax(1))).float().mean()
    return out


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
