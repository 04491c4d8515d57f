"""ROID: universal test-time adaptation through weight ensembling, diversity weighting and prior correction
(Marsden, Döbler and Yang, WACV 2024).

One gradient step per batch on the affine parameters of the norm layers (BatchNorm always on batch statistics):

- the soft likelihood ratio loss of every sample, weighted by certainty (low entropy) times diversity (a prediction
  far, in cosine distance, from the running mean of the batch mean predictions, EMA ``probs_momentum``); both are
  min-max normalised over the batch, the weight is ``exp(certainty * diversity / temperature)`` and samples whose
  diversity is below the batch mean get weight 0;
- plus a symmetric cross-entropy between the prediction on each kept image and on a random colour/affine view of
  it, with the same weights; both sums are divided by the batch size;
- after the step, weight ensembling with the source model: ``theta <- src_momentum * theta + (1 - src_momentum) *
  theta_source`` for every adapted parameter;
- the returned logits (computed before the update) are multiplied per class by the smoothed batch prior
  ``(p + s) / (1 + s C)``, ``p`` the batch mean prediction, ``s = max(1/N, 1/C) / max(p)``.

``use_weighting``, ``use_consistency`` and ``use_prior_correction`` switch each part off (without weighting every
sample has weight 1 and none is dropped). Unlike the reference code, the sums are divided by the size of the batch
itself rather than the configured batch size (the same except on a last, smaller batch), and with ``steps`` > 1
the source ensembling follows the batch's last step rather than every step. ``norm: unmix-tns`` first replaces the
BatchNorm layers by UnMix-TNS layers (``tta.norm.unmix_tns``), whose affine parameters then train.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tta.core.base import AdaptedModel, StepOutput
from tta.core.losses import entropy, soft_likelihood_ratio, symmetric_cross_entropy
from tta.core.params import IMAGENET_SGD, OptimizerConfig, check_norm_affine, norm_affine_params
from tta.core.reliable import eval_with_batch_statistics
from tta.core.validate import check_range
from tta.core.views import color_affine_view, generator_from, new_rng_state
from tta.norm.unmix_tns import NormChoice, apply_norm
from tta.registry import register


@dataclass(frozen=True)
class RoidConfig(NormChoice, OptimizerConfig):
    """Settings of ``roid`` (defaults: the reference benchmark's CIFAR-10-C configuration, Adam 1e-3), with the
    normalisation layers (``norm``)."""

    renamed: ClassVar[dict[str, str]] = {"momentum_src": "src_momentum", "momentum_probs": "probs_momentum"}

    use_weighting: bool = True
    use_consistency: bool = True
    use_prior_correction: bool = True
    src_momentum: float = 0.99
    probs_momentum: float = 0.9
    temperature: float = 1 / 3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_roid_update(self)


def check_roid_update(config: object) -> None:
    """A ``ValueError`` for out-of-range settings of ROID's update, shared by the configs that use it:
    ``src_momentum`` and ``probs_momentum`` in [0, 1], ``temperature`` > 0."""
    c: Any = config
    check_range("src_momentum", c.src_momentum, low=0.0, high=1.0)
    check_range("probs_momentum", c.probs_momentum, low=0.0, high=1.0)
    check_range("temperature", c.temperature, low=0.0, low_open=True)


def _min_max(v: torch.Tensor) -> torch.Tensor:
    """``(v - min) / (max - min)``; all zeros when every value is the same (the reference would give NaN)."""
    low, span = v.min(), v.max() - v.min()
    return torch.where(span > 0, (v - low) / span.clamp(min=torch.finfo(v.dtype).tiny), torch.zeros_like(v))


@register("roid")
class Roid(AdaptedModel):
    """Weighted soft likelihood ratio + consistency, weight ensembling with the source, prior correction."""

    Config = RoidConfig
    update = "gradient"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The reference benchmark's ImageNet-C settings (ResNet-50, batch 64).
        "imagenet": IMAGENET_SGD,
    }

    def check_model(self, model: nn.Module) -> None:
        check_norm_affine(model, self.name)

    def configure(self, model: nn.Module) -> nn.Module:
        model = apply_norm(model, self.config, self.name)
        return eval_with_batch_statistics(model, norm_affine_params(model))

    def setup(self) -> None:
        self.source = copy.deepcopy(self.model).requires_grad_(False)
        classes = self.num_classes or 0
        self.add_state("class_probs_ema", torch.full((classes,), 1.0 / max(classes, 1)), dynamic=not classes)
        self.add_state("rng_state", new_rng_state())

    def params(self) -> list[nn.Parameter]:
        return norm_affine_params(self.model)

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        cfg = self.config
        logits = self.model(x)
        n = x.shape[0]
        keep = torch.ones(n, dtype=torch.bool, device=x.device)
        weights = torch.ones(n, dtype=logits.dtype, device=x.device)
        if cfg.use_weighting:
            keep, weights, self.class_probs_ema = certainty_diversity_weights(
                logits, self.class_probs_ema, cfg.temperature, cfg.probs_momentum)
        slr = soft_likelihood_ratio(logits)
        loss = (slr * weights)[keep].sum() / n
        # A one-image subset cannot take batch statistics in a BatchNorm1d (min_batch 2): no consistency term then.
        if cfg.use_consistency and (self.requires.min_batch < 2 or int(keep.sum()) >= self.requires.min_batch):
            with generator_from(self.rng_state) as gen:
                view = color_affine_view(x[keep].detach(), gen)
            consistency = symmetric_cross_entropy(self.model(view), logits[keep])
            loss = loss + (consistency * weights[keep]).sum() / n
        return StepOutput(logits.detach(), loss, n_used=keep.sum(),
                          diagnostics={"slr": slr.detach().mean(), "weight": weights.mean()})

    def after_step(self, x: torch.Tensor, domain: torch.Tensor | None, out: StepOutput) -> StepOutput:
        cfg = self.config
        if cfg.src_momentum < 1.0:
            with torch.no_grad():
                adapted, source = self.params(), norm_affine_params(self.source)
                torch._foreach_mul_(adapted, cfg.src_momentum)
                torch._foreach_add_(adapted, source, alpha=1 - cfg.src_momentum)
        if cfg.use_prior_correction:
            out.logits = out.logits * _smoothed_prior(out.logits)
        return out

    def predict(self, x: torch.Tensor, domain: torch.Tensor | None) -> torch.Tensor:
        logits = self.model(x)
        return logits * _smoothed_prior(logits) if self.config.use_prior_correction else logits


def certainty_diversity_weights(logits: torch.Tensor, class_probs_ema: torch.Tensor, temperature: float,
                                momentum: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ROID's sample selection and weights for a batch of ``logits``: an image is kept when its prediction differs
    from the running class distribution ``class_probs_ema`` at least as much as the batch's average (diversity, by
    cosine distance), and weighted by exp(diversity x certainty / temperature), both min-max scaled over the batch.
    Returns (keep, weights, class_probs_ema) with the running distribution moved towards the batch's mean
    prediction (``momentum``: the weight kept on the old one); one sized to the logits' classes replaces an empty
    one (a model without a linear head)."""
    with torch.no_grad():
        probs = logits.softmax(1)
        if class_probs_ema.numel() != probs.shape[1]:
            class_probs_ema = torch.full_like(probs[0], 1.0 / probs.shape[1])
        diversity = _min_max(1 - F.cosine_similarity(class_probs_ema.unsqueeze(0), probs, dim=1))
        keep = diversity >= diversity.mean()
        certainty = _min_max(-entropy(logits))
        weights = torch.exp(diversity * certainty / temperature) * keep
        class_probs_ema.mul_(momentum).add_(probs.mean(0), alpha=1 - momentum)
    return keep, weights, class_probs_ema


def _smoothed_prior(logits: torch.Tensor) -> torch.Tensor:
    """The batch's mean prediction smoothed towards uniform: ``(p + s) / (1 + s C)``, ``s = max(1/N, 1/C) / max p``."""
    prior = logits.softmax(1).mean(0)
    n, c = logits.shape
    smooth = max(1 / n, 1 / c) / prior.max()
    return (prior + smooth) / (1 + smooth * c)
