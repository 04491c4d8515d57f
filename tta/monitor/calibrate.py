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
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from tta.source import SourceData, derived

if TYPE_CHECKING:
    from tta.core.base import AdaptedModel

MIN_DISAGREEMENT = 0.01  # floor of the clean disagreement (a method that keeps the source model's predictions)
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
    mix_threshold: float = -1.0  # ATC threshold of the average of this model's and the source model's probabilities
    mix_accuracy: float = 0.0  # accuracy of that average


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
def _compute(predict: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], model: nn.Module,
             source: SourceData, n: int, batch_size: int, reference: nn.Module | None = None) -> dict[str, float]:
    """``predict`` gives two logits per batch: the ones the guard reads, and the ones the model returns."""
    from tta.monitor.signals import batch_signals

    images, labels = source.sample(n, seed=0)
    device, dtype = placement(model)
    pairs = [predict(images[i: i + batch_size].to(device, dtype)) for i in range(0, len(images), batch_size)]
    logits = torch.cat([read.float().cpu() for read, _ in pairs])
    correct = logits.argmax(1) == labels
    values = {"agreement": 1.0, "mix_threshold": -1.0, "mix_accuracy": 0.0}
    if reference is not None:
        theirs = torch.cat([reference(images[i: i + batch_size].to(device, dtype)).float().cpu()
                            for i in range(0, len(images), batch_size)])
        values["agreement"] = float((theirs.argmax(1) == logits.argmax(1)).float().mean())
        mix = mixture(torch.cat([returned.float().cpu() for _, returned in pairs]), theirs).softmax(1)
        mix_correct = mix.argmax(1) == labels
        values["mix_threshold"] = atc_threshold(mix.amax(1), mix_correct)
        values["mix_accuracy"] = float(mix_correct.float().mean())
    signals = batch_signals(logits)
    threshold = atc_threshold(logits.softmax(1).amax(1), correct)
    above = logits.softmax(1).amax(1) > threshold
    precision = float(correct[above].float().mean()) if bool(above.any()) else 1.0
    return {"accuracy": float(correct.float().mean()), "threshold": threshold, "precision": precision,
            "confidence": float(signals["confidence"]), "entropy": float(signals["entropy"]),
            "marginal_entropy": float(signals["marginal_entropy"]), "n": float(len(images)), **values}


def placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of ``model``'s parameters (CPU float32 without any)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return device, next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def probe_copy(adapted: AdaptedModel) -> AdaptedModel:
    """A deep copy of ``adapted`` without its guard, to run and discard (the copy must not carry the guard)."""
    guard, adapted.guard = adapted.guard, None
    try:
        return copy.deepcopy(adapted)
    finally:
        adapted.guard = guard


def mixture(logits: torch.Tensor, source_logits: torch.Tensor) -> torch.Tensor:
    """Log of the average of two models' softmax probabilities (a two-model ensemble, as logits)."""
    log_p = torch.stack([logits.detach().float().log_softmax(1), source_logits.detach().float().log_softmax(1)])
    return torch.logsumexp(log_p, 0) - math.log(2.0)


def _stats(values: dict[str, float]) -> SourceStats:
    return SourceStats(**{**values, "n": int(values["n"])})


def calibrate(model: nn.Module, source: SourceData, n: int = 2000, batch_size: int = 200) -> SourceStats:
    """The source model's statistics on ``n`` clean source images (in eval mode; cached by model fingerprint)."""
    from tta.models.fingerprint import model_fingerprint

    model.eval()
    def both(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        return logits, logits

    values = derived("guard-calibration", model_fingerprint(model), source, f"n={n}|v5",
                     lambda: _compute(both, model, source, n, batch_size))
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
    statistics, or that rescales its output, has its own confidence scale, so its ATC threshold is calibrated on
    its own clean predictions, read where the guard reads them: the logits of the method's loss, before any
    output correction (ROID's prior correction flattens the returned logits; a threshold calibrated on those
    would count every uncorrected prediction as right). ``agreement`` is how often it predicts the class of
    ``source_model`` (in eval mode) on those images; ``mix_threshold`` and ``mix_accuracy`` belong to the average
    of its *returned* probabilities and the source model's (``mixture``). A copy of ``adapted`` is reset and
    discarded (no copy is kept); the result is cached by the reset state's fingerprint.
    """
    def compute() -> dict[str, float]:
        probe = probe_copy(adapted)
        probe.reset()
        probe.requires_grad_(False)

        def both(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            returned = probe.predict(x, None)
            read = probe.loss(x, None).logits  # what the guard reads (before the method's output correction)
            return (read if read.shape == returned.shape else returned), returned

        return _compute(both, probe, source, n, batch_size, source_model)

    values = derived("guard-calibration-adapted", adapted.snapshot_fingerprint(), source,
                     f"n={n}|batch={batch_size}|v5", compute)
    return _stats(values)
