"""Method settings: YAML files equal the dataclass defaults; overrides are checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import tta
from tta.config import build_config, config_hash, parse_overrides, resolve_config, to_dict
from tta.errors import ConfigError
from tta.methods import get_method

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("method", tta.list_methods())
def test_every_method_has_a_yaml_equal_to_its_defaults(method: str) -> None:
    path = CONFIGS / f"{method}.yaml"
    assert path.is_file(), f"configs/{method}.yaml is missing"
    values = yaml.safe_load(path.read_text()) or {}
    assert values == to_dict(get_method(method).Config())


def test_builtin_methods_are_registered() -> None:
    assert {"source", "adabn", "tent"} <= set(tta.list_methods())


def test_unknown_method_names_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown method 'tnet'.*tent"):
        get_method("tnet")


def test_unknown_key_names_the_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"'learning_rate'.*valid keys are: optimizer, lr, betas"):
        resolve_config(get_method("tent").Config, overrides={"learning_rate": 0.1})


def test_overrides_are_parsed_as_yaml_and_typed() -> None:
    cfg = resolve_config(get_method("tent").Config, overrides=parse_overrides(["lr=5e-4", "betas=[0.8, 0.99]"]))
    assert cfg.lr == 5e-4 and cfg.betas == (0.8, 0.99)
    cfg = resolve_config(get_method("adabn").Config, overrides=parse_overrides(["prior_n=.inf", "mode=prior"]))
    assert cfg.prior_n == float("inf") and cfg.mode == "prior"


@pytest.mark.parametrize(("key", "value", "message"), [
    ("lr", "fast", "expected float"),
    ("steps", 1.5, "expected int"),
    ("betas", [0.9], "list of 2 values"),
    ("optimizer", "rmsprop", "'adam' | 'sgd'"),
    ("lr", -1.0, "lr must be > 0"),
])
def test_bad_values_are_rejected(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(get_method("tent").Config, {key: value})


def test_override_syntax_error() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["lr"])


def test_config_file_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "tent.yaml"
    path.write_text("lr: 0.01\nsteps: 3\n")
    cfg = resolve_config(get_method("tent").Config, path, {"steps": 2})
    assert (cfg.lr, cfg.steps) == (0.01, 2)
    path.write_text("lrr: 0.01\n")
    with pytest.raises(ConfigError, match=r"config file .*tent.yaml.*valid keys"):
        resolve_config(get_method("tent").Config, path)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(get_method("tent").Config, tmp_path / "nope.yaml")


def test_config_hash_is_stable_and_sensitive() -> None:
    a = {"method": "tent", "settings": {"lr": 0.001}}
    assert config_hash(a) == config_hash(dict(reversed(list(a.items()))))
    assert config_hash(a) != config_hash({"method": "tent", "settings": {"lr": 0.002}})


def test_config_file_must_be_a_yaml_mapping(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("lr: [0.1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(get_method("tent").Config, path)
    path.write_text("- lr\n- 0.1\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        resolve_config(get_method("tent").Config, path)
