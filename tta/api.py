"""The Python API: wrap a model with a method in one call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from torch import nn

from tta.config import resolve_config
from tta.core.base import AdaptedModel
from tta.errors import ConfigError, ModelError
from tta.methods import get_method

if TYPE_CHECKING:
    from tta.monitor import Guard, GuardConfig
    from tta.source import SourceData


DEFAULT_WINDOW = 64  # images in the sliding window when a run adapts one image at a time


def _source_data(spec: str | None, data_dir: str | Path, download: bool) -> SourceData | None:
    from tta.source import SourceData

    if spec is None:
        return None
    from tta.data.clean import check_spec

    check_spec(spec)
    return SourceData(spec, Path(data_dir), download)


def provenance(data_dir: str | Path, checkpoint: str | Path | None) -> dict[str, Any]:
    """Where a run's inputs came from and which software ran it: part of the resolved config and its hash."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    digest = None
    if checkpoint is not None:
        h = hashlib.sha256()
        with open(checkpoint, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
    return {"data_dir": str(Path(data_dir).resolve()), "checkpoint_sha256": digest,
            "versions": {"tta": installed("tta"), "torch": str(torch.__version__),
                         "robustbench": installed("robustbench")}}


def method_settings(
    method: str, config: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
    preset: str | None = None,
) -> Any:
    """The resolved settings of ``method``: defaults, then the named ``preset``, then ``config``, then ``overrides``."""
    cls = get_method(method)
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in cls.presets:
            names = ", ".join(cls.presets) or "none"
            raise ConfigError(f"{method} has no preset {preset!r}; its presets are: {names}")
        values.update(cls.presets[preset])
    return resolve_config(cls.Config, config, overrides, base=values)


def adapt(
    model: nn.Module,
    method: str = "tent",
    config: str | Path | None = None,
    *,
    source_data: SourceData | str | tuple[Any, Any] | None = None,
    window: int = 0,
    preset: str | None = None,
    guard: Guard | GuardConfig | str | None = None,
    **overrides: Any,
) -> AdaptedModel:
    """Wrap a copy of ``model`` (inputs in [0, 1]) with ``method``; ``config`` is an optional YAML file of settings.

    ``source_data`` is clean source data for the methods that need it (``'cifar10'``, ``'npz:PATH'``,
    ``'folder:PATH'`` or an ``(images, labels)`` pair); ``window`` > 1 adapts single images on a sliding window of
    that many recent images; ``preset`` picks a named set of defaults (e.g. ``'imagenet'``); ``guard`` watches the
    adaptation and intervenes when it goes wrong (a ``tta.monitor.Guard`` or a preset name: ``'default'``,
    ``'monitor'``, ``'fallback'``; it calibrates on ``source_data`` when given).

    >>> adapted = tta.adapt(model, method="tent", lr=1e-4)
    >>> logits = adapted(x)      # predicts and adapts
    >>> adapted.reset()          # back to the source model
    """
    cls = get_method(method)
    adapted = cls(model, method_settings(method, config, overrides, preset), source_data=source_data, window=window)
    if guard is not None:  # --- guard (tta.monitor)
        from tta.monitor import attach_guard

        attach_guard(adapted, guard, model, source_data)
    return adapted


def load_adapted(
    path: str | Path, model: nn.Module, *, source_data: SourceData | str | tuple[Any, Any] | None = None
) -> AdaptedModel:
    """An adapted model saved with ``adapted.save(path)``, rebuilt on ``model`` (the same source model it was
    adapted from) and restored exactly: parameters, statistics, declared state and optimizer state.

    ``source_data`` is needed again for methods that require it (and by a saved guard to calibrate). A guard saved
    with the model comes back with its settings and state. A file of another format, or a ``model`` other than the
    one it was saved from, is a ``ModelError``.
    """
    import torch

    from tta.core.base import SAVE_FORMAT

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; pass the file written by adapted.save(path)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise ModelError(f"{path} is not a readable adapted-model file ({type(err).__name__}); save it again with "
                         "adapted.save(path)") from None
    if not isinstance(payload, dict) or payload.get("format") != SAVE_FORMAT:
        raise ModelError(f"{path} was not written by adapted.save(); pass a file written by it")
    adapted = adapt(model, payload["method"], source_data=source_data, window=payload["window"],
                    **payload["settings"])
    if adapted.snapshot_fingerprint() != payload["source"]:
        raise ModelError(f"{path} was saved from another source model (or other settings); load it onto the model "
                         "it was adapted from")
    guard_state = payload.get("guard")
    if guard_state is not None:  # --- guard (tta.monitor): the same settings, then its state
        from tta.monitor import GuardConfig, attach_guard

        try:
            config = GuardConfig(**guard_state["config"])
        except (TypeError, KeyError):
            raise ModelError(f"{path} holds guard settings this version does not know; save it again") from None
        attach_guard(adapted, config, model, source_data)
    adapted.load_state_dict(payload["state_dict"])
    if guard_state is not None and adapted.guard is not None:
        adapted.guard.load_state_dict(guard_state)
    return adapted


def run_benchmark(
    method: str = "tent",
    *,
    model: str | None = None,
    checkpoint: str | Path | None = None,
    arch: str | None = None,
    benchmark: str = "cifar10c",
    data_dir: str | Path = "data",
    corruptions: Sequence[str] | None = None,
    severities: Sequence[int] | None = None,
    n_examples: int | None = None,
    batch_size: int = 200,
    seed: int = 1,
    reset: str = "domain",
    setting: str = "per-domain",
    dirichlet: float = 0.0,
    contexts: str | None = None,
    device: str = "auto",
    config: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    out: str | Path | None = None,
    download: bool = True,
    progress: bool = False,
    generate: bool = False,
    data_seed: int = 0,
    source: str | None = None,
    frost_images: str | Path | None = None,
    source_data: str | None = None,
    window: int | None = None,
    preset: str | None = None,
    data: str | None = None,
    resume: bool = False,
    batches: bool = False,
    guard: str | None = None,
) -> tuple[pd.DataFrame, Path]:
    """What ``tta adapt`` does: adapt a model over a corruption benchmark, writing rows to ``out`` as they finish.

    Returns the results table and the CSV path; the resolved configuration is written beside it (``.yaml``).
    Everything is checked (method settings, selection, files, model) before the first batch runs.
    ``generate`` corrupts the clean set (``source``, see ``tta.data.clean.load_clean``; by default the benchmark's
    clean test set) on the fly on the device with seed ``data_seed`` instead of reading the corruption files; the
    rows then say ``generated:<data_seed>`` in their ``data`` column. ``setting`` orders the stream
    (``per-domain``, ``continual``, ``mixed`` shuffled with ``seed``, ``gradual``, ``correlated`` and
    ``mixed-correlated`` ordered by label, ``dirichlet`` their concentration; see ``tta.data.settings``);
    ``contexts`` (``oracle``/``infer``) is the ``contexts`` setting of the methods that route samples by domain
    (dsbn, context-norm). ``source_data`` is clean source data for methods that need it (EATA's Fisher);
    ``window`` the sliding window for single images (default: 64 at batch size 1 for methods that adapt, else
    off); ``preset`` a named set of method defaults (``imagenet``); ``guard`` a guard preset (``tta.monitor``).
    ``benchmark`` is ``cifar10c``, ``cifar100c``, ``imagenetc``, ``imagenet3dcc`` or ``digits`` (offline, see
    ``tta.data.sources``); ``model`` None is the benchmark's default model. ``data`` (``folder:PATH``,
    ``csv:PATH``, ``npz:PATH``) adapts on your own images instead, the benchmark then only picking the model family.
    ``out`` is checked writable first; it never gets two copies of a run's rows: with
    ``resume``, a finished run is returned from ``out`` without running and an unfinished one runs again in place of
    its partial rows; without it, rows of the same run (config hash) in ``out`` are a ``ConfigError``. ``batches``
    also writes the accuracy of every batch along the stream to ``<stem>.batches.csv``.
    """
    from tta.config import config_hash, field_names, to_dict
    from tta.data.cifar_c import SEVERITIES
    from tta.data.sources import (
        benchmark_stream,
        check_benchmark,
        check_num_classes,
        data_stream,
        default_corruptions,
        default_model,
    )
    from tta.models import load_model
    from tta.run.engine import evaluate, resolve_device
    from tta.run.report import check_output, default_output, open_results, write_config

    check_benchmark(benchmark)
    if model is None and checkpoint is None:
        model = default_model(benchmark)
    model_name = Path(checkpoint).stem if checkpoint is not None else str(model)
    out = check_output(out if out is not None else default_output(method, model_name))
    cls = get_method(method)
    if contexts is not None:
        if "contexts" not in field_names(cls.Config):
            raise ConfigError(f"--contexts only applies to methods that route samples by domain (dsbn, "
                              f"context-norm), not {method}; drop --contexts or choose one of those")
        overrides = {**(overrides or {}), "contexts": contexts}
    settings = method_settings(method, config, overrides, preset)
    if window is None:
        window = DEFAULT_WINDOW if batch_size == 1 and method != "source" and cls.sliding_window else 0
    dev = resolve_device(device)
    corruptions = list(corruptions or default_corruptions(benchmark))
    severities = list(severities or SEVERITIES)
    if data is not None:
        stream = data_stream(data, benchmark, None if checkpoint is not None else model, n_examples, batch_size,
                             setting=setting, seed=seed, dirichlet=dirichlet)
    elif generate:
        from tta.data.generated import generated_stream

        stream = generated_stream(benchmark, data_dir, corruptions, severities, n_examples, batch_size, seed=data_seed,
                                  device=dev, source=source, frost_images=frost_images, download=download,
                                  setting=setting, shuffle_seed=seed, dirichlet=dirichlet)
    else:
        stream = benchmark_stream(benchmark, data_dir, corruptions, severities, n_examples, batch_size,
                                  model=None if checkpoint is not None else model, download=download,
                                  setting=setting, seed=seed, data_seed=data_seed, device=dev, dirichlet=dirichlet)
    net = load_model(model, dataset=benchmark, checkpoint=checkpoint, arch=arch, data_dir=data_dir)
    check_num_classes(stream, net, None if data is not None else benchmark)
    clean = _source_data(source_data, data_dir, download)
    adapted = cls(net, settings, source_data=clean, window=window)
    if guard is not None:  # --- guard (tta.monitor)
        from tta.monitor import attach_guard

        attach_guard(adapted, guard, net, clean)

    resolved = {
        "method": method, "settings": to_dict(settings), "model": model_name, "checkpoint": str(checkpoint or ""),
        "arch": arch, "benchmark": benchmark, "data": stream.label, "clean_source": source if generate else None,
        "frost_images": str(frost_images) if generate and frost_images else None, "corruptions": corruptions,
        "severities": severities, "n_examples": n_examples, "batch_size": batch_size, "seed": seed, "reset": reset,
        "setting": setting, "dirichlet": dirichlet, "source_data": source_data, "window": window, "preset": preset,
        **provenance(data_dir, checkpoint), **({"user_data": data} if data is not None else {}),
        **({"guard": guard} if guard is not None else {}),
    }
    digest = config_hash(resolved)
    done, writer, batch_writer = open_results(out, digest, len(stream.domains), resume=resume, batches=batches)
    if done is not None:
        return done, out
    write_config(out, {**resolved, "device": str(dev), "config_hash": digest})
    df = evaluate(adapted, stream, reset, device=dev, model_name=model_name, seed=seed, progress=progress,  # type: ignore[arg-type]
                  on_result=writer, metadata={"config_hash": digest},
                  on_batches=batch_writer.write_rows if batch_writer is not None else None)
    return df, out
