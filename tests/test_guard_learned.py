"""The guard's learned rule (GuardConfig(rule="learned")): thresholds fitted on synthetic shifts of the calibration
images, where the guard can see who is right."""

from __future__ import annotations

import pytest
import torch

import tta
from tta.errors import ConfigError
from tta.monitor import GuardConfig
from tta.monitor.guard import MIN_DISAGREEMENT
from tta.monitor.learn import ShiftOutcome, fit_rule, shift_outcomes


def _outcome(corruption: str, ratio: float, source: float, mix: float, adapted: float) -> ShiftOutcome:
    return ShiftOutcome(corruption, 3, ratio, source, mix, adapted, 250)


def _three_regimes() -> list[ShiftOutcome]:
    """Near the clean data adaptation loses, on mild shifts the average wins, on strong shifts adaptation wins."""
    near = [_outcome(f"near{i}", 0.5 + 0.1 * i, 0.90, 0.88, 0.80) for i in range(5)]
    mild = [_outcome(f"mild{i}", 1.2 + 0.1 * i, 0.60, 0.75, 0.70) for i in range(5)]
    strong = [_outcome(f"strong{i}", 3.0 + 0.5 * i, 0.30, 0.50, 0.70) for i in range(5)]
    return near + mild + strong


def test_the_fitted_thresholds_separate_the_regimes_where_each_answer_is_best() -> None:
    rule = fit_rule(_three_regimes())
    assert 0.9 < rule.near_source < 1.2 and 1.6 < rule.mild < 3.0
    assert rule.loss == 0.0 and rule.domains == 15


def test_a_corruption_left_out_does_not_move_the_thresholds() -> None:
    """A mild-looking domain on which both adaptation and the average lose pulls ``near_source`` above it; left
    out, it has no say."""
    outlier = _outcome("jpeg", 1.15, 0.90, 0.80, 0.70)
    with_it = fit_rule([*_three_regimes(), outlier])
    assert with_it.near_source > 1.15 and with_it.loss == 0.0
    assert fit_rule([*_three_regimes(), outlier], exclude=["jpeg"]) == fit_rule(_three_regimes())
    with pytest.raises(ConfigError, match="no synthetic domain"):
        fit_rule([outlier], exclude=["jpeg"])


def test_the_promise_comes_before_accuracy() -> None:
    """Stronger shifts on which the average is far better than adaptation, after ones on which it keeps all of
    adaptation's gain but one point. The average may answer both (more accurate) only if that point is within
    10 % of the gain; otherwise the adapted model answers both (the bands are contiguous)."""
    better = [_outcome(f"b{i}", 2.4 + 0.1 * i, 0.40, 0.70, 0.60) for i in range(4)]
    big = [_outcome(f"g{i}", 2.0 + 0.1 * i, 0.40, 0.59, 0.60) for i in range(4)]  # gain 20, the average keeps 19
    small = [_outcome(f"s{i}", 2.0 + 0.1 * i, 0.55, 0.59, 0.60) for i in range(4)]  # gain 5, the average keeps 4
    assert fit_rule(big + better).near_source < 2.0 < 2.7 < fit_rule(big + better).mild
    assert fit_rule(small + better).mild < 2.0


def test_the_rule_setting_is_validated() -> None:
    with pytest.raises(ConfigError, match="rule must be one of"):
        GuardConfig(rule="tuned")
    with pytest.raises(ConfigError, match="shift_images"):
        GuardConfig(rule="learned", shift_images=0)


def test_the_synthetic_outcomes_are_deterministic(bn_model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    source = tta.source.as_source_data((torch.randint(0, 256, (40, 16, 16, 3), generator=g, dtype=torch.uint8).numpy(),
                                        torch.randint(0, 10, (40,), generator=g).numpy()))
    runs = []
    for _ in range(2):
        adapted = tta.adapt(bn_model, "tent", lr=0.01)
        runs.append(shift_outcomes(adapted, bn_model.eval(), source, 0.8, ["gaussian_noise", "contrast"], (1, 5), 40,
                                   16, MIN_DISAGREEMENT))
    assert runs[0] == runs[1] and len(runs[0]) == 4
    assert all(0.0 <= o.source <= 1.0 and o.disagreement >= 0.0 for o in runs[0])


def test_grey_calibration_images_are_refused_with_the_fix() -> None:
    """The corruptions need RGB images: a one-channel model's calibration images get a ConfigError naming the fix."""
    from conftest import TinyBNNet

    g = torch.Generator().manual_seed(5)
    grey = (torch.randint(0, 256, (32, 16, 16, 1), generator=g, dtype=torch.uint8).numpy(),
            torch.randint(0, 10, (32,), generator=g).numpy())
    with pytest.raises(ConfigError, match="rule='fixed'"):
        tta.adapt(TinyBNNet(in_channels=1).eval(), "tent", guard="learned", source_data=grey)
