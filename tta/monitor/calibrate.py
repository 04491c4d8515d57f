"""Calibration of the guard on clean source data: the source model's accuracy and its ATC confidence threshold.

Average thresholded confidence (ATC, Garg et al., ICLR 2022) estimates accuracy on unlabelled data as the fraction
of samples whose confidence exceeds a threshold ``t``; ``t`` is chosen on labelled clean source data so that the
fraction of source samples above it equals the source accuracy there. The calibration is computed once per
(model weights, source data, number of images) and cached (``tta.source.derived``).

The source data should be *held-out* clean images (a validation split the model was not trained on). On its own
training images a model is right almost everywhere, so the threshold comes out too low and every estimate too
high; ``calibrate`` warns when the source accuracy exceeds ``SUSPICIOUS_ACCURACY``.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from tta.source import SourceData, derived

if TYPE_CHECKING:
    from tta.core.base import AdaptedModel

SUSPICIOUS_ACCURACY = 0.99  # above this on the calibration images, they are most likely training images


@dataclass(frozen=True)
class SourceStats:
    """What the source model does on clean source data: accuracy, ATC threshold, mean signals (see signals.py)."""

    accuracy: float
    threshold: float
    precision: float  # accuracy among the samples above the threshold
    confidence: float
    entropy: float
    marginal_entropy: float
    n: int
    agreement: float = 1.0  # fraction of the images on which the model predicts the source model's class


def atc_threshold(confidence: torch.Tensor, correct: torch.Tensor) -> float:
    """The threshold ``t`` with ``mean(confidence > t) == mean(correct)`` (as nearly as the sample allows)."""
    n = confidence.numel()
    n_correct = int(correct.sum())
    ranked = confidence.double().sort(descending=True).values
    if n_correct >= n:
        return -1.0  # every sample counts (confidences are >= 0)
    if n_correct == 0:
        return float(ranked[0])  # none does
    return float(ranked[n_correct])  # exactly n_correct samples lie strictly above (ties aside)


@torch.no_grad()
def _compute(predict: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, source: SourceData, n: int,
             batch_size: int, reference: nn.Module | None = None) -> dict[str, float]:
    from tta.monitor.signals import batch_signals

    images, labels = source.sample(n, seed=0)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    logits = torch.cat([predict(images[i: i + batch_size].to(device, dtype)).float().cpu()
                        for i in range(0, len(images), batch_size)])
    correct = logits.argmax(1) == labels
    agreement = 1.0
    if reference is not None:
        theirs = torch.cat([reference(images[i: i + batch_size].to(device, dtype)).float().cpu()
                            for i in range(0, len(images), batch_size)])
        agreement = float((theirs.argmax(1) == logits.argmax(1)).float().mean())
    signals = batch_signals(logits)
    threshold = atc_threshold(logits.softmax(1).amax(1), correct)
    above = logits.softmax(1).amax(1) > threshold
    precision = float(correct[above].float().mean()) if bool(above.any()) else 1.0
    return {"accuracy": float(correct.float().mean()), "threshold": threshold, "precision": precision,
            "confidence": float(signals["confidence"]), "entropy": float(signals["entropy"]),
            "marginal_entropy": float(signals["marginal_entropy"]), "n": float(len(images)), "agreement": agreement}


def _stats(values: dict[str, float]) -> SourceStats:
    return SourceStats(**{**values, "n": int(values["n"])})


def calibrate(model: nn.Module, source: SourceData, n: int = 2000, batch_size: int = 200) -> SourceStats:
    """The source model's statistics on ``n`` clean source images (in eval mode; cached by model fingerprint)."""
    from tta.models.fingerprint import model_fingerprint

    model.eval()
    values = derived("guard-calibration", model_fingerprint(model), source, f"n={n}|v3",
                     lambda: _compute(model, model, source, n, batch_size))
    stats = _stats(values)
    if stats.accuracy > SUSPICIOUS_ACCURACY:
        warnings.warn(f"the source model is {100 * stats.accuracy:.1f} % accurate on the guard's calibration images "
                      f"({source.spec}): are they its training images? Calibrate on held-out clean images (a "
                      "validation split), or the accuracy estimate will be too high", stacklevel=2)
    return stats


def calibrate_adapted(adapted: AdaptedModel, source_model: nn.Module, source: SourceData, n: int = 2000,
                      batch_size: int = 64) -> SourceStats:
    """The statistics of ``adapted`` *as reset* (no update) on ``n`` clean source images in batches of ``batch_size``.

    Adaptation changes how confident a model is, not only what it predicts: a method that normalises with batch
    statistics, or that rescales its output (ROID's prior correction), has its own confidence scale, so its ATC
    threshold is calibrated on its own clean predictions. ``agreement`` is how often it predicts the class of
    ``source_model`` (in eval mode) on those images. A copy of ``adapted`` is reset and discarded (no copy is
    kept); the result is cached by the reset state's fingerprint.
    """
    def compute() -> dict[str, float]:
        guard, adapted.guard = adapted.guard, None  # the copy must not carry the guard
        try:
            probe = copy.deepcopy(adapted)
        finally:
            adapted.guard = guard
        probe.reset()
        probe.requires_grad_(False)
        return _compute(lambda x: probe.predict(x, None), probe, source, n, batch_size, source_model)

    values = derived("guard-calibration-adapted", adapted.snapshot_fingerprint(), source,
                     f"n={n}|batch={batch_size}|v4", compute)
    return _stats(values)
