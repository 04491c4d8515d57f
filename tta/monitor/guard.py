"""Guards: watch an adapted model's label-free signals and intervene before adaptation makes it worse.

A guard keeps a frozen copy of the source model and, on every batch, compares the adapted model's prediction with
the source model's on the same images. A batch is *unhealthy* when an enabled rule fires:

- ``collapse``: the adapted predictions' marginal entropy (entropy of the batch's mean prediction) is below
  ``collapse_ratio`` times the larger of two references on the same batch: the source model's, and (for methods
  that update) the *reset model*'s, a copy of the adapted model kept as it was at reset and never updated (for
  Tent: the source weights with the batch's statistics; one more forward per batch). Adaptation is then putting
  the images into fewer classes than both models it started from: the signature of entropy-minimisation
  collapse. The second reference matters under strong shift, where the source model itself puts most images into
  a few classes (so a collapse relative to it alone comes too late); both being measured on the same batch, a
  stream whose batches really hold few classes does not fire the rule;
- ``atc`` (needs source data): the ATC accuracy estimate of the adapted predictions is below the source model's on
  the same batch by more than ``atc_z`` standard errors of the paired difference (per sample: whether the adapted
  model is above the threshold minus whether the source model is), i.e. by more than the batch's sampling noise.
  Both use the threshold calibrated on clean source data;
- ``drift`` (needs source data and a method that updates): the adapted model changes the class of samples on
  which the *reset model* is confident (above the threshold) more often than the reset model is expected to be
  wrong there, ``(1 - precision) * confident fraction`` (``precision``: the source model's accuracy above the
  threshold on the clean calibration images), by more than ``drift_z`` standard errors. The updates have then
  moved the model away from its starting point on samples where that starting point is reliable. The reset model
  is used rather than the source model because under shift the source model is confidently wrong (its
  confident samples are far less often right than on clean data), while a model that adapts its statistics (the
  reset state of Tent and its kin) stays close to its clean calibration.

Every threshold is relative to the source or reset model on the same batch, calibrated on clean source data, or
the sampling error of the batch; none is tuned on a benchmark. Rules that compare with the source model's *estimated*
accuracy in absolute terms are deliberately absent: under a strong shift the source model is confidently wrong
(its ATC estimate can exceed its accuracy several times over), so such rules would block exactly the batches on
which adaptation helps most. On an unhealthy batch the guard's actions (each can be switched off):

- ``skip``: the batch's update is not applied (nor is it after a rollback or reset);
- ``fallback``: the source model's prediction is returned for the batch;
- ``rollback``: the adapted state returns to the last snapshot that produced a healthy batch;
- ``reset``: after ``reset_after`` unhealthy batches in a row (rolling back did not help), ``reset()``;
- ``probation`` (with ``fallback``): after an unhealthy batch, the next ``probation`` batches are answered by the
  source model even when they are healthy (the adapted model goes on updating, and a further unhealthy batch
  starts the count again). The first batch after a rollback comes from the restored snapshot, whose update has
  just been judged unhealthy: its predictions are trusted again only once a state the guard did not roll back has
  produced a healthy batch. Without it, a model that alternates between a healthy restored state and an unhealthy
  update would answer half the batches from a state that is, on mild shifts, no better than where it started,
  which can be below the source model (Tent's reset state normalises with batch statistics).

Calibration wants *held-out* clean labelled images (a validation split), not the images the model was trained on:
on training images the source model is nearly always right, which makes the threshold too low and the estimates
too high (``calibrate`` warns when the source accuracy there is above 99 %). Without source data the ``atc`` and
``drift`` rules and the accuracy estimate are off and ``collapse`` alone guards the run.
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
from tta.monitor.signals import MovingAverage, batch_signals, confident_disagreement, paired_gain

if TYPE_CHECKING:
    from tta.core.base import AdaptedModel, StepOutput
    from tta.source import SourceData


@dataclass(frozen=True)
class GuardConfig:
    """Rules and actions of a ``Guard`` (see the module docstring); ratios and margins are fractions."""

    collapse_ratio: float = 0.9
    atc_z: float = 3.0
    drift_z: float = 3.0
    skip: bool = True
    fallback: bool = True
    rollback: bool = True
    reset: bool = True
    reset_after: int = 5
    probation: int = 1
    decay: float = 0.9
    calibration_images: int = 2000

    def __post_init__(self) -> None:
        try:
            check_range("collapse_ratio", self.collapse_ratio, low=0.0, high=1.0)
            check_range("atc_z", self.atc_z, low=0.0, allow_inf=True)
            check_range("drift_z", self.drift_z, low=0.0, allow_inf=True)
            check_range("decay", self.decay, low=0.0, high=1.0, high_open=True)
        except ValueError as err:
            raise ConfigError(f"guard setting: {err}") from None
        for name, low in (("reset_after", 1), ("calibration_images", 1), ("probation", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low or value > 1_000_000:
                raise ConfigError(f"guard setting {name} must be an integer in [{low}, 1000000], got {value!r}")


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
    the rules that fired on the last batch; ``guard.stats`` the source calibration (``None`` without source data);
    ``guard.source_model`` and ``guard.reset_model`` the two frozen references (the latter ``None`` for methods
    that never update).
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
        self.reset_model: AdaptedModel | None = None  # the adapted model as reset, never updated (the reset model)
        self.stats: SourceStats | None = None
        self.signals: dict[str, float] = {}
        self.averages = MovingAverage(config.decay)
        self.unhealthy: list[str] = []
        self.above: torch.Tensor | None = None  # per sample of the last returned prediction: confidence > threshold
        self._good: dict[str, Any] | None = None
        self._bad_run = 0
        self._probation = 0  # healthy batches still to be answered by the source model
        self._resets_seen = 0
        self._fallback_logits: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------ setup
    def attach(self, adapted: AdaptedModel, source_model: nn.Module) -> None:
        """Keep a frozen copy of ``source_model`` (the model before adaptation) and calibrate on source data."""
        model = copy.deepcopy(source_model).eval().requires_grad_(False)
        source = self.source_data or adapted.source_data
        self.stats = None if source is None else calibrate(model, source, self.config.calibration_images)
        self.source_model = model
        self.reset_model = None
        if adapted.update != "none":
            adapted.guard = None  # the copy must not carry a guard
            self.reset_model = copy.deepcopy(adapted)
            self.reset_model.reset()  # the state every update starts from
            self.reset_model.requires_grad_(False)
        self._resets_seen = adapted.counters.resets
        adapted.guard = self

    # ------------------------------------------------------------------------------------------------ hooks
    def before_update(self, adapted: AdaptedModel, x: torch.Tensor, domain: torch.Tensor | None,
                      out: StepOutput) -> bool:
        """Read the batch's signals; act on an unhealthy batch. Returns whether the update may go ahead."""
        if adapted.counters.resets != self._resets_seen:  # reset since the last batch: history no longer applies
            self._good, self._bad_run, self._probation = None, 0, 0
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
            reset = None if self.reset_model is None else self.reset_model.to(x.device).predict(x, domain)
        threshold = None if self.stats is None else self.stats.threshold
        mine = batch_signals(out.logits, src, threshold)
        theirs = batch_signals(src, None, threshold)
        names = list(mine) + [f"source_{k}" for k in theirs]
        tensors = [*mine.values(), *theirs.values()]
        if reset is not None:
            names.append("reset_marginal_entropy")
            tensors.append(batch_signals(reset)["marginal_entropy"])
            if threshold is not None:
                names += ["reset_disagreement", "reset_confident", "reset_disagreement_se"]
                tensors += list(confident_disagreement(out.logits, reset, threshold))
        if threshold is not None:
            names += ["estimated_gain", "estimated_gain_se"]
            tensors += list(paired_gain(out.logits, src, threshold))
        values = torch.stack(tensors).tolist()  # the one synchronisation of a batch
        self.signals = dict(zip(names, values, strict=True))
        self.averages.update(self.signals)
        self.unhealthy = self._rules(self.signals)
        cfg = self.config
        if not self.unhealthy:
            self._bad_run = 0
            if cfg.rollback:
                self._good = adapted._capture()  # the state that just produced a healthy batch
            on_probation = cfg.fallback and self._probation > 0
            self._probation = max(self._probation - 1, 0)
            self._fallback_logits = src if on_probation else None
            self.above = self._above(src if on_probation else out.logits, threshold)
            return True
        self._bad_run += 1
        self._probation = cfg.probation
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

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What the guard learned along the stream: its settings, the last healthy snapshot, the run of unhealthy
        batches and the moving averages (``adapted.save`` includes it). The source copy and the calibration are
        not saved: ``attach`` rebuilds them from the source model and source data."""
        return {"config": dataclasses.asdict(self.config), "good": copy.deepcopy(self._good),
                "bad_run": self._bad_run, "probation": self._probation, "averages": dict(self.averages.values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned (after ``attach``); settings other than this guard's are an error."""
        if state.get("config") != dataclasses.asdict(self.config):
            raise ConfigError(f"this guard state was saved with other guard settings ({state.get('config')}); "
                              f"attach a guard with those settings first")
        self._good = copy.deepcopy(state["good"])
        self._bad_run = int(state["bad_run"])
        self._probation = int(state.get("probation", 0))
        self.averages.values = dict(state["averages"])

    # ---------------------------------------------------------------------------------------------- helpers
    def _rules(self, s: dict[str, float]) -> list[str]:
        cfg = self.config
        fired = []
        reference = max(s["source_marginal_entropy"], s.get("reset_marginal_entropy", 0.0))
        if s["marginal_entropy"] < cfg.collapse_ratio * reference:
            fired.append("collapse")
        if "estimated_gain" in s and s["estimated_gain"] < -cfg.atc_z * s["estimated_gain_se"]:
            fired.append("atc")
        if "reset_disagreement" in s:
            expected = (1 - self.stats.precision) * s["reset_confident"]  # type: ignore[union-attr]
            if s["reset_disagreement"] - expected > cfg.drift_z * s["reset_disagreement_se"]:
                fired.append("drift")
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
