"""Context normalization with domain contexts: per-domain BN statistics on mixed streams (METHODS.md 4.5).

Every BatchNorm becomes a ``DomainContextNorm`` with the BN's shared affine and per-context statistics blended with
a source prior of pseudo-count ``prior_n``. ``contexts="oracle"`` routes each sample by the domain id it comes with
(``adapted(x, domain=ids)``; the engine passes the stream's ids), ``contexts="infer"`` ignores ids and infers
contexts with ``fallback`` ``source``, ``soft`` or ``spawn`` (see ``tta.norm.domain``). With ``oracle``, a call
without ids (``adapted(x)``) is an unknown context and also goes to the ``fallback``; do not mix calls with and
without ids in one run, as spawned contexts and id contexts share numbers. ``learned=True`` trains
per-context mean and log-std by entropy minimisation instead of estimating statistics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from tta.methods.adabn import require_batchnorm
from tta.methods.base import AdaptedModel, entropy
from tta.norm.domain import ContextNormModel, convert_context_norm
from tta.registry import register


@dataclass(frozen=True)
class DomainNormConfig:
    """Settings shared by ``context-norm`` and ``dsbn``; the spawn keys only matter with ``contexts: infer``."""

    contexts: Literal["oracle", "infer"] = "oracle"
    fallback: Literal["source", "soft", "spawn"] = "spawn"
    update: Literal["cumulative", "ema"] = "cumulative"
    prior_n: float = 16.0
    momentum: float = 0.1
    min_subset: int = 2
    declared_contexts: int = 0
    spawn_threshold: float = 4.0
    spawn_var: float = 1.0
    min_spawn: int = 8
    max_contexts: int = 16
    lr: float = 1e-3  # Adam's, for dsbn's branch-local Tent and context-norm's learned mode

    def __post_init__(self) -> None:
        if self.prior_n < 0:
            raise ValueError(f"prior_n must be >= 0 (0 = full adaptation, inf = source), got {self.prior_n}")
        if not 0.0 < self.momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {self.momentum}")
        if self.min_subset < 1:
            raise ValueError(f"min_subset must be >= 1, got {self.min_subset}")
        if self.declared_contexts < 0:
            raise ValueError(f"declared_contexts must be >= 0, got {self.declared_contexts}")
        if self.spawn_threshold <= 0 or self.spawn_var <= 0:
            raise ValueError("spawn_threshold and spawn_var must be > 0")
        if self.min_spawn < 1:
            raise ValueError(f"min_spawn must be >= 1, got {self.min_spawn}")
        if self.max_contexts < 2:
            raise ValueError(f"max_contexts must be >= 2 (the source and at least one target context), "
                             f"got {self.max_contexts}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class ContextNormConfig(DomainNormConfig):
    """Settings of ``context-norm``: the shared ones plus the learned mode."""

    learned: bool = False


class DomainNormMethod(AdaptedModel):
    """Shared machinery of ``context-norm`` and ``dsbn``: conversion, routing, optional entropy training."""

    per_context_affine = False

    def check_model(self, model: nn.Module) -> None:
        require_batchnorm(model, self.name)

    def configure(self, model: nn.Module) -> nn.Module:
        model = super().configure(model)
        cfg = self.config
        wrapped = convert_context_norm(
            model, update=cfg.update, prior_n=cfg.prior_n, momentum=cfg.momentum, min_subset=cfg.min_subset,
            per_context_affine=self.per_context_affine, learned=getattr(cfg, "learned", False),
            declared=cfg.declared_contexts, fallback=cfg.fallback, spawn_threshold=cfg.spawn_threshold,
            spawn_var=cfg.spawn_var, min_spawn=cfg.min_spawn, max_contexts=cfg.max_contexts)
        for layer in wrapped.layers():
            layer.set_trainable(self.trains_affine())
        return wrapped.eval()

    def trains_affine(self) -> bool:
        """Whether per-context affine parameters train (branch-local Tent)."""
        return False

    def trains(self) -> bool:
        """Whether this configuration takes gradient steps at all."""
        return self.trains_affine() or getattr(self.config, "learned", False)

    def params(self) -> list[nn.Parameter]:
        model: ContextNormModel = self.model  # type: ignore[assignment]
        return [p for layer in model.layers() for p in layer.context_params() if p.requires_grad]

    def make_optimizer(self) -> torch.optim.Optimizer | None:
        if not self.trains():
            return None
        # Contexts (and their parameters) appear at test time: one group, kept equal to params() as they come.
        return torch.optim.Adam([{"params": self.params()}], lr=self.config.lr)

    def adapt(self, x: torch.Tensor, domain: torch.Tensor | None) -> torch.Tensor:
        ids = domain if self.config.contexts == "oracle" else None  # infer: ids are never looked at
        if self.optimizer is None:
            return self.model(x, domain=ids)
        logits = self.model(x, domain=ids)
        self._sync_optimizer()
        entropy(logits).mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return logits.detach()

    def _sync_optimizer(self) -> None:
        """Give the optimizer the parameters of contexts created during the last forward.

        The group is replaced by ``params()`` (module order) rather than extended, so that a saved optimizer state
        lines up with the parameters of a model rebuilt from the same state dict; Adam keeps its moments per
        parameter, so existing parameters keep theirs.
        """
        assert self.optimizer is not None  # only called when training
        params = self.params()
        if len(params) != len(self.optimizer.param_groups[0]["params"]):
            self.optimizer.param_groups[0]["params"] = params

    def set_extra_state(self, state: dict[str, Any]) -> None:
        # Called before the layers below have grown to the saved number of contexts: apply it in load_state_dict.
        self._pending_optimizer = state.get("optimizer") if self.optimizer is not None else None

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load a saved adapted model, growing the contexts it had, then its optimizer state."""
        self._pending_optimizer = None
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self._pending_optimizer is not None:
            self.optimizer = self.make_optimizer()
            assert self.optimizer is not None  # trains, since the saved model had an optimizer state
            self.optimizer.load_state_dict(self._pending_optimizer)
        self._pending_optimizer = None
        return result


@register("context-norm")
class ContextNorm(DomainNormMethod):
    """Per-domain BN statistics with the BN's shared affine and a source prior (DomainContextNorm)."""

    Config = ContextNormConfig
