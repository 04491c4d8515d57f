"""The guard's decision learned on synthetic shifts of its clean calibration images (``GuardConfig(rule="learned")``).

The calibration images have labels. Corrupted by tta's own corruption generator they become shifted domains on
which the guard *can* see who is right. On each such domain (``shift_outcomes``), in batches of the calibration
batch size, it measures:

- the disagreement ratio the guard would see there: how often the adapted model *as reset* (no update) and the
  source model predict different classes, relative to how often they do on the clean images;
- the accuracy of each answer the guard can give: the source model's; the average of the as-reset model's and the
  source model's probabilities (the guard skips the update whenever the average answers, so the adapted model stays
  as reset); and the adapted model's after adapting to the domain from its reset state, batch by batch, as the
  unguarded method does.

``fit_rule`` then picks the two thresholds on the ratio (below ``near_source`` the source model answers, below
``mild`` the average, above it the adapted model) that keep the guard's promise best on those domains: each domain
adds the points by which its answer falls below the source model (any amount: the promise's one point is left to
the noise of carrying the rule to other images, and this is what makes the rule prefer the source model where
adaptation gains nothing) plus the points of the adapted model's gain it gives up beyond 10 %. The thresholds with
the smallest total win; among equals, the most accurate on the synthetic domains, then the larger thresholds (the
source side). Each answer's accuracy estimate is then calibrated (ATC) on the synthetic domains of its band: the
fraction of their images above its threshold equals its accuracy there (an answer whose band holds no synthetic
domain keeps the clean threshold).

A rule learned this way only moves the ratio's bands: it cannot make the guard read the source model's
confidence. Under a strong shift a healthy adapted model and an overconfident source model disagree on most
images, so the ratio is high and the adapted model answers, unless adaptation lost to the source model on the
synthetic shifts of that strength too.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tta.errors import ConfigError
from tta.monitor.calibrate import MIN_DISAGREEMENT, SourceStats, atc_threshold, mixture, placement, probe_copy

if TYPE_CHECKING:
    from tta.core.base import AdaptedModel
    from tta.monitor.guard import GuardConfig
    from tta.source import SourceData

SEVERITIES = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class ShiftOutcome:
    """One synthetic domain: the guard's disagreement ratio there, each answer's accuracy (fractions) and, per
    answer (``source``, ``mix``, ``adapted``), its confidence on every image (for the estimate's threshold)."""

    corruption: str
    severity: int
    disagreement: float
    source: float
    mix: float
    adapted: float
    n: int
    confidence: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class LearnedRule:
    """Thresholds on the disagreement ratio fitted on synthetic shifts, the loss they reached there, and the ATC
    threshold of each answer's estimate fitted on the synthetic shifts it answers (``thresholds``)."""

    near_source: float
    mild: float
    loss: float
    domains: int
    thresholds: dict[str, float] = dataclasses.field(default_factory=dict, hash=False)


def _batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [x[i:i + size] for i in range(0, len(x), size)]


def shift_outcomes(adapted: AdaptedModel, source_model: nn.Module, source: SourceData, clean_agreement: float,
                   corruptions: Sequence[str], severities: Sequence[int], n: int, batch_size: int,
                   min_disagreement: float, seed: int = 1) -> list[ShiftOutcome]:
    """The outcome of every (corruption, severity) on ``n`` calibration images (see the module docstring).

    ``clean_agreement`` is the as-reset model's agreement with the source model on the clean images (the ratio's
    denominator, floored at ``min_disagreement``). The images are corrupted with ``tta.corruptions.corrupt_indexed``
    (data seed ``seed``); a copy of ``adapted`` (without its guard) is adapted and discarded.
    """
    from tta.corruptions import corrupt_indexed

    probe = probe_copy(adapted)
    images, labels = source.sample(n, seed=0)
    device, dtype = placement(probe)
    clean_disagreement = max(1.0 - clean_agreement, min_disagreement)
    outcomes = []
    for corruption in corruptions:
        for severity in severities:
            shifted = corrupt_indexed(images, 0, corruption, severity, seed).to(device, dtype)
            probe.reset()
            src, read, returned = [], [], []
            with torch.no_grad():
                for xb in _batches(shifted, batch_size):
                    src.append(source_model(xb).float().cpu())
                    out = probe.predict(xb, None).float().cpu()
                    logits = probe.loss(xb, None).logits.float().cpu()
                    returned.append(out)
                    read.append(logits if logits.shape == out.shape else out)
            probe.reset()  # the pass above may have moved running state (e.g. a prior estimate)
            adapting = [probe(xb).detach().float().cpu() for xb in _batches(shifted, batch_size)]
            s, r, a = torch.cat(src), torch.cat(read), torch.cat(adapting)
            mix = mixture(torch.cat(returned), s)
            agree = float((r.argmax(1) == s.argmax(1)).float().mean())

            def accuracy(logits: torch.Tensor) -> float:
                return float((logits.argmax(1) == labels.to(logits.device)).float().mean())

            confidence = {k: tuple(v.softmax(1).amax(1).tolist()) for k, v in (("source", s), ("mix", mix),
                                                                                    ("adapted", a))}
            outcomes.append(ShiftOutcome(corruption, int(severity), (1.0 - agree) / clean_disagreement,
                                         accuracy(s), accuracy(mix), accuracy(a), len(labels), confidence))
    return outcomes


def _losses(outcomes: Sequence[ShiftOutcome], answer: str) -> torch.Tensor:
    """Per domain: how far ``answer`` breaks the promise there (points below the source model, plus points of the
    adapted model's gain given up beyond 10 %)."""
    loss = []
    for o in outcomes:
        acc = {"source": o.source, "mix": o.mix, "adapted": o.adapted}[answer]
        gain, kept = 100.0 * (o.adapted - o.source), 100.0 * (acc - o.source)
        below = max(0.0, -kept)
        short = max(0.0, 0.9 * gain - kept)
        loss.append(below + short)
    return torch.tensor(loss, dtype=torch.float64)


def fit_rule(outcomes: Sequence[ShiftOutcome], exclude: Sequence[str] = ()) -> LearnedRule:
    """The thresholds ``near_source <= mild`` with the smallest promise loss on ``outcomes`` (see the module
    docstring), leaving out the corruptions in ``exclude``; ties go to the more accurate thresholds on the
    synthetic domains, then to the larger ones."""
    kept = [o for o in outcomes if o.corruption not in set(exclude)]
    if not kept:
        raise ConfigError("no synthetic domain is left to fit the guard's rule on: leave out fewer corruptions")
    ratios = sorted({o.disagreement for o in kept})
    # a threshold between two neighbouring ratios (their midpoint), below every one or above every one
    cuts = [0.0, *((a + b) / 2 for a, b in itertools.pairwise(ratios)), ratios[-1] + 1.0]
    r = torch.tensor([o.disagreement for o in kept], dtype=torch.float64)
    per = {a: _losses(kept, a) for a in ("source", "mix", "adapted")}
    acc = {a: torch.tensor([getattr(o, a) for o in kept], dtype=torch.float64) for a in per}
    best: tuple[float, float, float, float] | None = None
    for i, near in enumerate(cuts):
        for mild in cuts[i:]:
            def pick(values: dict[str, torch.Tensor], near: float = near, mild: float = mild) -> float:
                return float(torch.where(r < near, values["source"], torch.where(r < mild, values["mix"],
                                                                                   values["adapted"])).sum())
            key = (round(pick(per), 6), -round(pick(acc), 6), -near, -mild)
            if best is None or key < best:
                best = key
    assert best is not None
    near_source, mild = -best[2], -best[3]
    bands = {"source": [o for o in kept if o.disagreement < near_source],
             "mix": [o for o in kept if near_source <= o.disagreement < mild],
             "adapted": [o for o in kept if o.disagreement >= mild]}
    thresholds = {}
    for answer, band in bands.items():
        if band and all(o.confidence.get(answer) for o in band):
            # ATC on the synthetic domains this answer is given on: the fraction above the threshold equals the
            # answer's accuracy there (the correct images' count is all the threshold needs)
            confidence = torch.tensor([c for o in band for c in o.confidence[answer]], dtype=torch.float64)
            correct = torch.arange(confidence.numel()) < round(sum(getattr(o, answer) * o.n for o in band))
            thresholds[answer] = atc_threshold(confidence, correct)
    return LearnedRule(near_source, mild, best[0], len(kept), thresholds)


def learned_outcomes(adapted: AdaptedModel, source_model: nn.Module, source: SourceData, adapted_stats: SourceStats,
                     config: GuardConfig) -> list[ShiftOutcome]:
    """``shift_outcomes`` of every benchmark corruption at severities 1-5 on ``config.shift_images`` calibration
    images in batches of ``config.calibration_batch``, cached by the reset state's fingerprint and the method's
    name and settings."""
    from tta.config import to_dict
    from tta.corruptions import BENCHMARK_CORRUPTIONS
    from tta.source import derived

    images, _ = source.sample(1, seed=0)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ConfigError(f"the guard's rule='learned' corrupts the calibration images, which must be RGB "
                          f"(N, 3, H, W), not {tuple(images.shape[1:])} per image: use rule='fixed'")
    n, batch = config.shift_images, config.calibration_batch

    def compute() -> list[dict[str, Any]]:
        found = shift_outcomes(adapted, source_model, source, adapted_stats.agreement, BENCHMARK_CORRUPTIONS,
                               SEVERITIES, n, batch, MIN_DISAGREEMENT)
        return [{**dataclasses.asdict(o), "confidence": {k: list(v) for k, v in o.confidence.items()}}
                for o in found]

    # the reset state does not identify how the method adapts (its learning rate, ...): its settings do
    settings = json.dumps({"method": adapted.name, "settings": to_dict(adapted.config)}, sort_keys=True, default=str)
    rows = derived("guard-shift-outcomes", adapted.snapshot_fingerprint(), source,
                   f"{settings}|n={n}|batch={batch}|agreement={adapted_stats.agreement!r}|v2", compute)
    return [ShiftOutcome(**{**row, "confidence": {k: tuple(v) for k, v in row["confidence"].items()}})
            for row in rows]
