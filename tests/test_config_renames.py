"""Renamed method settings: one meaning per name, the old spellings still accepted with a deprecation warning."""

from __future__ import annotations

import warnings

import pytest
from torch import nn

import tta
from tta.config import build_config, resolve_config
from tta.errors import ConfigError
from tta.methods import get_method

RENAMES = [
    ("context-norm", "update", "stats_update", "ema"),
    ("dsbn", "stats_momentum", "stats_rate", 0.3),
    ("adabn", "stats_momentum", "stats_rate", 0.2),
    ("roid", "momentum_probs", "probs_momentum", 0.8),
    ("roid", "momentum_src", "src_momentum", 0.95),
]


@pytest.mark.parametrize(("method", "old", "new", "value"), RENAMES)
def test_old_spelling_gives_the_same_config_with_a_deprecation_warning(method: str, old: str, new: str,
                                                                       value: object) -> None:
    cls = get_method(method).Config
    with pytest.warns(FutureWarning, match=f"'{old}'.*now called '{new}'"):
        old_config = resolve_config(cls, overrides={old: value})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new spelling warns about nothing
        assert resolve_config(cls, overrides={new: value}) == old_config
    assert getattr(old_config, new) == value and getattr(old_config, new) != getattr(cls(), new)


def test_old_spelling_in_a_config_file_and_both_spellings_refused(tmp_path) -> None:
    cls = get_method("adabn").Config
    path = tmp_path / "adabn.yaml"
    path.write_text("mode: ema\nstats_momentum: 0.2\n")
    with pytest.warns(FutureWarning, match="config file"):
        assert resolve_config(cls, path).stats_rate == 0.2
    with pytest.raises(ConfigError, match="keep only 'stats_rate'"):
        build_config(cls, {"stats_momentum": 0.2, "stats_rate": 0.2})


def test_old_spelling_through_tta_adapt(bn_model: nn.Module) -> None:
    with pytest.warns(FutureWarning):
        adapted = tta.adapt(bn_model, "dsbn", update="ema")
    assert adapted.config.stats_update == "ema"
    assert all(layer.stats_update == "ema" for layer in adapted.model.layers())
