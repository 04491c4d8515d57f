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
    data: str | None = None,
) -> tuple[pd.DataFrame, Path]:
    """What ``tta adapt`` does: adapt a model over a corruption benchmark, writing rows to ``out`` as they finish.

    Returns the results table and the CSV path; the resolved configuration is written beside it (``.yaml``).
    Everything is checked (method settings, selection, files, model) before the first batch runs.
    ``generate`` corrupts the clean set (``source``, see ``tta.data.clean.load_clean``; by default the benchmark's
    clean test set) on the fly on the device with seed ``data_seed`` instead of reading the corruption files; the
    rows then say ``generated:<data_seed>`` in their ``data`` column. ``setting`` orders the stream
    (``per-domain``, ``continual``, ``mixed`` shuffled with ``seed``, ``gradual``; see ``tta.data.settings``);
    ``contexts`` (``oracle``/``infer``) is the ``contexts`` setting of the methods that route samples by domain
    (dsbn, context-norm).
    ``benchmark`` is ``cifar10c``, ``cifar100c``, ``imagenetc``, ``imagenet3dcc`` or ``digits`` (offline, see
    ``tta.data.sources``); ``model`` None is the benchmark's default model. ``data`` (``folder:PATH``,
    ``csv:PATH``, ``npz:PATH``) adapts on your own images instead, the benchmark then only picking the model family.
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
    from tta.engine import evaluate, resolve_device
    from tta.models import load_model
    from tta.report import CsvWriter, default_output, write_config

    cls = get_method(method)
    if contexts is not None:
        if "contexts" not in field_names(cls.Config):
            raise ConfigError(f"--contexts only applies to methods that route samples by domain (dsbn, "
                              f"context-norm), not {method}; drop --contexts or choose one of those")
        overrides = {**(overrides or {}), "contexts": contexts}
    settings = resolve_config(cls.Config, config, overrides)
    check_benchmark(benchmark)
    dev = resolve_device(device)
    if model is None and checkpoint is None:
        model = default_model(benchmark)
    corruptions = list(corruptions or default_corruptions(benchmark))
    severities = list(severities or SEVERITIES)
    if data is not None:
        stream = data_stream(data, benchmark, None if checkpoint is not None else model, n_examples, batch_size,
                             setting=setting, seed=seed)
    elif generate:
        from tta.data.generated import generated_stream

        stream = generated_stream(benchmark, data_dir, corruptions, severities, n_examples, batch_size, seed=data_seed,
                                  device=dev, source=source, frost_images=frost_images, download=download,
                                  setting=setting, shuffle_seed=seed)
    else:
        stream = benchmark_stream(benchmark, data_dir, corruptions, severities, n_examples, batch_size,
                                  model=None if checkpoint is not None else model, download=download,
                                  setting=setting, seed=seed, data_seed=data_seed, device=dev)
    model_name = Path(checkpoint).stem if checkpoint is not None else str(model)
    net = load_model(model, dataset=benchmark, checkpoint=checkpoint, arch=arch, data_dir=data_dir)
    check_num_classes(stream, net)
    adapted = cls(net, settings)

    resolved = {
        "method": method, "settings": to_dict(settings), "model": model_name, "checkpoint": str(checkpoint or ""),
        "arch": arch, "benchmark": benchmark, "data": stream.label, "clean_source": source if generate else None,
        "frost_images": str(frost_images) if generate and frost_images else None, "corruptions": corruptions,
        "severities": severities, "n_examples": n_examples, "batch_size": batch_size, "seed": seed, "reset": reset,
        "setting": setting, **({"user_data": data} if data is not None else {}),
    }
    digest = config_hash(resolved)
    out = Path(out) if out is not None else default_output(method, model_name)
    writer = CsvWriter(out)
    write_config(out, {**resolved, "device": str(dev), "config_hash": digest})
    df = evaluate(adapted, stream, reset, device=dev, model_name=model_name, seed=seed, progress=progress,  # type: ignore[arg-type]
                  on_result=writer, metadata={"config_hash": digest})
    return df, out
