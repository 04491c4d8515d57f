"""Method settings: frozen dataclasses whose fields are exactly the keys of ``configs/<method>.yaml``.

Values come from the dataclass defaults, then an optional YAML file (``--config``), then ``key=value`` overrides
(``--set``). Unknown keys and badly typed values are ``ConfigError``s naming the valid keys or the expected type.
A config class may list renamed keys in a class-level ``renamed = {"old": "new"}``: the old spelling still works,
with a deprecation warning (``FutureWarning``) naming the new one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from tta.errors import ConfigError

C = TypeVar("C")


def field_names(config_cls: type) -> list[str]:
    """The keys a config class accepts, in declaration order."""
    return [f.name for f in dataclasses.fields(config_cls)]


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is dict:
        return "mapping"
    if origin is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` or raise ``TypeError``; YAML already gave us ints, floats, bools, lists."""
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise TypeError
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _coerce(value, arg)
            except TypeError:
                continue
        raise TypeError
    if origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
        raise TypeError
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise TypeError
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if len(value) != len(args):
            raise TypeError
        return tuple(_coerce(v, a) for v, a in zip(value, args, strict=True))
    if tp is type(None):
        if value is None:
            return None
        raise TypeError
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) and inf as strings
            try:
                return float(value.replace(".inf", "inf"))
            except ValueError:
                raise TypeError from None
        raise TypeError
    if tp is str:
        if isinstance(value, str):
            return value
        raise TypeError
    raise TypeError


def renamed_keys(config_cls: type, values: Mapping[str, Any], source: str = "settings") -> dict[str, Any]:
    """``values`` with the old spellings of ``config_cls.renamed`` replaced by the new ones, each with a
    deprecation warning; ``ConfigError`` when both spellings of one key are given."""
    out = dict(values)
    for old, new in getattr(config_cls, "renamed", {}).items():
        if old not in out:
            continue
        if new in out:
            raise ConfigError(f"{source} sets both {old!r} and {new!r} for {config_cls.__name__}; {old!r} is the old "
                              f"name of {new!r}: keep only {new!r}")
        warnings.warn(f"{old!r} in {source} for {config_cls.__name__} is deprecated; it is now called {new!r}",
                      FutureWarning, stacklevel=3)
        out[new] = out.pop(old)
    return out


def build_config(config_cls: type[C], values: Mapping[str, Any], *, source: str = "settings") -> C:
    """Instantiate ``config_cls`` from ``values`` (missing keys keep their defaults), checking keys and types."""
    values = renamed_keys(config_cls, values, source)
    names = field_names(config_cls)
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(map(repr, unknown))} in {source} for {config_cls.__name__}; "
            f"valid keys are: {', '.join(names)}"
        )
    hints = typing.get_type_hints(config_cls)
    kwargs = {}
    for key, value in values.items():
        try:
            kwargs[key] = _coerce(value, hints[key])
        except TypeError:
            raise ConfigError(
                f"{key}={value!r} in {source} has the wrong type; expected {_type_name(hints[key])}"
            ) from None
    try:
        return config_cls(**kwargs)
    except ValueError as err:  # range checks in __post_init__
        raise ConfigError(f"invalid {source} for {config_cls.__name__}: {err}") from None


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are read as YAML scalars (``1e-3``, ``true``, ``[0.9, 0.99]``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}; write for example --set lr=0.001")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass the path of a YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML ({err}); fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of key: value pairs")
    return data


def resolve_config(
    config_cls: type[C], config_file: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
    base: Mapping[str, Any] | None = None,
) -> C:
    """Defaults, then ``base`` (a preset), then ``config_file``, then ``overrides``: the settings a run will use."""
    values: dict[str, Any] = renamed_keys(config_cls, base or {}, "the preset")
    if config_file is not None:
        source = f"config file {str(config_file)!r}"
        file_values = renamed_keys(config_cls, load_yaml(config_file), source)
        build_config(config_cls, file_values, source=source)  # report file errors first
        values.update(file_values)
    values.update(renamed_keys(config_cls, overrides or {}))
    return build_config(config_cls, values)


def to_dict(config: Any) -> dict[str, Any]:
    """A config dataclass as plain YAML/JSON-friendly values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def config_hash(resolved: Mapping[str, Any]) -> str:
    """A short, stable hash of a resolved run configuration, for telling runs apart in a results table."""
    blob = json.dumps(resolved, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]
