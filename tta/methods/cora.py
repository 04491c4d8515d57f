"""CORA: context-routed adaptation, ``tta``'s own method (docs/methods/cora.md).

Inferred domain contexts for the normalisation statistics, one ROID-style gradient update for the rest, and no
setting to be told which stream it is on:

- every BatchNorm becomes a ``RecentContextNorm``: per-context statistics, contexts inferred from the images' style
  (``tta.context``; ``contexts: single`` puts every image in one target context instead). The contexts a batch
  creates route the batches after it (with ``immediate``, that batch itself; off by default: measured, with
  ``whole_batch`` it did not pay). A batch whose descriptors are one cloud (its held-out 2-means split separates it no
  further than the calibrated chance separation of as many source images) is one domain, and is routed whole to the
  context most responsible for it (``whole_batch``), so that its images are not normalised with a mixture of
  contexts that differ only by chance. A context's statistics follow its recent images: each batch share of ``b`` images
  moves them with rate ``b / (b + h)``, ``h`` the context's evidence, its images seen capped at ``stats_memory`` and
  at least ``prior_n`` (a new context starts from the source statistics, worth ``prior_n`` images), so a context
  that has just changed domain catches up within a batch, and a context's small shares in a mixed batch borrow from
  its history. Images routed to the source context are normalised with the source statistics blended with their
  own share as if the source were ``source_prior`` images (inf: the source statistics alone); the source's
  statistics themselves never change. With ``source_affine`` it also keeps the source BN's affine parameters and
  the adapted affine serves the target contexts only (off by default: measured, it did not pay);
- one gradient step per batch on the BN affine parameters, shared by every context (``update_affine``): ROID's
  certainty times diversity weighted soft likelihood ratio (``use_weighting``), weight ensembling with the source
  after the step (``src_momentum``; 1 switches it off) and the smoothed batch prior on the returned logits
  (``use_prior_correction``). ROID's augmentation consistency is left out: it doubles the cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.context.model import ContextInference, ContextNormModel, convert_context_norm
from tta.core.base import StepOutput
from tta.core.losses import soft_likelihood_ratio
from tta.core.params import IMAGENET_SGD, OptimizerConfig
from tta.core.requirements import Requirements
from tta.core.validate import check_range
from tta.methods._domain_norm import DomainNormMethod, check_context_inference
from tta.methods.roid import _smoothed_prior, certainty_diversity_weights, check_roid_update
from tta.norm.context_norm import DomainContextNorm
from tta.registry import register


@dataclass(frozen=True)
class CoraConfig(OptimizerConfig):
    """Settings of ``cora``: contexts and their statistics, then the ROID-style update (Adam 1e-3 by default)."""

    contexts: Literal["infer", "single"] = "infer"
    stats_memory: float = 64.0
    prior_n: float = 16.0
    min_subset: int = 2
    immediate: bool = False
    whole_batch: bool = True
    source_prior: float = 64.0
    source_affine: bool = False
    descriptor: Literal["first", "early", "half", "all"] = "half"
    split_quantile: float = 0.99
    calibration_images: int = 1000
    min_spawn: int = 8
    max_contexts: int = 16
    update_affine: bool = True
    use_weighting: bool = True
    use_prior_correction: bool = True
    src_momentum: float = 0.99
    probs_momentum: float = 0.9
    temperature: float = 1 / 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.contexts not in ("infer", "single"):
            raise ValueError(f"contexts must be 'infer' or 'single', got {self.contexts!r}")
        check_range("stats_memory", self.stats_memory, low=0.0, allow_inf=True)
        check_range("prior_n", self.prior_n, low=0.0)
        check_range("source_prior", self.source_prior, low=0.0, allow_inf=True)
        check_context_inference(self)
        check_roid_update(self)

    @property
    def infers(self) -> bool:
        """Whether contexts are inferred (and a source calibration is needed)."""
        return self.contexts == "infer"


class RecentContextNorm(DomainContextNorm):
    """A ``DomainContextNorm`` whose target contexts' statistics follow their recent images.

    A share of ``b`` images with mean ``m_b`` and variance ``v_b`` (BatchNorm's, over its values) moves context
    ``k``'s estimate with rate ``r = b / (b + h_k)``, ``h_k = max(min(images_k, memory), prior_n)``: the mean to
    ``(1 - r) m + r m_b``, the variance to the pooled ``(1 - r) v + r v_b + r (1 - r) (m - m_b)^2``. ``memory`` = inf
    pools every image the context has seen with the source worth ``prior_n`` images; 0 with ``prior_n`` 0 uses the
    share alone (AdaBN). The source context's share is normalised with the source blended the same way, as if the
    source held ``source_prior`` images (inf: the source BatchNorm), and its statistics never change; the source
    context's structural changes (merge) combine estimates as the ``ema`` rule does.
    """

    def __init__(self, num_features: int, memory: float = 64.0, source_prior: float = math.inf,
                 source_affine: bool = False, **kwargs: Any) -> None:
        super().__init__(num_features, **{**kwargs, "stats_update": "ema"})
        self.memory, self.source_prior, self.source_affine = float(memory), float(source_prior), source_affine

    def _affine(self, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """With ``source_affine``, context 0 takes the source BN's affine and the others the shared one."""
        gamma, beta = super()._affine(dtype)
        if not self.source_affine or gamma is None or beta is None or self.per_context_affine:
            return gamma, beta
        k = self.num_contexts - 1
        return (torch.cat([self.source_weight.to(dtype)[None], gamma.expand(k, -1)]),
                torch.cat([self.source_bias.to(dtype)[None], beta.expand(k, -1)]))

    def _context_stats(self, x: torch.Tensor, w: torch.Tensor, store: bool) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            flat = x.detach().reshape(x.shape[0], x.shape[1], -1).double()
            # each image's channel mean and variance in two passes: twice as fast as var_mean's Welford on CPU
            m_i = flat.mean(2)  # (N, C)
            v_i = (flat - m_i[..., None]).square_().mean(2)
            w = w.to(flat)
            images = w.sum(0)  # (K,)
            values = images * flat.shape[2]
            safe = images.clamp_min(1e-12)[:, None]
            mean = (w.t() @ m_i) / safe
            var = ((w.t() @ (v_i + m_i.square())) / safe - mean.square()).clamp_min(0.0)
            fresh = (images >= self.min_subset) & (values >= 2)
            source_rate = images[0] / (images[0] + self.source_prior) if bool(fresh[0]) else images[0] * 0
            fresh[0] = False  # the source context's running statistics stay the source's
            held = self.ctx_images.clamp_max(self.memory).clamp_min(self.prior_n)
            rate = torch.where(fresh, images / (images + held).clamp_min(1e-12), 0.0)[:, None]
            delta = mean - self.ctx_mean
            new_mean = self.ctx_mean + rate * delta
            new_var = (1 - rate) * self.ctx_var + rate * var + rate * (1 - rate) * delta.square()
            new_mean = torch.where(rate > 0, new_mean, self.ctx_mean)
            new_var = torch.where(rate > 0, new_var, self.ctx_var)
            if store:
                self.ctx_mean.copy_(new_mean)
                self.ctx_var.copy_(new_var)
                self.ctx_images.add_(torch.where(fresh, images, 0.0))
                self.ctx_values.add_(torch.where(fresh, values, 0.0))
            source_mean, source_var = self.source_mean.double()[None], self.source_var.double()[None]
            d0 = mean[:1] - source_mean
            source_var = (1 - source_rate) * source_var + source_rate * var[:1] \
                + source_rate * (1 - source_rate) * d0.square()
            source_mean = source_mean + source_rate * d0
            return torch.cat([source_mean, new_mean[1:]]), torch.cat([source_var, new_var[1:]])

    @torch.no_grad()
    def split_context(self, dst: int, src: int) -> None:
        """Both halves start from ``src``'s statistics; the new half ``dst`` with at most ``prior_n`` images of
        evidence, so that its own first share sets its statistics."""
        super().split_context(dst, src)
        self.ctx_images[dst] = self.ctx_images[dst].clamp_max(self.prior_n)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, memory={self.memory}"


@register("cora")
class Cora(DomainNormMethod):
    """Inferred-context statistics that follow recent images, with a ROID-style update of the shared BN affine."""

    Config = CoraConfig
    update = "gradient"
    requires = Requirements(norm_layers=(_BatchNorm,), running_stats=True, source_data=True)
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # ROID's ImageNet-C optimiser (ResNet-50, batch 64).
        "imagenet": IMAGENET_SGD,
    }

    def configure(self, model: nn.Module) -> nn.Module:
        model.eval().requires_grad_(False)
        cfg = self.config
        inference = ContextInference(self._calibration(model), cfg.descriptor, cfg.min_spawn, cfg.max_contexts) \
            if cfg.infers else None
        wrapped = convert_context_norm(
            model, prior_n=cfg.prior_n, min_subset=cfg.min_subset, inference=inference,
            layer=RecentContextNorm, layer_options={"memory": cfg.stats_memory, "source_prior": cfg.source_prior,
                                        "source_affine": cfg.source_affine})
        wrapped.router.immediate = cfg.immediate
        wrapped.router.whole_batch = cfg.whole_batch
        wrapped.requires_grad_(False)
        for layer in wrapped.layers():
            for p in (layer.weight, layer.bias):
                if p is not None:
                    p.requires_grad_(True)
        return wrapped.eval()

    def setup(self) -> None:
        classes = self.num_classes or 0
        self.add_state("class_probs_ema", torch.full((classes,), 1.0 / max(classes, 1)), dynamic=not classes)

    def params(self) -> list[nn.Parameter]:
        model: ContextNormModel = self.model  # type: ignore[assignment]
        return [p for layer in model.layers() for p in (layer.weight, layer.bias) if p is not None]

    def make_optimizer(self) -> torch.optim.Optimizer | None:
        from tta.core.params import make_optimizer

        return make_optimizer(self.params(), self.config)

    def _forward(self, x: torch.Tensor, store: bool = True) -> torch.Tensor:
        # one target context for every image (``single``), or contexts inferred from the images (ids never read)
        ids = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if self.config.contexts == "single" else None
        return self.model(x, domain=ids, store=store)

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        cfg = self.config
        logits = self._forward(x)
        n = x.shape[0]
        keep = torch.ones(n, dtype=torch.bool, device=x.device)
        weights = torch.ones(n, dtype=logits.dtype, device=x.device)
        if cfg.use_weighting:
            keep, weights, self.class_probs_ema = certainty_diversity_weights(
                logits, self.class_probs_ema, cfg.temperature, cfg.probs_momentum)
        if not cfg.update_affine:
            return StepOutput(logits.detach())
        slr = soft_likelihood_ratio(logits)
        loss = (slr * weights)[keep].sum() / n
        return StepOutput(logits.detach(), loss, n_used=keep.sum(),
                          diagnostics={"slr": slr.detach().mean(), "weight": weights.mean()})

    def after_step(self, x: torch.Tensor, domain: torch.Tensor | None, out: StepOutput) -> StepOutput:
        cfg = self.config
        if cfg.src_momentum < 1.0:
            with torch.no_grad():
                model: ContextNormModel = self.model  # type: ignore[assignment]
                for layer in model.layers():
                    if layer.weight is not None and layer.bias is not None:
                        layer.weight.mul_(cfg.src_momentum).add_(layer.source_weight, alpha=1 - cfg.src_momentum)
                        layer.bias.mul_(cfg.src_momentum).add_(layer.source_bias, alpha=1 - cfg.src_momentum)
        if cfg.use_prior_correction:
            out.logits = out.logits * _smoothed_prior(out.logits)
        return out

    def predict(self, x: torch.Tensor, domain: torch.Tensor | None) -> torch.Tensor:
        logits = self._forward(x, store=False)
        return logits * _smoothed_prior(logits) if self.config.use_prior_correction else logits


__all__ = ["Cora", "CoraConfig", "RecentContextNorm"]
