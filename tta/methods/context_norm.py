"""Context normalization with domain contexts: per-domain BN statistics on mixed streams (docs/methods/contexts.md).

Every BatchNorm becomes a ``DomainContextNorm`` with the BN's shared affine and per-context statistics blended with
a source prior of pseudo-count ``prior_n``. ``contexts="oracle"`` routes each sample by the domain id it comes with
(``adapted(x, domain=ids)``; the engine passes the stream's ids), ``contexts="infer"`` ignores ids and infers
contexts from each image's style, calibrated on clean source data (see ``tta.context``).
With ``oracle``, a call without ids (``adapted(x)``) goes to the ``fallback`` (``source``: no adaptation;
``infer``); do not mix calls with and without ids in one run, as inferred contexts and id contexts share numbers.
``learned=True`` trains per-context mean and log-std by entropy minimisation instead of estimating statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

from tta.methods._domain_norm import DomainNormConfig, DomainNormMethod
from tta.registry import register


@dataclass(frozen=True)
class ContextNormConfig(DomainNormConfig):
    """Settings of ``context-norm``: the shared ones plus the learned mode."""

    learned: bool = False


@register("context-norm")
class ContextNorm(DomainNormMethod):
    """Per-domain BN statistics with the BN's shared affine and a source prior (DomainContextNorm)."""

    Config = ContextNormConfig
