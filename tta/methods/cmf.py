"""CMF: continual momentum filtering, ROID's objective with a Kalman-filtered fusion of source and adapted weights
(Lee and Chang, ICLR 2024).

The step is ROID's (see ``tta.methods.roid``): BatchNorm on batch statistics, the certainty x diversity weighted
soft likelihood ratio plus the consistency with a random colour/affine view, one Adam step on the norm affine
parameters, prior-corrected logits. In place of ROID's fixed ensembling with the source, after each step a hidden
model ``h`` (the source at the start) follows the adapted parameters ``theta`` through one step of a Kalman filter
with variance ``v`` (0 at the start):

- predict: ``h <- alpha h + (1 - alpha) theta_source``, ``v <- alpha^2 v + q'``;
- update: ``beta = (1 - q') / (v + 1 - q')`` clipped to [0.89, 1] (1 from 0.9999 on), ``v <- beta v``,
  ``h <- beta h + (1 - beta) theta``;
- fuse: ``theta <- gamma theta + (1 - gamma) h``;

with ``q' = q * P / 38400``, ``P`` the number of adapted parameters (the reference's scaling of the process noise
by model size). ``h`` is thus always a convex combination of the source and the adapted parameters over time.

As the reference's default ("lp" posterior); its "op" variant fuses with the same hidden model in its code, so it
is not offered. Only the adapted parameters are filtered: the reference filters every parameter, but the others
are the same in all three models and never change. With ``steps`` > 1 the filter follows the batch's last step
(the reference filters after every step), as ROID's ensembling here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from tta.core.base import StepOutput
from tta.core.params import IMAGENET_SGD, OptimizerConfig
from tta.core.validate import check_range
from tta.methods.roid import Roid, _smoothed_prior
from tta.registry import register

# The reference divides ``q`` by this parameter count (its CIFAR-10 WideResNet-28's norm affine parameters).
Q_REFERENCE_PARAMS = 38400


@dataclass(frozen=True)
class CMFConfig(OptimizerConfig):
    """Settings of ``cmf`` (defaults: the reference benchmark's CIFAR-10-C configuration, Adam 1e-3)."""

    use_weighting: bool = True
    use_consistency: bool = True
    use_prior_correction: bool = True
    probs_momentum: float = 0.9
    temperature: float = 1 / 3
    alpha: float = 0.99
    gamma: float = 0.99
    q: float = 0.005

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("probs_momentum", self.probs_momentum, low=0.0, high=1.0)
        check_range("temperature", self.temperature, low=0.0, low_open=True)
        check_range("alpha", self.alpha, low=0.0, high=1.0)
        check_range("gamma", self.gamma, low=0.0, high=1.0)
        check_range("q", self.q, low=0.0)


@register("cmf")
class CMF(Roid):
    """ROID's weighted loss and consistency, the weights fused with a Kalman-filtered source/adapted model."""

    Config = CMFConfig
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The reference benchmark's ImageNet-C settings (ResNet-50, batch 64).
        "imagenet": IMAGENET_SGD,
    }

    def setup(self) -> None:
        super().setup()
        del self.source  # the source enters through the hidden model only
        params = self.params()
        flat = torch.cat([p.detach().reshape(-1) for p in params]) if params else torch.zeros(0)
        self.add_state("hidden", flat.clone())
        self.add_state("hidden_var", 0.0)
        # A constant of the run, not adaptation state: never reset, saved or restored.
        self.register_buffer("source_params", flat.clone(), persistent=False)
        self.q_scaled = self.config.q * flat.numel() / Q_REFERENCE_PARAMS

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat vector shaped as the adapted parameters (writing to them writes the vector)."""
        params = self.params()
        return [v.view_as(p) for v, p in zip(flat.split([p.numel() for p in params]), params, strict=True)]

    def after_step(self, x: torch.Tensor, domain: torch.Tensor | None, out: StepOutput) -> StepOutput:
        cfg = self.config
        with torch.no_grad():
            params, hidden, source = self.params(), self._split(self.hidden), self._split(self.source_params)
            q = self.q_scaled
            # Predict: the hidden model relaxes towards the source; its variance grows by the process noise.
            for h, s in zip(hidden, source, strict=True):
                h.copy_(cfg.alpha * h + (1 - cfg.alpha) * s)
            var = cfg.alpha ** 2 * self.hidden_var + q
            # Update: the Kalman gain towards the adapted parameters.
            beta = (1 - q) / (var + (1 - q))
            beta = 1.0 if beta >= 0.9999 else max(beta, 0.89)
            self.hidden_var = beta * var
            if beta < 1.0:
                for h, p in zip(hidden, params, strict=True):
                    h.copy_(beta * h + (1 - beta) * p)
            # Fuse: the adapted parameters move towards the hidden model.
            if cfg.gamma < 1.0:
                for h, p in zip(hidden, params, strict=True):
                    p.copy_(cfg.gamma * p + (1 - cfg.gamma) * h)
        out.diagnostics["kalman_gain"] = torch.tensor(beta)
        if cfg.use_prior_correction:
            out.logits = out.logits * _smoothed_prior(out.logits)
        return out
