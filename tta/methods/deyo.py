"""DeYO: destroy your object, entropy minimisation on samples whose prediction relies on the object's shape
(Lee et al., ICLR 2024).

One gradient step per batch on the affine parameters of the norm layers (BatchNorm always on batch statistics):

1. keep the samples whose prediction entropy is below ``margin * ln C``;
2. predict a view of the kept images whose shape is destroyed (``aug_type``: ``patch``, the image cut into a
   ``patch_len x patch_len`` grid of patches shuffled per image; ``pixel``, all pixels shuffled; ``occ``, a square
   window replaced by the image mean) and keep those whose PLPD, the drop of the pseudo-label's probability from
   the image to the view, exceeds ``plpd_threshold``;
3. minimise the mean entropy of what is left, each sample weighted by ``exp(margin_e0 * ln C - entropy)``
   (``reweight_ent``) plus ``exp(PLPD)`` (``reweight_plpd``).

The step is skipped when no sample passes both filters. The returned logits are those before the update. Norm layers
inside modules named in ``frozen_modules`` (dotted-path components, e.g. ``layer4`` of a ResNet-50, the last three
blocks and the final norm of a ViT-B) are not adapted, as in the reference; they match nothing on CIFAR ResNets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from tta.core.base import AdaptedModel, StepOutput
from tta.core.losses import entropy, entropy_margin
from tta.core.params import IMAGENET_SGD, VIT_SGD, OptimizerConfig, norm_layers
from tta.core.reliable import eval_with_batch_statistics
from tta.core.validate import check_range
from tta.core.views import generator_from, new_rng_state, occlude, patch_shuffle, pixel_shuffle
from tta.errors import InputError, ModelError
from tta.registry import register


@dataclass(frozen=True)
class DeyoConfig(OptimizerConfig):
    """Settings of ``deyo`` (defaults: the reference benchmark's CIFAR-10-C configuration, Adam 1e-3)."""

    margin: float = 0.5
    margin_e0: float = 0.4
    plpd_threshold: float = 0.2
    reweight_ent: bool = True
    reweight_plpd: bool = True
    aug_type: Literal["patch", "pixel", "occ"] = "patch"
    patch_len: int = 4
    occlusion_size: int = 112
    row_start: int = 56
    column_start: int = 56
    frozen_modules: tuple[str, ...] = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("margin", self.margin, low=0.0, low_open=True)
        check_range("margin_e0", self.margin_e0, low=0.0)
        check_range("plpd_threshold", self.plpd_threshold, low=-1.0, high=1.0)
        for name in ("patch_len", "occlusion_size"):
            check_range(name, getattr(self, name), low=1, high=4096)
        for name in ("row_start", "column_start"):
            check_range(name, getattr(self, name), low=0, high=4096)


def _frozen(name: str, frozen: tuple[str, ...]) -> bool:
    path = f".{name}."
    return any(f".{f}." in path for f in frozen)


def adapted_params(model: nn.Module, frozen: tuple[str, ...]) -> list[nn.Parameter]:
    """Affine weight and bias of the norm layers of ``model`` outside the ``frozen`` modules, in module order."""
    layers = set(map(id, norm_layers(model)))
    return [p for name, m in model.named_modules() if id(m) in layers and not _frozen(name, frozen)
            for p in (getattr(m, "weight", None), getattr(m, "bias", None)) if p is not None]


@register("deyo")
class Deyo(AdaptedModel):
    """Entropy minimisation on confident samples whose prediction drops on a shape-destroyed (patch-shuffled) view."""

    Config = DeyoConfig
    update = "gradient"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The reference benchmark's ImageNet-C settings (ResNet-50, batch 64).
        "imagenet": IMAGENET_SGD,
        # DeYO's official ViT-B/16 runs (batch 64); its defaults (plpd_threshold 0.2, frozen last blocks) apply.
        "vit": VIT_SGD,
    }

    def check_model(self, model: nn.Module) -> None:
        if not adapted_params(model, self.config.frozen_modules):
            raise ModelError("deyo adapts the affine parameters of BatchNorm, LayerNorm or GroupNorm layers outside "
                             f"frozen_modules {list(self.config.frozen_modules)}, and this model has none; use a model "
                             "with affine norm layers or set frozen_modules=[]")

    def configure(self, model: nn.Module) -> nn.Module:
        return eval_with_batch_statistics(model, adapted_params(model, self.config.frozen_modules))

    def setup(self) -> None:
        self.add_state("rng_state", new_rng_state())

    def params(self) -> list[nn.Parameter]:
        return adapted_params(self.model, self.config.frozen_modules)

    def destroy(self, x: torch.Tensor) -> torch.Tensor:
        """The view of ``x`` whose object shape is destroyed (``aug_type``)."""
        cfg = self.config
        if cfg.aug_type == "occ":
            return occlude(x, cfg.occlusion_size, cfg.row_start, cfg.column_start)
        with generator_from(self.rng_state) as gen:
            return patch_shuffle(x, cfg.patch_len, gen) if cfg.aug_type == "patch" else pixel_shuffle(x, gen)

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        cfg = self.config
        if cfg.aug_type == "patch" and cfg.patch_len > min(x.shape[-2:]):
            raise InputError(f"patch_len {cfg.patch_len} exceeds the image size {tuple(x.shape[-2:])}; set "
                             "patch_len to at most the image side (4 is the reference's)")
        logits = self.model(x)
        num_classes = logits.shape[1]
        ent = entropy(logits)
        reliable = ent < entropy_margin(num_classes, cfg.margin)
        out = StepOutput(logits.detach(), None, n_used=0, diagnostics={"entropy": ent.detach().mean()})
        if not bool(reliable.any()):
            return out
        ent, kept_logits = ent[reliable], logits[reliable].detach()
        with torch.no_grad():
            view_probs = self.model(self.destroy(x[reliable].detach())).softmax(1)
            probs = kept_logits.softmax(1)
            label = probs.argmax(1, keepdim=True)
            plpd = (probs.gather(1, label) - view_probs.gather(1, label)).squeeze(1)
        shape_based = plpd > cfg.plpd_threshold
        out.diagnostics["plpd"] = plpd.mean()
        if not bool(shape_based.any()):
            return out
        ent, plpd = ent[shape_based], plpd[shape_based]
        if cfg.reweight_ent or cfg.reweight_plpd:
            e0 = entropy_margin(num_classes, cfg.margin_e0)
            coeff = float(cfg.reweight_ent) * torch.exp(e0 - ent.detach()) + float(cfg.reweight_plpd) * plpd.exp()
            ent = ent * coeff
        out.loss, out.n_used = ent.mean(), shape_based.sum()
        return out
