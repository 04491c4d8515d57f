"""RDumb: ETA with the whole method reset to the source model every 1,000 updates (Press et al., NeurIPS 2023).

As the reference benchmark's configuration: ETA's selection, weighting and optimiser, and a full reset (model,
optimiser state and the mean-probability EMA) after ``reset_every`` updates. Batches on which no sample was
selected are not updates and do not count toward ``reset_every`` (the reference counts them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from tta.methods.eta import ETA, IMAGENET, ETAConfig
from tta.registry import register


@dataclass(frozen=True)
class RDumbConfig(ETAConfig):
    """Settings of ``rdumb``: ETA's, with a reset every 1,000 updates."""

    reset_every: int = 1000


@register("rdumb")
class RDumb(ETA):
    """ETA with a full reset to the source model every 1,000 updates."""

    Config = RDumbConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {"imagenet": IMAGENET}
