"""Domain-specific BatchNorm (Chang et al., CVPR 2019) for test-time adaptation (docs/methods/contexts.md).

Every BN becomes per-domain branches with their own statistics and affine (branch 0 = the source BN, a branch per
domain created on first sight or declared up front, initialised from the source BN); samples are routed by their
domain id, split by domain and scattered back. Branch statistics follow ``stats_update``: ``ema`` or ``cumulative``
(``prior_n`` blends with the source as in context-norm; the default 0 is plain per-domain AdaBN); ``tent=True`` adds
branch-local Tent: one Adam step per batch on the mean entropy, over the affine parameters of the branches in use.
"""

from __future__ import annotations

from dataclasses import dataclass

from tta.methods._domain_norm import DomainNormConfig, DomainNormMethod
from tta.registry import register


@dataclass(frozen=True)
class DSBNConfig(DomainNormConfig):
    """Settings of ``dsbn``: the shared ones (no source prior by default: plain per-domain AdaBN) plus branch Tent."""

    prior_n: float = 0.0
    tent: bool = False


@register("dsbn")
class DSBN(DomainNormMethod):
    """Per-domain BN branches (statistics and affine), optionally with branch-local Tent."""

    Config = DSBNConfig
    per_context_affine = True

    def trains_affine(self) -> bool:
        return self.config.tent
