"""``RunSpec``: one frozen, nested, validated description of a run.

A run is a model, the data it adapts on, the order of the stream, a method with its settings, clean source data
for the methods that need it, how it is evaluated and where its results go. The command line builds a ``RunSpec``
from its options (``RunSpec.from_options``), ``tta sweep`` one per grid point (the same option names), a YAML file
from its keys (``RunSpec.from_yaml``: nested sections as ``to_dict`` writes them, or the flat option names), and
Python users directly; ``tta.run(spec)`` executes it. Everything that can be checked without loading data or models
is checked once, when the spec is built, with errors that name the field and the fix.

``spec.key`` is the run's identity: a hash of what the run computes (not of where it runs: ``device``,
``download``, nor of where its results go: the ``output`` part).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePath
from typing import Any

import yaml

from tta.errors import ConfigError


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


@dataclass(frozen=True)
class ModelSpec:
    """The model: a zoo name (robustbench, torchvision, timm, ``digits-cnn``; None: the benchmark's default), or a
    local ``checkpoint`` with its ``arch``."""

    name: str | None = None
    checkpoint: str | None = None
    arch: str | None = None


@dataclass(frozen=True)
class DataSpec:
    """The images: a named ``benchmark`` (its ``corruptions`` x ``severities``, read from files in ``data_dir`` or
    ``generate``d on the fly from the ``clean`` test set with seed ``data_seed``), or your own ``data``
    (``folder:PATH``, ``csv:PATH``, ``npz:PATH``; the benchmark then only picks the model family)."""

    benchmark: str = "cifar10c"
    data: str | None = None
    data_dir: str = "data"
    corruptions: tuple[str, ...] | None = None
    severities: tuple[int, ...] | None = None
    n_examples: int | None = None
    generate: bool = False
    data_seed: int = 0
    clean: str | None = None
    frost_images: str | None = None
    download: bool = True

    def __post_init__(self) -> None:
        _positive("n_examples", self.n_examples)


@dataclass(frozen=True)
class StreamSpec:
    """The order of the stream: its ``setting`` (``tta.data.settings``), batch size, the run's ``seed`` (it shuffles
    the mixed settings and seeds torch), the label-shift ``dirichlet`` and, for your own data, ``order``
    (``shuffle`` or ``file``). ``recurring`` visits the continual stream ``visits`` times (``tta.data.recurring``);
    ``ccc`` is a CCC-style stream of ``length`` images near the source accuracy ``baseline``, a new corruption
    every ``speed`` images, one result row per ``accuracy_window`` images (``tta.data.ccc``)."""

    setting: str = "per-domain"
    batch_size: int = 200
    seed: int = 1
    dirichlet: float = 0.0
    order: str = "shuffle"
    visits: int = 20
    baseline: int = 20
    speed: int = 2000
    length: int = 300_000
    accuracy_window: int = 1000

    def __post_init__(self) -> None:
        from tta.data.ccc import check_ccc
        from tta.data.order import ORDERS
        from tta.data.settings import LONG_SETTINGS, check_setting

        for name in ("batch_size", "visits", "length", "accuracy_window"):
            _positive(name, getattr(self, name))
        if self.setting == "ccc":
            try:
                check_ccc(self.baseline, self.speed, self.batch_size, self.accuracy_window)
            except ConfigError as err:
                raise ValueError(str(err)) from None
        if not (math.isfinite(self.dirichlet) and self.dirichlet >= 0):
            raise ValueError(f"dirichlet must be a finite number >= 0 (0 = sorted by label), got {self.dirichlet}")
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        try:
            if self.setting not in LONG_SETTINGS:
                check_setting(self.setting)
        except ConfigError as err:
            raise ValueError(str(err)) from None


@dataclass(frozen=True)
class MethodSpec:
    """The method: its ``name``, its ``settings`` (over the ``preset`` and the YAML ``config`` file), the sliding
    ``window`` for single images (None: 64 at batch size 1 for the methods that adapt, else off) and a ``guard``."""

    name: str = "tent"
    settings: dict[str, Any] = field(default_factory=dict)
    config: str | None = None
    preset: str | None = None
    window: int | None = None
    guard: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "settings", dict(self.settings))
        if not all(isinstance(k, str) for k in self.settings):
            raise ValueError("settings must be a mapping of setting name: value")
        if self.window is not None and not 0 <= self.window <= 4096:
            raise ValueError(f"window must be from 0 to 4096, got {self.window}")
        if self.guard is not None:
            from tta.monitor import PRESETS

            if self.guard not in PRESETS:
                raise ValueError(f"guard must be one of {', '.join(PRESETS)}, got {self.guard!r}")

    def __hash__(self) -> int:  # settings is a dict: hash its content
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))


@dataclass(frozen=True)
class SourceSpec:
    """Clean source data for the methods that need it (EATA's Fisher, a guard's calibration): ``cifar10``,
    ``cifar100`` (training split), ``npz:PATH`` or ``folder:PATH``."""

    data: str | None = None


@dataclass(frozen=True)
class EvaluationSpec:
    """How the run is evaluated: when the method is ``reset``, on which ``device``, and the ``protocol``
    (``offline``, or ``online`` at ``stream_speed`` with the step's ``cost`` counted or timed: ``tta.run.online``)."""

    reset: str = "domain"
    device: str = "auto"
    protocol: str = "offline"
    stream_speed: float = 1.0
    cost: str = "counted"

    def __post_init__(self) -> None:
        from tta.run.engine import RESET_POLICIES
        from tta.run.online import check_protocol

        if self.reset not in RESET_POLICIES:
            raise ValueError(f"reset must be one of {', '.join(RESET_POLICIES)}, got {self.reset!r}")
        try:
            check_protocol(self.protocol, self.stream_speed, self.cost)
        except ConfigError as err:
            raise ValueError(str(err)) from None


@dataclass(frozen=True)
class OutputSpec:
    """Where the results go: the CSV ``out`` (None: ``results/<method>_<model>_<time>.csv``), whether to
    ``resume`` a run it holds, the per-``batches`` accuracy file, a ``report`` directory, a progress bar, and how
    often a long stream (``recurring``, ``ccc``) saves the checkpoint it resumes from (``checkpoint_every``
    seconds)."""

    out: str | None = None
    resume: bool = False
    batches: bool = False
    report: str | None = None
    progress: bool = False
    checkpoint_every: float = 60.0


SECTIONS: dict[str, type] = {"model": ModelSpec, "data": DataSpec, "stream": StreamSpec, "method": MethodSpec,
                             "source": SourceSpec, "evaluation": EvaluationSpec, "output": OutputSpec}

# option name (``tta adapt --option``, grid key, flat YAML key) -> (section, field)
OPTIONS: dict[str, tuple[str, str]] = {
    "method": ("method", "name"), "benchmark": ("data", "benchmark"),
    "model": ("model", "name"), "checkpoint": ("model", "checkpoint"), "arch": ("model", "arch"),
    **{name: ("data", name) for name in ("data", "data_dir", "corruptions", "severities", "n_examples", "generate",
                                         "data_seed", "clean", "frost_images", "download")},
    **{name: ("stream", name) for name in ("setting", "batch_size", "seed", "dirichlet", "order", "visits",
                                           "baseline", "speed", "length", "accuracy_window")},
    "set": ("method", "settings"),
    **{name: ("method", name) for name in ("config", "preset", "window", "guard")},
    "source_data": ("source", "data"),
    **{name: ("evaluation", name) for name in ("reset", "device", "protocol", "stream_speed", "cost")},
    **{name: ("output", name) for name in ("out", "resume", "batches", "report", "progress", "checkpoint_every")},
}
# old spellings of an option: (the option now, deprecated?); the method-setting aliases go to ``set``
ALIASES: dict[str, tuple[str, bool]] = {
    "corruption": ("benchmark", True), "source": ("clean", True),
    "contexts": ("set.contexts", False), "afn_checkpoint": ("set.afn_checkpoint", False),
}
# options about one invocation's files rather than the run itself: a sweep decides them for every run
INVOCATION_OPTIONS: tuple[str, ...] = tuple(k for k, (s, _) in OPTIONS.items() if s == "output")
GRID_KEYS: tuple[str, ...] = (*(k for k in OPTIONS if k not in INVOCATION_OPTIONS), *ALIASES)
# where a run gets its inputs, not what it computes: left out of the run's key
_NOT_IN_KEY = ("device", "download")


def option_name(key: Any) -> str:
    """An option as written (``data-dir``, ``--data-dir``) in its canonical spelling (``data_dir``)."""
    return str(key).strip().lstrip("-").replace("-", "_")


def deprecated(old: str, new: str) -> None:
    """Warn once per call site that option ``old`` is spelled ``new`` now (the old spelling keeps working)."""
    warnings.warn(f"option {old!r} is deprecated and will be removed; use {new!r} instead", FutureWarning,
                  stacklevel=3)


def _listify(value: Any, cast: type) -> Any:
    """``"fog,snow"``, ``5`` or ``[5, 3]`` as a list (``None`` stays ``None``)."""
    if value is None or isinstance(value, (list, tuple)):
        return value
    if isinstance(value, str):
        try:
            return [cast(v.strip()) for v in value.split(",") if v.strip()]
        except ValueError:
            return value  # left for the type check to report
    return [value]


@dataclass(frozen=True)
class RunSpec:
    """One run, validated when built (see the module doc); ``RunSpec()`` is ``tta adapt``'s defaults."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    stream: StreamSpec = field(default_factory=StreamSpec)
    method: MethodSpec = field(default_factory=MethodSpec)
    source: SourceSpec = field(default_factory=SourceSpec)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    output: OutputSpec = field(default_factory=OutputSpec)

    def __hash__(self) -> int:
        return hash((self.key, self.model, self.evaluation, self.output))

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"RunSpec.{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        self._check()

    # --- building -------------------------------------------------------------------------------------------

    @classmethod
    def from_options(cls, options: Mapping[str, Any], where: str = "the options") -> RunSpec:
        """A spec from flat option names (``tta adapt``'s, with dashes or underscores; ``set`` a mapping or a list of
        ``KEY=VALUE``, ``set.KEY`` one setting; old spellings with a deprecation warning). ``where`` names the
        origin in error messages (e.g. ``the grid run seed=2``)."""
        from tta.config import parse_overrides

        values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        settings: dict[str, Any] = {}
        given = {option_name(k): str(v) if isinstance(v, PurePath) else v for k, v in options.items()}
        for key, value in given.items():
            if key in ALIASES and value is None:
                continue
            if key in ALIASES:
                new, is_deprecated = ALIASES[key]
                if is_deprecated:
                    deprecated(key, new)
                if new in given:
                    raise ConfigError(f"{key} and {new} in {where} are the same option; keep only {new}")
                key = new
            if key.startswith("set."):
                settings[key[4:]] = value
                continue
            if key == "set":
                if value is None:
                    value = {}
                if isinstance(value, (list, tuple)):
                    value = parse_overrides(map(str, value))
                if not isinstance(value, Mapping):
                    raise ConfigError(f"set in {where} must be a mapping of method setting: value, e.g. "
                                      "set: {lr: 0.001}")
                settings = {**dict(value), **settings}
                continue
            if key not in OPTIONS:
                raise ConfigError(f"unknown option {key!r} in {where}; valid options are: {', '.join(GRID_KEYS)} "
                                  f"(and set.KEY for a method setting)")
            section, name = OPTIONS[key]
            values[section][name] = value
        values["method"]["settings"] = settings
        data = values["data"]
        for name, cast in (("corruptions", str), ("severities", int)):
            if name in data:
                data[name] = _listify(data[name], cast)
        method = str(values["method"].get("name", MethodSpec.name))
        for alias in ("contexts", "afn_checkpoint"):
            if alias in given and given[alias] is not None:
                _check_alias(alias, method, where)
        return cls._build(values, where)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "the run spec") -> RunSpec:
        """A spec from nested sections as ``to_dict`` writes them, or from flat option names (``from_options``);
        the YAML written beside results holds its spec under ``spec:``."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where} must be a mapping of section: values, got {type(data).__name__}")
        if isinstance(data.get("spec"), Mapping):
            data = data["spec"]
        nested = [k for k, v in data.items() if k in SECTIONS and isinstance(v, Mapping)]
        if not nested:
            return cls.from_options(data, where)
        flat = [k for k in data if k not in nested]
        if flat:
            raise ConfigError(f"{where} mixes sections ({', '.join(nested)}) with loose keys ({', '.join(flat)}); "
                              f"put every key in its section: {', '.join(SECTIONS)}")
        return cls._build({k: dict(v) for k, v in data.items()}, where, nested=True)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunSpec:
        """A spec from a YAML file: one written beside a run's results (re-runs it), or one of your own."""
        from tta.config import load_yaml

        return cls.from_dict(load_yaml(path), f"spec file {str(path)!r}")

    @classmethod
    def _build(cls, values: Mapping[str, Mapping[str, Any]], where: str, nested: bool = False) -> RunSpec:
        from tta.config import build_config

        parts = {}
        for name, section in SECTIONS.items():
            part = dict(values.get(name) or {})
            if name == "method" and not isinstance(part.get("settings", {}), Mapping):
                raise ConfigError(f"method.settings in {where} must be a mapping of setting: value")
            parts[name] = build_config(section, part, source=f"the {name} part of {where}" if nested else where)
        return cls(**parts)

    def replace(self, **sections: Mapping[str, Any]) -> RunSpec:
        """A copy with some fields changed, e.g. ``spec.replace(stream={"seed": 2})``; checked again."""
        parts = {}
        for name, changes in sections.items():
            if name not in SECTIONS:
                raise ConfigError(f"RunSpec has no part {name!r}; its parts are: {', '.join(SECTIONS)}")
            parts[name] = dataclasses.replace(getattr(self, name), **changes)
        return dataclasses.replace(self, **parts)

    # --- reading --------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Nested plain values (tuples as lists), as ``from_dict`` reads them back."""
        def plain(v: Any) -> Any:
            return list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, Mapping) else v

        return {name: {k: plain(v) for k, v in dataclasses.asdict(getattr(self, name)).items()}
                for name in SECTIONS}

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The spec as YAML (written to ``path`` atomically when given); ``tta adapt --spec`` reads it back."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            from tta.io import write_text

            write_text(path, text)
        return text

    @cached_property
    def settings(self) -> Any:
        """The method's resolved settings (its ``Config``): defaults, preset, config file, then ``settings``."""
        return method_settings(self.method.name, self.method.config, self.method.settings, self.method.preset)

    @property
    def model_name(self) -> str | None:
        """The model to load: the one named, else the benchmark's default unless a checkpoint is given."""
        from tta.data.sources import default_model

        if self.model.name is None and self.model.checkpoint is None:
            return default_model(self.data.benchmark)
        return self.model.name

    @property
    def key(self) -> str:
        """The run's identity: a hash of what it computes (the ``tta sweep`` run key, as before ``RunSpec`` for the
        options grids could set then, so earlier sweep directories resume)."""
        from tta.config import config_hash, to_dict
        from tta.data.sources import default_model

        d, s, m = self.data, self.stream, self.method
        legacy = {
            "method": m.name, "corruption": d.benchmark, "model": self.model.name or default_model(d.benchmark),
            "checkpoint": self.model.checkpoint, "arch": self.model.arch, "data_dir": d.data_dir,
            "corruptions": d.corruptions, "severities": d.severities, "n_examples": d.n_examples,
            "batch_size": s.batch_size, "seed": s.seed, "reset": self.evaluation.reset, "setting": s.setting,
            "contexts": None, "config": m.config, "generate": d.generate, "data_seed": d.data_seed,
            "source": d.clean, "frost_images": d.frost_images, "afn_checkpoint": None,
        }
        e = self.evaluation
        added = {"data": d.data, "dirichlet": s.dirichlet, "order": s.order, "preset": m.preset,
                 "window": m.window, "guard": m.guard, "source_data": self.source.data,
                 "protocol": e.protocol, "stream_speed": e.stream_speed, "cost": e.cost,
                 **({"visits": s.visits} if s.setting == "recurring" else {}),
                 **({k: getattr(s, k) for k in ("baseline", "speed", "length")} if s.setting == "ccc" else {}),
                 **({"accuracy_window": s.accuracy_window} if s.setting == "ccc" else {})}
        defaults = {**dataclasses.asdict(DataSpec()), **dataclasses.asdict(StreamSpec()),
                    **dataclasses.asdict(MethodSpec()), **dataclasses.asdict(EvaluationSpec()), "source_data": None}
        new = {k: v for k, v in added.items() if v != defaults[k]}
        return config_hash({**{k: v for k, v in legacy.items() if k not in _NOT_IN_KEY}, **new,
                            "settings": to_dict(self.settings)})

    def options(self) -> dict[str, Any]:
        """The options that differ from the defaults, by option name (``set.KEY`` per method setting)."""
        shown: dict[str, Any] = {}
        for option, (section, name) in OPTIONS.items():
            value = getattr(getattr(self, section), name)
            if option == "set":
                shown.update({f"set.{k}": v for k, v in value.items()})
            elif value != getattr(SECTIONS[section](), name):
                shown[option] = list(value) if isinstance(value, tuple) else value
        return shown

    # --- checks that span fields --------------------------------------------------------------------------------

    def _check(self) -> None:
        """What can be checked without loading data or models; errors name the field and the fix."""
        from tta.data.sources import check_benchmark, check_selection_for, parse_data

        check_benchmark(self.data.benchmark)
        if self.model.name is not None and self.model.name.startswith("timm:"):
            from tta.models.preprocess import check_timm_name

            check_timm_name(self.model.name.removeprefix("timm:"))
        self.settings  # noqa: B018  (resolves and checks the method's settings; unknown method or key)
        if self.data.data is not None:
            parse_data(self.data.data)
        else:
            check_selection_for(self.data.benchmark, self.data.corruptions, self.data.severities)
        if self.data.clean is not None:
            from tta.data.clean import check_spec

            check_spec(self.data.clean)
        if self.source.data is not None:
            from tta.data.clean import check_spec

            check_spec(self.source.data)
        if self.evaluation.device != "auto":
            import torch

            try:
                torch.device(self.evaluation.device)
            except RuntimeError:
                raise ConfigError(f"evaluation.device {self.evaluation.device!r} is not a device; use auto, cpu, "
                                  "cuda or cuda:N") from None
        for where, path, kind in (("model.checkpoint (--checkpoint)", self.model.checkpoint, "file"),
                                  ("method.config (--config)", self.method.config, "file"),
                                  ("data.frost_images (--frost-images)", self.data.frost_images, "folder")):
            if path is not None and not (Path(path).is_file() if kind == "file" else Path(path).is_dir()):
                raise ConfigError(f"{where} {path!r} does not exist; fix the path")
        if self.output.out is not None:
            from tta.run.report import check_output

            check_output(self.output.out)


