"""Domain-specific BatchNorm (Chang et al., CVPR 2019) for test-time adaptation (METHODS.md section 3).

Every BN becomes per-domain branches with their own statistics and affine (branch 0 = the source BN, a branch per
domain created on first sight or declared up front, initialised from the source BN); samples are routed by their
domain id, split by domain and scattered back. Branch statistics update by ``ema`` or ``cumulative`` (``prior_n``
blends with the source as in context-norm; the default 0 is plain per-domain AdaBN); ``tent=True`` adds branch-local
Tent: one Adam step per batch on the mean entropy, over the affine parameters of the branches in use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from tta.methods.context_norm import DomainNormMethod, check_common
from tta.registry import register


@dataclass(frozen=True)
class DSBNConfig:
    """Settings of ``dsbn``; the spawn keys only matter with ``contexts: infer``."""

    contexts: Literal["oracle", "infer"] = "oracle"
    fallback: Literal["source", "soft", "spawn"] = "spawn"
    update: Literal["cumulative", "ema"] = "cumulative"
    prior_n: float = 0.0
    momentum: float = 0.1
    min_subset: int = 2
    declared_contexts: int = 0
    spawn_threshold: float = 4.0
    spawn_var: float = 1.0
    min_spawn: int = 8
    max_contexts: int = 16
    tent: bool = False
    lr: float = 1e-3

    def __post_init__(self) -> None:
        check_common(self)


@register("dsbn")
class DSBN(DomainNormMethod):
    """Per-domain BN branches (statistics and affine), optionally with branch-local Tent."""

    Config = DSBNConfig
    per_context_affine = True

    def trains_affine(self) -> bool:
        return self.config.tent
