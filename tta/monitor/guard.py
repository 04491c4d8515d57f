"""Guards: watch an adapted model's label-free signals and intervene before adaptation makes it worse.

A guard keeps one frozen copy of the source model (the model before adaptation) and, on every batch, reads the
adapted model's prediction, which the method computes anyway, and the source model's prediction on a subsample of
the batch (``source_fraction``; every image where the guard may answer with the source model). It never asks how
accurate the *source* model believes it is under shift: a source model that is confidently wrong (under a strong
shift it may put nearly every image into one class with high confidence) would then veto exactly the batches on
which adaptation helps most. It decides from two things the source model's confidence cannot fake:

- ``collapse``: the adapted predictions' marginal entropy (entropy of the batch's mean prediction) is below
  ``collapse_ratio`` times the larger of the source model's on the same subsample and the adapted model's own on
  the first batch since its last reset (its predictions *before* any update, free to read). When the subsample's
  comparison alone fires, the source model reads the whole batch and the comparison is made there: the marginal
  entropy of a dozen healthy predictions is too noisy to call a collapse on (on a real collapse the source model
  answers the whole batch anyway, so the read costs nothing extra there). For the same reason a batch smaller than
  ``collapse_images`` is compared with its own reference pooled with the latest batches (its marginal entropy over
  at least that many images), and the reference is likewise the first ``collapse_images`` images since the reset:
  with batches of 20, a healthy batch's marginal entropy fell below 0.9 times that of the first batch by chance.
  Adaptation is then putting the images into fewer classes than both models it started from: the signature of
  entropy-minimisation collapse, whatever the source model's confidence;
- the *shift*, measured by how often the adapted and the source model disagree, pooled over recent batches (weight
  ``decay``), relative to how often they disagree on the clean calibration images (the adapted model as reset, in
  batches of ``calibration_batch``, or of the stream's first batch when it is less than half of that: batch statistics
  of fewer images disagree more): the ``disagreement`` ratio. On clean data the two differ only by the noise of
  adapting (batch statistics of a small batch cost a model a few points); a shift that moves the adapted model away
  from the source model raises the ratio. Three answers follow:

  - ratio < ``near_source``: the batch looks like the clean data, where the source model is the better of the
    two (it has its calibrated running statistics). The source model answers;
  - ratio < ``mild``: a mild shift. The batch is answered by the average of both models' probabilities (a
    two-model ensemble), which on mild shifts was measured to be about as accurate as the better of the two or
    better;

  in both cases the update is skipped (``skip``): the answer does not need it, and the backward pass it saves
  pays for the source model reading the whole batch;
  - otherwise the adapted model answers.

  The clean disagreement belongs to the model as reset. A model that adapts for long (a continual stream, a high
  learning rate) drifts: it then disagrees with the source model more often on clean images too, and near-source
  batches would read as a shift. Every ``drift_every`` batches, and no sooner than ``drift_images`` images, since the
  last check or reset the guard therefore runs a copy of the adapted model in its current state (no update) on
  ``calibration_batch`` clean calibration images and compares its disagreement with the source model there (pooled
  over the checks since the reset, weight 0.5) with the model as reset's on the same images; an excess clearly above
  the noise (twice the standard error of the rate) is ``drift``: with ``reset`` the guard answers that batch with the
  source model, skips its update and resets the adapted model (the model as reset answers from then on); without it
  the excess is added to the clean disagreement the ratio is measured against (signal ``drift``: that denominator's
  factor, 1 without drift). A stream reset more often than that is never checked, and a reset starts the count afresh.
  The image minimum (640, ten times the 64 images a check reads) keeps the check's forward passes under a tenth of the
  stream's at any batch size; counted in batches alone, a stream of batches of 16 would read 64 clean images every
  160.

  ``near_source`` and ``mild`` are fixed (``rule="fixed"``), or, with ``rule="learned"``, fitted per model and
  method on synthetic corruptions of the calibration images (``shift_images`` per corruption and severity), where
  the guard can see which answer is right (``tta.monitor.learn``); the estimates are then calibrated there too.

  An overconfident or collapsed source model cannot turn this against healthy adaptation: under a strong shift it
  disagrees with the adapted model on most images, so the ratio is high and the adapted model answers, whatever
  the source model's confidence. The source model takes part only where the two mostly agree; and where they
  agree, the ensemble returns their common class, so the ensemble can differ from the adapted model only on the
  (few) images on which the two disagree.

On a ``collapse`` batch the guard skips the update (``skip``), answers with the source model (``fallback``), rolls
back to the last healthy state (``rollback``, off by default: it keeps a second copy of the adapted state) and
after ``reset_after`` collapse batches in a row resets (``reset``). After one it keeps answering with the source
model for ``probation`` more batches.

``estimated_accuracy`` (``signals``) is the ATC estimate of the predictions returned, each with the threshold
calibrated for it on the clean images: the adapted model's (read from the method's loss logits, before any output
correction), the source model's, or the ensemble's. It is ``nan`` (not estimated) without calibration data, on a
collapse batch, and outside the range where its error was measured to be small: when the source model's marginal
entropy is below ``estimate_range`` times its clean value (a shift so strong that the source model puts most
images into one or two classes), and, for the adapted model's answers, when its estimate pooled over recent
batches exceeds its clean accuracy by more than 20 points or is saturated (every image above the threshold where
its clean accuracy predicts at least three misses): updates have then sharpened its confidences beyond the
calibration.
``estimate_note`` says which.

Calibration wants *held-out* clean labelled images (a validation split), not the images the model was trained on:
on training images the source model is nearly always right, which makes the threshold too low and the estimates
too high (``calibrate`` warns when the source accuracy there is above 99 %). Without source data the shift rule
and the estimate are off and ``collapse`` alone guards the run.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tta.core.validate import check_range
from tta.errors import ConfigError
from tta.monitor.calibrate import (
    MIN_DISAGREEMENT,
    SourceStats,
    calibrate,
    calibrate_adapted,
    mixture,
    placement,
    probe_copy,
)
from tta.monitor.learn import LearnedRule, ShiftOutcome, fit_rule, learned_outcomes
from tta.monitor.signals import MovingAverage, batch_signals, marginal_entropy

if TYPE_CHECKING:
    from tta.core.base import AdaptedModel, StepOutput
    from tta.source import SourceData


DRIFT = 0.2  # an adapted model's pooled estimate this far above its clean accuracy is not quoted
DRIFT_DECAY = 0.5  # weight of the earlier drift checks in the pooled one
SUBSAMPLE_MARGIN = 1.25  # the subsample reads the whole batch when its disagreement ratio is below this x ``mild``
RULES = ("fixed", "learned")  # thresholds on the disagreement ratio: the config's, or fitted on synthetic shifts


@dataclass(frozen=True)
class GuardConfig:
    """Rules and actions of a ``Guard`` (see the module docstring); ratios and margins are fractions."""

    collapse_ratio: float = 0.9
    collapse_images: int = 50
    near_source: float = 0.8
    mild: float = 1.3
    estimate_range: float = 0.2
    source_fraction: float = 0.25
    skip: bool = True
    fallback: bool = True
    rollback: bool = False
    reset: bool = True
    reset_after: int = 3
    probation: int = 1
    decay: float = 0.9
    calibration_images: int = 2000
    calibration_batch: int = 64
    rule: str = "fixed"
    shift_images: int = 250
    drift_every: int = 10
    drift_images: int = 640

    def __post_init__(self) -> None:
        try:
            for name in ("collapse_ratio", "estimate_range"):
                check_range(name, getattr(self, name), low=0.0, high=1.0)
            for name in ("near_source", "mild"):
                check_range(name, getattr(self, name), low=0.0, high=100.0)
            check_range("source_fraction", self.source_fraction, low=0.0, high=1.0, low_open=True)
            check_range("decay", self.decay, low=0.0, high=1.0, high_open=True)
        except ValueError as err:
            raise ConfigError(f"guard setting: {err}") from None
        for name, low in (("reset_after", 1), ("calibration_images", 1), ("probation", 0), ("calibration_batch", 2),
                          ("shift_images", 1), ("drift_every", 0), ("drift_images", 0),
                          ("collapse_images", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low or value > 1_000_000:
                raise ConfigError(f"guard setting {name} must be an integer in [{low}, 1000000], got {value!r}")
        if self.rule not in RULES:
            raise ConfigError(f"guard setting rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.near_source > self.mild:
            raise ConfigError(f"guard setting near_source ({self.near_source}) must not exceed mild ({self.mild})")


PRESETS: dict[str, GuardConfig] = {
    # every rule; skip, fall back and reset on collapse; source or ensemble answers on near-source or mild shifts
    "default": GuardConfig(),
    # signals and estimates only: never changes what the adapted model does
    "monitor": GuardConfig(skip=False, fallback=False, rollback=False, reset=False),
    # keep adapting whatever happens, but answer like "default" (source model, or both models' average)
    "fallback": GuardConfig(skip=False, rollback=False, reset=False),
    # like "default", with the thresholds and estimates fitted on synthetic corruptions of the calibration images
    "learned": GuardConfig(rule="learned"),
}


class Guard:
    """Label-free monitor of an adapted model with actions when a signal crosses its threshold.

    ``guard.signals`` holds the last batch's signals, ``guard.averages`` their moving averages, ``guard.unhealthy``
    the rules that fired on the last batch (``collapse`` or ``drift``), ``guard.answer`` who answered it
    (``adapted``, ``mix`` or ``source``), ``guard.estimate_note`` why the last batch has no accuracy estimate
    (empty when it has one); ``guard.stats`` and ``guard.adapted_stats`` the calibrations of the source model and
    of the adapted model as reset (``None`` without source data); ``guard.source_model`` the frozen source copy.
    """

    def __init__(self, config: GuardConfig | None = None, *, source_data: SourceData | str | tuple[Any, Any] | None
                 = None, **overrides: Any) -> None:
        from tta.source import as_source_data

        config = config or GuardConfig()
        if overrides:
            unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(GuardConfig)})
            if unknown:
                raise ConfigError(f"unknown guard setting(s) {unknown}; valid ones: "
                                  f"{[f.name for f in dataclasses.fields(GuardConfig)]}")
            config = dataclasses.replace(config, **overrides)
        self.config = config
        self.source_data = as_source_data(source_data)
        self.source_model: nn.Module | None = None
        self.stats: SourceStats | None = None
        self.adapted_stats: SourceStats | None = None
        self.outcomes: list[ShiftOutcome] = []  # rule="learned": the synthetic shifts its thresholds were fitted on
        self.rule: LearnedRule | None = None  # rule="learned": the fitted thresholds (replace it to refit)
        self.signals: dict[str, float] = {}
        self.averages = MovingAverage(config.decay)
        self.unhealthy: list[str] = []
        self.answer = "adapted"
        self.estimate_note = ""
        self.above: torch.Tensor | None = None  # per sample of the last returned prediction: counted as right (ATC)
        self._identity = False  # the adapted model is the source model (method ``source``): nothing to compare
        self._good: dict[str, Any] | None = None
        self._bad_run = 0
        self._probation = 0  # batches still to be answered by the source model
        self._resets_seen = 0
        self._reference: float | None = None  # marginal entropy of the first collapse_images since the last reset
        self._recent: list[tuple[torch.Tensor, int]] = []  # latest batches: summed adapted probabilities, images
        self._pooled = [0.0, 0.0]  # discounted sums over the images compared: images, agreements
        self._mass: torch.Tensor | None = None  # discounted sum of the source model's probabilities
        self._pooled_estimate = self._pooled_n = 0.0  # discounted sums: images above the threshold, images
        self._fallback_logits: torch.Tensor | None = None
        self._mix_with: torch.Tensor | None = None  # the source logits to average the returned prediction with
        # drift: clean images, the source model's classes on them, the model as reset's disagreement with those
        self._drift_images: torch.Tensor | None = None
        self._drift_classes: torch.Tensor | None = None
        self._drift_reset = 0.0
        self._drift = 1.0  # the clean disagreement's factor: the drifted model's over the model as reset's
        self._since_check = [0, 0]  # batches, images since the last drift check or reset
        self._drift_sums = [0.0, 0.0]  # discounted sums over the drift checks: disagreements, images
        self._drifted = False  # this batch's drift check found drift
        self._calibration_source: SourceData | None = None
        self._stream_batch: int | None = None  # the first batch's size (the adapted model recalibrated for it)

    # ------------------------------------------------------------------------------------------------ setup
    def attach(self, adapted: AdaptedModel, source_model: nn.Module) -> None:
        """Keep a frozen copy of ``source_model`` (the model before adaptation) and calibrate on source data."""
        from tta.methods.source import Source

        model = copy.deepcopy(source_model).eval().requires_grad_(False)
        self._identity = isinstance(adapted, Source)
        source = self.source_data or adapted.source_data
        self._calibration_source, self._stream_batch = source, None
        self.stats = self.adapted_stats = self.rule = None
        self.outcomes = []
        if source is not None:
            self.stats = calibrate(model, source, self.config.calibration_images)
            self.adapted_stats = self.stats if self._identity else calibrate_adapted(
                adapted, model, source, self.config.calibration_images, self.config.calibration_batch)
            if self.config.rule == "learned" and not self._identity:
                self.outcomes = learned_outcomes(adapted, model, source, self.adapted_stats, self.config)
                self.rule = fit_rule(self.outcomes)
        self._drift_images = self._drift_classes = None
        if source is not None and not self._identity and self.config.drift_every > 0:
            self._drift_images, _ = source.sample(self.config.calibration_batch, seed=0)
            with torch.no_grad():
                self._drift_classes = model(self._drift_images.to(*placement(model))).argmax(1).cpu()
            self._drift_reset = self._clean_disagreement(adapted, reset=True)
        self.source_model = model
        self._resets_seen = adapted.counters.resets
        self._forget()
        adapted.guard = self

    # ------------------------------------------------------------------------------------------------ hooks
    def before_update(self, adapted: AdaptedModel, x: torch.Tensor, domain: torch.Tensor | None,
                      out: StepOutput) -> bool:
        """Read the batch's signals; decide who answers it. Returns whether the update may go ahead."""
        if adapted.counters.resets != self._resets_seen:  # reset since the last batch: history no longer applies
            self._forget()
            self._resets_seen = adapted.counters.resets
        self._since_check = [self._since_check[0] + 1, self._since_check[1] + x.shape[0]]
        self._drifted = False
        self._fallback_logits = self._mix_with = None
        self.answer = "adapted"
        if out.logits.ndim != 2 or out.logits.shape[0] != x.shape[0]:
            # The method predicts only after its update (MEMO): nothing to judge before it.
            self.above, self.estimate_note = None, "the method predicts after its update"
            return True
        if (self._drift_images is not None and self._since_check[0] >= self.config.drift_every
                and self._since_check[1] >= self.config.drift_images):
            self._since_check = [0, 0]
            self._measure_drift(adapted)
        assert self.source_model is not None  # attach() ran
        logits = out.logits.detach()
        n = logits.shape[0]
        pooled = self._pooled_entropy(logits)
        if self._identity:
            rows, src = torch.arange(n, device=logits.device), logits
        else:
            rows = _subsample(n, self.config.source_fraction, logits.device)
            if placement(self.source_model)[0] != x.device:  # moved once: ``.to`` walks every module
                self.source_model.to(x.device)
            if self._stream_batch is None:
                self.calibrate_for_batch(adapted, n)
            with torch.no_grad():
                src = self.source_model(x[rows])
            if rows.numel() < n and self._needs_whole_batch(logits, src, rows, pooled[0]):
                rows = torch.arange(n, device=logits.device)
                with torch.no_grad():
                    src = self.source_model(x)
        values = self._measure(logits, src, rows, pooled)
        self.signals = values
        self.averages.update(values)
        self.unhealthy = self._rules(values)
        return self._act(adapted, x, logits, src, rows)

    def after_batch(self, adapted: AdaptedModel, out: StepOutput) -> StepOutput:
        """The batch's final output: the source model's prediction (``fallback``) or the ensemble (``mix``)."""
        if self._mix_with is not None:
            mixed = mixture(out.logits, self._mix_with)
            self._mix_with = None
            assert self.adapted_stats is not None  # a mix needs the calibration
            if self.estimate_note == "":
                self._quote(_above(mixed, self._threshold("mix", self.adapted_stats.mix_threshold)))
            return dataclasses.replace(out, logits=mixed)
        if self._fallback_logits is None:
            return out
        adapted.counters.fallbacks += 1
        out = dataclasses.replace(out, logits=self._fallback_logits)
        self._fallback_logits = None
        return out

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What the guard learned along the stream: its settings, the last healthy snapshot (with ``rollback``),
        the run of unhealthy batches, the reference and pooled sums, and the moving averages (``adapted.save``
        includes it). The source copy and the calibrations are not saved: ``attach`` rebuilds them."""
        return {"config": dataclasses.asdict(self.config), "good": copy.deepcopy(self._good),
                "bad_run": self._bad_run, "probation": self._probation, "averages": dict(self.averages.values),
                "reference": self._reference, "pooled": list(self._pooled),
                "recent": [(mass.cpu().clone(), n) for mass, n in self._recent],
                "pooled_estimate": [self._pooled_estimate, self._pooled_n],
                "mass": None if self._mass is None else self._mass.cpu().clone(),
                "drift": [*self._since_check, self._drift, *self._drift_sums]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (after ``attach``); settings other than this guard's are an error."""
        if state.get("config") != dataclasses.asdict(self.config):
            raise ConfigError(f"this guard state was saved with other guard settings ({state.get('config')}); "
                              f"attach a guard with those settings first")
        self._good = copy.deepcopy(state["good"])
        self._bad_run = int(state["bad_run"])
        self._probation = int(state.get("probation", 0))
        self.averages.values = dict(state["averages"])
        self._reference = state.get("reference")
        self._recent = [(mass, int(n)) for mass, n in state.get("recent", [])]
        self._pooled = [float(v) for v in state.get("pooled", [0.0, 0.0])]
        self._pooled_estimate, self._pooled_n = (float(v) for v in state.get("pooled_estimate", [0.0, 0.0]))
        self._mass = state.get("mass")
        batches, images, drift, *sums = state.get("drift", [0, 0, 1.0, 0.0, 0.0])
        self._since_check, self._drift, self._drift_sums = [int(batches), int(images)], float(drift), [
            float(v) for v in sums]

    @property
    def thresholds(self) -> tuple[float, float]:
        """``(near_source, mild)`` in use: the fitted ones with ``rule="learned"`` (once calibrated), else the
        config's."""
        if self.rule is not None:
            return self.rule.near_source, self.rule.mild
        return self.config.near_source, self.config.mild

    # ---------------------------------------------------------------------------------------------- helpers
    def _threshold(self, answer: str, clean: float) -> float:
        """The ATC threshold of ``answer``'s estimate: fitted on the synthetic shifts it answers with
        ``rule="learned"``, else (or where no synthetic shift fell in its band) the clean calibration's."""
        return clean if self.rule is None else self.rule.thresholds.get(answer, clean)

    def _forget(self) -> None:
        self._good, self._bad_run, self._probation, self._reference = None, 0, 0, None
        self._recent = []
        self._pooled, self._mass = [0.0, 0.0], None
        self._pooled_estimate = self._pooled_n = 0.0
        self._since_check, self._drift, self._drift_sums = [0, 0], 1.0, [0.0, 0.0]
        self.averages.clear()

    def _clean_disagreement(self, adapted: AdaptedModel, reset: bool) -> float:
        """How often a copy of ``adapted`` (as reset, or in its current state) predicts another class than the
        source model on the drift check's clean images, read where the guard reads it (the method's loss logits);
        the copy adapts nothing and is discarded."""
        assert self._drift_images is not None and self._drift_classes is not None
        probe = probe_copy(adapted)
        if reset:
            probe.reset()
        x = self._drift_images.to(*placement(probe))
        with torch.no_grad():
            logits = probe.loss(x, None).logits
            if logits.ndim != 2 or logits.shape[0] != x.shape[0]:  # no per-image loss logits (MEMO): its prediction
                logits = probe.predict(x, None)
        return float((logits.argmax(1).cpu() != self._drift_classes).float().mean())

    def _measure_drift(self, adapted: AdaptedModel) -> None:
        """Compare the adapted model in its current state with the model as reset on clean images (see the module
        docstring): when it disagrees with the source model there clearly more often (by more than twice the
        standard error of its rate), the batch reports ``drift`` (``_act`` resets the model, with ``reset``) and the
        excess is added to the clean disagreement the ratio is measured against (signal ``drift``: the clean
        disagreement's factor, 1 without drift)."""
        assert self._drift_images is not None and self.adapted_stats is not None
        now, m = self._clean_disagreement(adapted, reset=False), self._drift_images.shape[0]
        # pooled over the checks since the reset (weight DRIFT_DECAY), like the disagreement over batches
        self._drift_sums = [DRIFT_DECAY * self._drift_sums[0] + m * now, DRIFT_DECAY * self._drift_sums[1] + m]
        rate, n = self._drift_sums[0] / self._drift_sums[1], self._drift_sums[1]
        excess = rate - self._drift_reset
        self._drifted = excess > 2.0 * math.sqrt(rate * (1.0 - rate) / n)
        self._drift = 1.0 + excess / self._clean_rate() if self._drifted else 1.0

    def _clean_rate(self) -> float:
        """How often the model as reset disagrees with the source model on the clean calibration images (at least
        ``MIN_DISAGREEMENT``): the rate the disagreement ratio divides by, before drift."""
        assert self.adapted_stats is not None
        return max(1.0 - self.adapted_stats.agreement, MIN_DISAGREEMENT)

    def _disagreement(self, images: float, agreements: float) -> float:
        """The pooled disagreement with these images added, relative to the clean calibration's (``inf``: none)."""
        n, agree = self.config.decay * self._pooled[0] + images, self.config.decay * self._pooled[1] + agreements
        if self.adapted_stats is None or n <= 0:
            return math.inf
        return (1.0 - agree / n) / (self._clean_rate() * self._drift)

    @property
    def stream_batch(self) -> int | None:
        """The batch size the adapted model's calibration was checked for (``None`` before the first batch)."""
        return self._stream_batch

    def calibrate_for_batch(self, adapted: AdaptedModel, n: int) -> None:
        """Calibrate the adapted model as reset again in batches of ``n`` (the stream's batch size), when that is
        less than half of ``calibration_batch``; the first batch does it otherwise (call this to pay that one-time
        cost before a stream starts). A method that normalises with batch statistics disagrees with the
        source model more often on clean images in small batches (ResNet-20 with Tent: 17.9 % in batches of 64,
        18.5 % of 50, 18.7 % of 32, 21.5 % of 16, 26.5 % of 8), and the disagreement ratio must compare the stream
        with clean images in batches of the same size, or a small-batch stream reads as shifted."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"calibrate_for_batch needs a batch size (an integer >= 1), got {n!r}")
        self._stream_batch = n
        source, cfg = self._calibration_source, self.config
        if self.adapted_stats is None or source is None or self._identity or 2 * n >= cfg.calibration_batch:
            return
        assert self.source_model is not None
        self.adapted_stats = calibrate_adapted(adapted, self.source_model, source, cfg.calibration_images, max(n, 2))

    def _pooled_entropy(self, logits: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
        """The adapted predictions' marginal entropy over at least ``collapse_images`` images where the stream has
        them: this batch's alone when it is that large, else this batch pooled with the latest ones (their summed
        probabilities); with the number of images it covers and this batch's summed probabilities (nothing is
        stored here: ``_measure`` keeps them)."""
        mass = logits.float().softmax(1).sum(0)
        n = logits.shape[0]
        if n >= self.config.collapse_images or not self._recent:
            return marginal_entropy(logits), n, mass
        total, images = mass, n
        for earlier, count in reversed(self._recent):
            if images >= self.config.collapse_images:
                break
            total, images = total + earlier.to(mass.device), images + count
        return marginal_entropy(total[None].log()), images, mass

    def _needs_whole_batch(self, logits: torch.Tensor, src: torch.Tensor, rows: torch.Tensor,
                           whole: torch.Tensor) -> bool:
        """Whether the source model must read every image of the batch, not only the subsample ``rows`` (one
        synchronisation): the subsample puts the batch near the ``mild`` range, with a margin for its noise (the
        source model may answer), or the ``collapse`` rule would fire on the subsample's comparison with the source
        model alone, the batch (``whole``: its pooled marginal entropy) not being below ``collapse_ratio`` times the
        reference (the marginal entropy of a dozen healthy predictions is too noisy to call a collapse on: the
        comparison is then made on the whole batch; on a real collapse the source model answers every image
        anyway)."""
        sub = logits[rows]
        agree, mine, theirs, whole_value = torch.stack([
            (sub.argmax(1) == src.argmax(1)).float().sum(), marginal_entropy(sub), marginal_entropy(src),
            whole]).tolist()
        if (self.adapted_stats is not None and self.config.fallback
                and self._disagreement(sub.shape[0], agree) < SUBSAMPLE_MARGIN * self.thresholds[1]):
            return True
        ratio = self.config.collapse_ratio
        return mine < ratio * theirs and (self._reference is None or whole_value >= ratio * self._reference)

    def _measure(self, logits: torch.Tensor, src: torch.Tensor, rows: torch.Tensor,
                 pooled: tuple[torch.Tensor, int, torch.Tensor]) -> dict[str, float]:
        """The batch's signals (one synchronisation), with the pooled sums and the reference updated."""
        mine = batch_signals(logits, None, None if self.adapted_stats is None else self.adapted_stats.threshold)
        sub = batch_signals(logits[rows], src, None)
        theirs = batch_signals(src, None, None if self.stats is None else self.stats.threshold)
        names = [*mine, "pooled_marginal_entropy", "agreement", "subsample_marginal_entropy",
                 *(f"source_{k}" for k in theirs)]
        tensors = [*mine.values(), pooled[0], sub["agreement"], sub["marginal_entropy"], *theirs.values()]
        self._recent.append((pooled[2], logits.shape[0]))
        while len(self._recent) > 1 and sum(n for _, n in self._recent[1:]) >= self.config.collapse_images:
            self._recent.pop(0)  # no later pooling reaches it
        if self.stats is not None:
            probs = src.detach().float().softmax(1).sum(0)
            self._mass = probs if self._mass is None else self.config.decay * self._mass.to(probs.device) + probs
            names.append("source_range")
            tensors.append(marginal_entropy(self._mass[None].log())
                           / max(self.stats.marginal_entropy, 1e-12))
        values = dict(zip(names, torch.stack(tensors).tolist(), strict=True))
        values["source_rows"] = m = float(rows.numel())
        if self._reference is None and pooled[1] >= self.config.collapse_images:
            # the first collapse_images since a reset: the adapted model before any update (its first batch), or
            # as few updates as batches of that size allow
            self._reference = values["pooled_marginal_entropy"]
        # until then the reference so far (the rules do not compare with it yet)
        values["reference_marginal_entropy"] = (values["pooled_marginal_entropy"] if self._reference is None
                                                else self._reference)
        values["drift"] = self._drift
        if self.adapted_stats is not None and not self._identity:
            values["disagreement"] = self._disagreement(m, m * values["agreement"])
            decay, (n, agree) = self.config.decay, self._pooled
            self._pooled = [decay * n + m, decay * agree + m * values["agreement"]]
        return values

    def _rules(self, s: dict[str, float]) -> list[str]:
        ratio = self.config.collapse_ratio
        if not self._identity and (s["subsample_marginal_entropy"] < ratio * s["source_marginal_entropy"]
                                   or (self._reference is not None
                                       and s["pooled_marginal_entropy"] < ratio * self._reference)):
            return ["collapse"]
        return ["drift"] if self._drifted else []

    def _act(self, adapted: AdaptedModel, x: torch.Tensor, logits: torch.Tensor, src: torch.Tensor,
             rows: torch.Tensor) -> bool:
        """Decide what the batch returns and whether its update goes ahead; sets ``above`` and the estimate."""
        cfg = self.config
        collapse = "collapse" in self.unhealthy
        if "drift" in self.unhealthy and cfg.reset:
            # the adapted model has drifted from what it was as reset: the model as reset answers from now on, this
            # batch the source model (the batch's adapted prediction came from the drifted model)
            adapted.reset()  # counted in adapted.counters.resets
            self._forget()
            self._resets_seen = adapted.counters.resets
            if cfg.fallback:
                self.answer = "source"
                self._fallback_logits = self._source_logits(x, src, rows)
            self._estimate(self._fallback_logits if cfg.fallback else logits, False)
            return False
        if collapse:
            self._bad_run += 1
            self._probation = cfg.probation
        else:
            self._bad_run = 0
        disagreement = self.signals.get("disagreement", math.inf)
        near_source, mild = self.thresholds
        near = cfg.fallback and not collapse and disagreement < near_source
        if cfg.fallback and (collapse or near or (self._probation > 0 and not collapse)):
            self.answer = "source"
        elif cfg.fallback and disagreement < mild:
            self.answer = "mix"
        if not collapse and self._probation > 0:
            self._probation -= 1
        if self.answer == "source":
            self._fallback_logits = self._source_logits(x, src, rows)
        elif self.answer == "mix":
            self._mix_with = self._source_logits(x, src, rows)
        self._estimate(logits if self.answer != "source" else self._fallback_logits, collapse)
        if near or self.answer == "mix":
            # Near the source or mildly shifted, the answer does not need the update (the source model is the
            # better of the two, or the ensemble holds both); skipping it pays for reading the whole batch.
            return not cfg.skip
        if not collapse:
            if cfg.rollback:
                self._good = adapted._capture()  # the state that just produced a healthy batch
            return True
        if cfg.reset and self._bad_run >= cfg.reset_after:
            adapted.reset()  # counted in adapted.counters.resets
            self._forget()
            self._resets_seen = adapted.counters.resets
            self._probation = cfg.probation
            return False
        if cfg.rollback and self._good is not None:
            adapted._load(self._good, True, False)
            adapted.counters.rollbacks += 1
            return False
        return not cfg.skip

    def _source_logits(self, x: torch.Tensor, src: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The source model's logits on the whole batch (the subsample's are reused)."""
        if rows.numel() == x.shape[0]:
            return src
        assert self.source_model is not None
        with torch.no_grad():
            return self.source_model(x)

    def _estimate(self, returned: torch.Tensor | None, collapse: bool) -> None:
        """The estimate of the batch's answer (an ensemble's is quoted in ``after_batch``, once it exists)."""
        stats = self.stats if self.answer == "source" else self.adapted_stats
        note = ""
        if stats is None or self.stats is None:
            note = "no calibration data"
        elif collapse and self.answer != "source":
            note = "the adapted model collapsed"
        elif self.signals.get("source_range", 1.0) < self.config.estimate_range:
            note = "shift outside the calibrated range (the source model puts most images into a few classes)"
        self.estimate_note, self.above = note, None
        self.signals["estimated_accuracy"] = float("nan")
        if not note and self.answer != "mix":
            assert stats is not None and returned is not None
            above = _above(returned, self._threshold(self.answer, stats.threshold))
            if self.answer == "adapted":
                # An estimate of the adapted model far above its clean accuracy, or every image above the threshold,
                # pooled over recent batches, means updates have sharpened its confidences beyond the calibration.
                pooled = self._pooled_estimate = self.config.decay * self._pooled_estimate + float(above.sum())
                self._pooled_n = self.config.decay * self._pooled_n + above.numel()
                estimate = pooled / self._pooled_n
                expected_misses = (1.0 - stats.accuracy) * self._pooled_n
                if estimate > stats.accuracy + DRIFT or (estimate >= 0.995 and expected_misses >= 3):
                    self.estimate_note = "the confidence scale has drifted from the calibration (estimate saturated)"
                    return
            self._quote(above)

    def _quote(self, above: torch.Tensor) -> None:
        """Give ``above`` (per image: counted as right) as the batch's estimate."""
        self.above = above.long()
        self.signals["estimated_accuracy"] = float(above.mean())

    def __repr__(self) -> str:
        return f"Guard({self.config})"


