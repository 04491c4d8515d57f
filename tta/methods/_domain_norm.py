"""Shared machinery of ``context-norm`` and ``dsbn``: every BatchNorm becomes domain-aware, samples are routed
per sample by domain id (``contexts: oracle``) or by inferred contexts (``contexts: infer``), and optionally the
per-context parameters train by entropy minimisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.context.assign import Calibration
from tta.context.model import ContextInference, ContextNormModel, calibrate_contexts, convert_context_norm
from tta.core.base import AdaptedModel, StepOutput
from tta.core.losses import entropy_objective
from tta.core.requirements import Requirements
from tta.core.validate import check_range
from tta.errors import ConfigError
from tta.models.fingerprint import model_fingerprint
from tta.source import derived


def check_context_inference(config: object) -> None:
    """A ``ValueError`` for out-of-range context-inference settings shared by the inferred-context methods'
    configs: ``min_subset``, ``split_quantile``, ``calibration_images``, ``min_spawn`` and ``max_contexts``."""
    c: Any = config
    if c.min_subset < 1:
        raise ValueError(f"min_subset must be >= 1, got {c.min_subset}")
    check_range("split_quantile", c.split_quantile, low=0.5, high=1.0, high_open=True)
    if not 2 <= c.calibration_images <= 100_000:
        raise ValueError(f"calibration_images must be in [2, 100000], got {c.calibration_images}")
    if c.min_spawn < 1:
        raise ValueError(f"min_spawn must be >= 1, got {c.min_spawn}")
    if c.max_contexts < 2:
        raise ValueError(f"max_contexts must be >= 2 (the source and at least one target context), "
                         f"got {c.max_contexts}")


@dataclass(frozen=True)
class DomainNormConfig:
    """Settings shared by ``context-norm`` and ``dsbn``; the inference keys matter with ``contexts: infer`` (or
    ``fallback: infer``), which need clean source data to calibrate on. ``stats_update``: how a context's statistics
    are estimated (``cumulative`` or ``ema``, with rate ``stats_rate``: r <- (1 - rate) r + rate b)."""

    renamed: ClassVar[dict[str, str]] = {"update": "stats_update", "stats_momentum": "stats_rate"}

    contexts: Literal["oracle", "infer"] = "oracle"
    fallback: Literal["source", "infer"] = "source"
    stats_update: Literal["cumulative", "ema"] = "cumulative"
    prior_n: float = 16.0
    stats_rate: float = 0.1
    min_subset: int = 2
    declared_contexts: int = 0
    descriptor: Literal["first", "early", "half", "all"] = "half"
    split_quantile: float = 0.99
    calibration_images: int = 1000
    min_spawn: int = 8
    max_contexts: int = 16
    lr: float = 1e-3  # Adam's, for dsbn's branch-local Tent and context-norm's learned mode

    def __post_init__(self) -> None:
        check_range("prior_n", self.prior_n, low=0.0, allow_inf=True)
        check_range("stats_rate", self.stats_rate, low=0.0, high=1.0, low_open=True)
        if self.declared_contexts < 0:
            raise ValueError(f"declared_contexts must be >= 0, got {self.declared_contexts}")
        check_context_inference(self)
        check_range("lr", self.lr, low=0.0, low_open=True)

    @property
    def infers(self) -> bool:
        """Whether contexts are ever inferred (and a source calibration is needed)."""
        return self.contexts == "infer" or self.fallback == "infer"


class DomainNormMethod(AdaptedModel):
    """Shared machinery of ``context-norm`` and ``dsbn``: conversion, routing, optional entropy training."""

    requires = Requirements(norm_layers=(_BatchNorm,), running_stats=True, domain_ids=True)
    per_context_affine = False

    def check_model(self, model: nn.Module) -> None:
        if self.config.infers and self.source_data is None:
            raise ConfigError(f"{self.name} with inferred contexts calibrates on clean source data; pass "
                              "source_data='cifar10' (or 'npz:PATH', 'folder:PATH') to tta.adapt, or --source-data "
                              "on the command line (or use contexts=oracle with domain ids)")

    def configure(self, model: nn.Module) -> nn.Module:
        model = super().configure(model)
        cfg = self.config
        inference = ContextInference(self._calibration(model), cfg.descriptor, cfg.min_spawn, cfg.max_contexts) \
            if cfg.infers else None
        wrapped = convert_context_norm(
            model, stats_update=cfg.stats_update, prior_n=cfg.prior_n, momentum=cfg.stats_rate,
            min_subset=cfg.min_subset, per_context_affine=self.per_context_affine,
            learned=getattr(cfg, "learned", False), declared=cfg.declared_contexts, inference=inference)
        for layer in wrapped.layers():
            layer.set_trainable(self.trains_affine())
        self.update = "gradient" if self.trains() else "none"
        return wrapped.eval()

    def _calibration(self, model: nn.Module) -> Calibration:
        """Context inference's calibration on ``calibration_images`` clean source images, cached."""
        cfg, source = self.config, self.source_data
        assert source is not None  # check_model refused inference without source data
        settings = f"n={cfg.calibration_images}|depth={cfg.descriptor}|q={cfg.split_quantile}|v6"

        def compute() -> dict[str, torch.Tensor]:
            images, _ = source.sample(cfg.calibration_images, seed=0)
            return calibrate_contexts(model, images, cfg.descriptor, cfg.split_quantile).to_dict()

        return Calibration.from_dict(derived("context-calibration", model_fingerprint(model), source, settings,
                                             compute))

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

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        logits = self.model(x, domain=self._ids(domain))
        return entropy_objective(logits) if self.trains() else StepOutput(logits)

    def predict(self, x: torch.Tensor, domain: torch.Tensor | None) -> torch.Tensor:
        """The sliding window's in-between prediction: routed as ``loss`` routes, storing nothing."""
        return self.model(x, domain=self._ids(domain), store=False)

    def _ids(self, domain: torch.Tensor | None) -> torch.Tensor | None:
        return domain if self.config.contexts == "oracle" else None  # infer: ids are never looked at
