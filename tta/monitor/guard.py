"""Guards: watch an adapted model's label-free signals and intervene before adaptation makes it worse.

A guard keeps a frozen copy of the source model and, on every batch, compares the adapted model's prediction with
the source model's on the same images. A batch is *unhealthy* when any enabled rule fires:

- ``collapse``: the adapted predictions' marginal entropy (entropy of the batch's mean prediction) is below
  ``collapse_ratio`` times the source model's on the same batch: adaptation is putting the images into fewer
  classes than the model it started from (the signature of entropy-minimisation collapse);
- ``atc``: the ATC accuracy estimate of the adapted predictions is below the source model's estimate on the same
  batch by more than ``atc_margin`` (both with the threshold calibrated on clean source data; adapted models are
  over- rather than under-confident, so this only fires on clear degradation);
- ``disagreement``: the adapted model contradicts the source model where the source model is confident (above
  the ATC threshold) more often than the source model is wrong there: on ``confident_disagreement`` minus
  ``(1 - precision) * source_estimated_accuracy`` > ``disagreement_margin``, ``precision`` being the source
  model's accuracy above the threshold on clean source data. Adaptation that gains on the source model's
  uncertain samples but breaks its confident ones is caught here, before it shows as low confidence;
- ``agreement``: the agreement with the source model is so low that the adapted model must be less accurate than
  the source one: both models are right only where they agree, so ``acc_adapted <= agreement + 1 - acc_source``,
  which is below ``acc_source`` when ``agreement < 2 * acc_source - 1`` (``acc_source`` being its ATC estimate).

Every threshold is relative to the source model on the same batch or calibrated on clean source data; none is
tuned on a benchmark. On an unhealthy batch the guard's actions (each can be switched off):

- ``skip``: the batch's update is not applied (nor is it after a rollback or reset);
- ``fallback``: the source model's prediction is returned for the batch;
- ``rollback``: the adapted state returns to the last snapshot that produced a healthy batch;
- ``reset``: after ``reset_after`` unhealthy batches in a row (rolling back did not help), ``reset()``.

Calibration needs clean source data (``source_data=`` of the guard or of the adapted model); without it the
``atc``, ``disagreement`` and ``agreement`` rules and the accuracy estimate are off and only ``collapse``
guards the run.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tta.core.validate import check_range
from tta.errors import ConfigError
from tta.monitor.calibrate import SourceStats, calibrate
from tta.monitor.signals import MovingAverage, batch_signals

if TYPE_CHECKING:
    from tta.core.base import AdaptedModel, StepOutput
    from tta.source import SourceData


@dataclass(frozen=True)
class GuardConfig:
    """Rules and actions of a ``Guard`` (see the module docstring); ratios and margins are fractions."""

    collapse_ratio: float = 0.9
    atc_margin: float = 0.05
    disagreement_margin: float = 0.02
    agreement_rule: bool = True
    skip: bool = True
    fallback: bool = True
    rollback: bool = True
    reset: bool = True
    reset_after: int = 5
    decay: float = 0.9
    calibration_images: int = 2000

    def __post_init__(self) -> None:
        try:
            check_range("collapse_ratio", self.collapse_ratio, low=0.0, high=1.0)
            check_range("atc_margin", self.atc_margin, low=0.0, high=1.0)
            check_range("disagreement_margin", self.disagreement_margin, low=0.0, high=1.0)
            check_range("decay", self.decay, low=0.0, high=1.0, high_open=True)
        except ValueError as err:
            raise ConfigError(f"guard setting: {err}") from None
        for name in ("reset_after", "calibration_images"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"guard setting {name} must be an integer >= 1, got {value!r}")


PRESETS: dict[str, GuardConfig] = {
    # every rule and every action
    "default": GuardConfig(),
    # signals and estimates only: never changes what the adapted model does
    "monitor": GuardConfig(skip=False, fallback=False, rollback=False, reset=False),
    # keep adapting whatever happens, but answer with the source model on unhealthy batches
    "fallback": GuardConfig(skip=False, rollback=False, reset=False),
}


class Guard:
    """Label-free monitor of an adapted model with actions when a signal crosses its threshold.

    ``guard.signals`` holds the last batch's signals, ``guard.averages`` their moving averages, ``guard.unhealthy``
    the rules that fired on the last batch; ``guard.stats`` the source calibration (``None`` without source data).
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
        self.signals: dict[str, float] = {}
        self.averages = MovingAverage(config.decay)
        self.unhealthy: list[str] = []
        self.above: torch.Tensor | None = None  # per sample of the last returned prediction: confidence > threshold
        self._good: dict[str, Any] | None = None
        self._bad_run = 0
        self._resets_seen = 0
        self._fallback_logits: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------ setup
    def attach(self, adapted: AdaptedModel, source_model: nn.Module) -> None:
        """Keep a frozen copy of ``source_model`` (the model before adaptation) and calibrate on source data."""
        model = copy.deepcopy(source_model).eval().requires_grad_(False)
        source = self.source_data or adapted.source_data
        self.stats = None if source is None else calibrate(model, source, self.config.calibration_images)
        self.source_model = model
        self._resets_seen = adapted.counters.resets
        adapted.guard = self

    # ------------------------------------------------------------------------------------------------ hooks
    def before_update(self, adapted: AdaptedModel, x: torch.Tensor, domain: torch.Tensor | None,
                      out: StepOutput) -> bool:
        """Read the batch's signals; act on an unhealthy batch. Returns whether the update may go ahead."""
        if adapted.counters.resets != self._resets_seen:  # reset since the last batch: history no longer applies
            self._good, self._bad_run = None, 0
            self.averages.clear()
            self._resets_seen = adapted.counters.resets
        if out.logits.ndim != 2 or out.logits.shape[0] != x.shape[0]:
            # The method predicts only after its update (MEMO): nothing to judge before it.
            self._fallback_logits = None
            return True
        assert self.source_model is not None  # attach() ran
        with torch.no_grad():
            self.source_model.to(x.device)
            src = self.source_model(x)
        threshold = None if self.stats is None else self.stats.threshold
        mine = batch_signals(out.logits, src, threshold)
        theirs = batch_signals(src, None, threshold)
        names = list(mine) + [f"source_{k}" for k in theirs]
        values = torch.stack([*mine.values(), *theirs.values()]).tolist()  # the one synchronisation of a batch
        self.signals = dict(zip(names, values, strict=True))
        self.averages.update(self.signals)
        self.unhealthy = self._rules(self.signals)
        cfg = self.config
        if not self.unhealthy:
            self._bad_run = 0
            if cfg.rollback:
                self._good = adapted._capture()  # the state that just produced a healthy batch
            self._fallback_logits = None
            self.above = self._above(out.logits, threshold)
            return True
        self._bad_run += 1
        self._fallback_logits = src if cfg.fallback else None
        self.above = self._above(src if cfg.fallback else out.logits, threshold)
        if cfg.reset and self._bad_run >= cfg.reset_after:
            adapted.reset()  # counted in adapted.counters.resets
            self._good, self._bad_run = None, 0
            self._resets_seen = adapted.counters.resets
            return False
        if cfg.rollback and self._good is not None:
            adapted._load(self._good, True, False)
            adapted.counters.rollbacks += 1
            return False
        return not cfg.skip

    def after_batch(self, adapted: AdaptedModel, out: StepOutput) -> StepOutput:
        """The batch's final output: the source model's prediction when the batch was unhealthy (``fallback``)."""
        if self._fallback_logits is None:
            return out
        adapted.counters.fallbacks += 1
        out = dataclasses.replace(out, logits=self._fallback_logits)
        self._fallback_logits = None
        return out

    # ---------------------------------------------------------------------------------------------- helpers
    def _rules(self, s: dict[str, float]) -> list[str]:
        cfg = self.config
        fired = []
        if s["marginal_entropy"] < cfg.collapse_ratio * s["source_marginal_entropy"]:
            fired.append("collapse")
        if "estimated_accuracy" in s:
            if s["estimated_accuracy"] < s["source_estimated_accuracy"] - cfg.atc_margin:
                fired.append("atc")
            expected_wrong = (1 - self.stats.precision) * s["source_estimated_accuracy"]  # type: ignore[union-attr]
            if s["confident_disagreement"] - expected_wrong > cfg.disagreement_margin:
                fired.append("disagreement")
            if cfg.agreement_rule and s["agreement"] < 2 * s["source_estimated_accuracy"] - 1:
                fired.append("agreement")
        return fired

    @staticmethod
    def _above(logits: torch.Tensor, threshold: float | None) -> torch.Tensor | None:
        if threshold is None:
            return None
        return (logits.detach().float().softmax(1).amax(1) > threshold).long()

    def __repr__(self) -> str:
        return f"Guard({self.config})"


def make_guard(guard: Guard | GuardConfig | str | None, **overrides: Any) -> Guard | None:
    """A ``Guard`` from a preset name (``default``, ``monitor``, ``fallback``), a config or a guard."""
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