def options_table() -> str:
    """The options as a markdown table: command-line spelling, the ``RunSpec`` field each sets, its default and
    whether a grid may set it (the user guide's table is this text, checked by a test)."""
    lines = ["| option | RunSpec field | default | grid key |", "|---|---|---|---|"]
    for option, (section, name) in OPTIONS.items():
        default = getattr(SECTIONS[section](), name)
        shown = "{}" if default == {} else "null" if default is None else str(default).lower() \
            if isinstance(default, bool) else str(default)
        grid = "no (tta sweep decides)" if option in INVOCATION_OPTIONS else "yes"
        flag = "--set KEY=VALUE" if option == "set" else f"--{option.replace('_', '-')}"
        lines.append(f"| `{flag}` | `{section}.{name}` | `{shown}` | {grid} |")
    for alias, (new, is_deprecated) in ALIASES.items():
        target = f"--{new.replace('_', '-')}" if not new.startswith("set.") else f"--set {new[4:]}=..."
        note = "deprecated spelling of" if is_deprecated else "shorthand for"
        lines.append(f"| `--{alias.replace('_', '-')}` | {note} `{target}` | | yes |")
    return "\n".join(lines)


def method_settings(
    method: str, config: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
    preset: str | None = None,
) -> Any:
    """The resolved settings of ``method``: defaults, then the named ``preset``, then ``config``, then ``overrides``."""
    from tta.config import resolve_config
    from tta.methods import get_method

    cls = get_method(method)
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in cls.presets:
            names = ", ".join(cls.presets) or "none"
            raise ConfigError(f"{method} has no preset {preset!r}; its presets are: {names}")
        values.update(cls.presets[preset])
    return resolve_config(cls.Config, config, overrides, base=values)


def _check_alias(alias: str, method: str, where: str) -> None:
    """``contexts`` and ``afn_checkpoint``: method settings with options of their own, for the methods that have
    them."""
    from tta.config import field_names
    from tta.methods import get_method

    if alias == "contexts" and "contexts" not in field_names(get_method(method).Config):
        raise ConfigError(f"--contexts only applies to methods that route samples by domain (dsbn, context-norm), "
                          f"not {method}; drop contexts from {where} or choose one of those methods")
    if alias == "afn_checkpoint" and method != "afn":
        raise ConfigError(f"--afn-checkpoint applies to --method afn, not {method}; drop afn_checkpoint from {where}")