def _subsample(n: int, fraction: float, device: torch.device) -> torch.Tensor:
    """Evenly spaced rows of a batch of ``n``: ``ceil(fraction * n)`` of them, at least 8 (or all)."""
    m = min(n, max(8, math.ceil(fraction * n)))
    return torch.linspace(0, n - 1, m, device=device).round().long()


def _above(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per sample: 1.0 when the maximum softmax probability exceeds ``threshold`` (ATC), else 0.0."""
    return (logits.detach().float().softmax(1).amax(1) > threshold).float()


def make_guard(guard: Guard | GuardConfig | str | None, **overrides: Any) -> Guard | None:
    """A ``Guard`` from a preset name (``default``, ``monitor``, ``fallback``, ``learned``), a config or a guard."""
    if guard is None or isinstance(guard, Guard):
        return guard
    if isinstance(guard, GuardConfig):
        return Guard(guard, **overrides)
    if isinstance(guard, str):
        if guard not in PRESETS:
            raise ConfigError(f"unknown guard {guard!r}; choose one of: {', '.join(PRESETS)}")
        return Guard(PRESETS[guard], **overrides)
    raise ConfigError(f"guard must be a preset name ({', '.join(PRESETS)}), a GuardConfig or a Guard, "
                      f"got {type(guard).__name__}")


def attach_guard(adapted: AdaptedModel, guard: Guard | GuardConfig | str | None, source_model: nn.Module,
                 source_data: SourceData | str | tuple[Any, Any] | None = None) -> Guard | None:
    """Attach ``guard`` (see ``make_guard``) to ``adapted``; ``source_model`` is the model before adaptation."""
    made = make_guard(guard)
    if made is not None:
        if source_data is not None and made.source_data is None:
            from tta.source import as_source_data

            made.source_data = as_source_data(source_data)
        made.attach(adapted, source_model)
    return made
