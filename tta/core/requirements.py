"""What a method needs from the model and the run, declared once and checked before the first batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from tta.source import SourceData

NORM_NAMES = {_BatchNorm: "BatchNorm", nn.BatchNorm2d: "BatchNorm2d", nn.LayerNorm: "LayerNorm",
              nn.GroupNorm: "GroupNorm"}


@dataclass(frozen=True)
class Requirements:
    """A method's needs. Every field is checked when the method wraps a model, each with an error naming the fix.

    - ``norm_layers``: the model must have at least one layer of these types (e.g. BatchNorm for AdaBN);
    - ``running_stats``: every BatchNorm layer it has must carry source running statistics;
    - ``min_batch``: smaller batches need the sliding window (``window=``), or are an error;
    - ``domain_ids``: the method routes samples by the per-sample domain ids it is given;
    - ``source_data``: clean source data is required (``source_data=``, ``--source-data``);
    - ``classifier``: the model must end in a linear classifier over features (LAME).
    """

    norm_layers: tuple[type, ...] = ()
    running_stats: bool = False
    min_batch: int = 1
    domain_ids: bool = False
    source_data: bool = False
    classifier: bool = False


def _names(types: tuple[type, ...]) -> str:
    names = [NORM_NAMES.get(t, t.__name__) for t in types]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_requirements(req: Requirements, model: nn.Module, method: str, source: SourceData | None) -> None:
    """Raise ``ModelError``/``ConfigError`` when ``model`` or the run lacks what ``req`` declares."""
    if req.norm_layers:
        layers = [m for m in model.modules() if isinstance(m, req.norm_layers)]
        if not layers:
            names = _names(req.norm_layers)
            raise ModelError(f"{method} adapts {names} layers but the model has no {names} layers; use a model "
                             "with such layers, or a method that fits this model (see `tta methods`)")
        if req.running_stats and any(isinstance(m, _BatchNorm) and m.running_mean is None for m in layers):
            raise ModelError(f"{method} needs the source running statistics of every BatchNorm layer, but some "
                             "were built with track_running_stats=False; load the pretrained model with its running "
                             "statistics")
    if req.classifier and not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ModelError(f"{method} needs a model that ends in a linear classifier (nn.Linear) over features; "
                         "this model has no nn.Linear layer")
    if req.source_data and source is None:
        raise ConfigError(f"{method} needs clean source data; pass source_data='cifar10' (or 'npz:PATH', "
                          "'folder:PATH') to tta.adapt, or --source-data on the command line")
