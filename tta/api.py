"""The Python API: wrap a model with a method in one call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from tta.config import resolve_config
from tta.errors import ConfigError
from tta.methods.base import AdaptedModel
from tta.registry import get_method


def adapt(model: nn.Module, method: str = "tent", config: str | Path | None = None, **overrides: Any) -> AdaptedModel:
    """Wrap a copy of ``model`` (inputs in [0, 1]) with ``method``; ``config`` is an optional YAML file of settings.

    >>> adapted = tta.adapt(model, method="tent", lr=1e-4)
    >>> logits = adapted(x)      # predicts and adapts
    >>> adapted.reset()          # back to the source model
    """
    cls = get_method(method)
    return cls(model, resolve_config(cls.Config, config, overrides))


def run_benchmark(
    method: str = "tent",
    *,
    model: str | None = "Standard",
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
    resume: bool = False,
    batches: bool = False,
) -> tuple[pd.DataFrame, Path]:
    """What ``tta adapt`` does: adapt a model over a corruption benchmark, writing rows to ``out`` as they finish.

    Returns the results table and the CSV path; the resolved configuration is written beside it (``.yaml``).
    Everything is checked (method settings, selection, files, model) before the first batch runs.
    ``generate`` corrupts the clean set (``source``, see ``tta.data.clean.load_clean``; by default the benchmark's
    clean test set) on the fly on the device with seed ``data_seed`` instead of reading the corruption files; the
    rows then say ``generated:<data_seed>`` in their ``data`` column. ``setting`` orders the stream
    (``per-domain``, ``continual``, ``mixed`` shuffled with ``seed``, ``gradual``; see ``tta.data.settings``);
    ``contexts`` (``oracle``/``infer``) is the ``contexts`` setting of the methods that route samples by domain
    (dsbn, context-norm). ``out`` is checked writable first; it never gets two copies of a run's rows: with
    ``resume``, a finished run is returned from ``out`` without running and an unfinished one runs again in place of
    its partial rows; without it, rows of the same run (config hash) in ``out`` are a ``ConfigError``. ``batches``
    also writes the accuracy of every batch along the stream to ``<stem>.batches.csv``.
    """
    from tta.config import config_hash, field_names, to_dict
    from tta.data.cifar_c import BENCHMARK_CORRUPTIONS, SEVERITIES, cifar_c_stream, dataset_info
    from tta.engine import evaluate, resolve_device
    from tta.models import load_model
    from tta.report import check_output, default_output, open_results, write_config

    model_name = Path(checkpoint).stem if checkpoint is not None else str(model)
    out = check_output(out if out is not None else default_output(method, model_name))
    cls = get_method(method)
    if contexts is not None:
        if "contexts" not in field_names(cls.Config):
            raise ConfigError(f"--contexts only applies to methods that route samples by domain (dsbn, "
                              f"context-norm), not {method}; drop --contexts or choose one of those")
        overrides = {**(overrides or {}), "contexts": contexts}
    settings = resolve_config(cls.Config, config, overrides)
    dataset_info(benchmark)
    dev = resolve_device(device)
    corruptions = list(corruptions or BENCHMARK_CORRUPTIONS)
    severities = list(severities or SEVERITIES)
    if generate:
        from tta.data.generated import generated_stream

        stream = generated_stream(benchmark, data_dir, corruptions, severities, n_examples, batch_size, seed=data_seed,
                                  device=dev, source=source, frost_images=frost_images, download=download,
                                  setting=setting, shuffle_seed=seed)
    else:
        stream = cifar_c_stream(benchmark, data_dir, corruptions, severities, n_examples, batch_size,
                                download=download, setting=setting, seed=seed)
    net = load_model(model, dataset=benchmark, checkpoint=checkpoint, arch=arch, data_dir=data_dir)
    adapted = cls(net, settings)

    resolved = {
        "method": method, "settings": to_dict(settings), "model": model_name, "checkpoint": str(checkpoint or ""),
        "arch": arch, "benchmark": benchmark, "data": stream.label, "clean_source": source if generate else None,
        "frost_images": str(frost_images) if generate and frost_images else None, "corruptions": corruptions,
        "severities": severities, "n_examples": n_examples, "batch_size": batch_size, "seed": seed, "reset": reset,
        "setting": setting,
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
