"""The Python API: wrap a model with a method in one call."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from torch import nn

from tta.core.base import AdaptedModel
from tta.errors import ConfigError, ModelError
from tta.methods import get_method
from tta.run.spec import method_settings

__all__ = ["adapt", "load_adapted", "method_settings", "run_benchmark"]

if TYPE_CHECKING:
    from tta.monitor import Guard, GuardConfig
    from tta.source import SourceData


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


def run_benchmark(method: str = "tent", **options: Any) -> tuple[pd.DataFrame, Path]:
    """What ``tta adapt`` does, from keyword options named as its command-line options (``benchmark``, ``data_dir``,
    ``corruptions``, ``severities``, ``n_examples``, ``batch_size``, ``seed``, ``setting``, ``out``, ``resume``,
    ``batches``, ...; ``overrides`` is ``--set``): a thin wrapper over ``RunSpec.from_options`` and ``tta.run``.

    Returns the results table and the CSV path; the resolved configuration (with the spec under ``spec:``) is
    written beside it (``.yaml``). See ``tta.run.execute.run`` for what is written and how a run resumes.
    """
    from tta.run.execute import run
    from tta.run.spec import RunSpec

    values = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in options.items()}
    if "overrides" in values:
        values["set"] = dict(values.pop("overrides") or {})
    result = run(RunSpec.from_options({"method": method, **values}, "run_benchmark's arguments"))
    return result.results, result.out
