"""MEMO: marginal entropy minimisation over augmented views of each test image (Zhang et al., NeurIPS 2022).

Per test image, as the reference benchmark runs it: ``n_augmentations`` AugMix views of the image (random crop and
flip, then AugMix; see ``tta.core.augmix``), one optimiser step on every parameter of the model minimising the
entropy of the views' average prediction, then the prediction of the image itself with the updated model, then back
to the source (``reset_every: 1``, episodic). BatchNorm layers normalise with BN-alpha statistics,
(1 - ``bn_alpha``) source + ``bn_alpha`` statistics of the current forward (the views while adapting, the single
image while predicting); the batch statistics carry no gradient.

MEMO is a single-image method: a batch of N images is N episodes, one after the other, each starting from the
model as it was before the batch (the source, when episodic); the result is the same as passing the images one at a
time. The sliding window does not apply. The views of an image are drawn from a ``torch.Generator`` seeded with
``seed`` and the image's content, so an image's prediction does not depend on what came before it, and ``reset()``
or a saved state resume exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from tta.core.augmix import check_view_settings, seeded_views
from tta.core.base import AdaptedModel, StepOutput
from tta.core.losses import marginal_entropy
from tta.core.params import IMAGENET_SGD, OptimizerConfig
from tta.norm.adaptive_bn import use_bn_alpha
from tta.registry import register


@dataclass(frozen=True)
class MEMOConfig(OptimizerConfig):
    """Settings of ``memo``: the optimiser's (episodic by default), the views and the BN-alpha weight."""

    reset_every: int = 1
    n_augmentations: int = 32
    augmix_severity: float = 1.0
    crop: Literal["pad", "resized"] = "pad"
    bn_alpha: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_view_settings(self)


@register("memo")
class MEMO(AdaptedModel):
    """Marginal entropy over AugMix views of each image, one step on all parameters, episodic (batch = N episodes)."""

    Config = MEMOConfig
    update = "gradient"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The reference benchmark's ImageNet-C settings (ResNet-50, one image at a time).
        "imagenet": {**IMAGENET_SGD, "n_augmentations": 64, "crop": "resized"},
    }

    def configure(self, model: nn.Module) -> nn.Module:
        model.eval()
        use_bn_alpha(model, self.config.bn_alpha)
        model.requires_grad_(True)
        return model

    def setup(self) -> None:
        self.window = 0  # each image is its own episode: no sliding window of neighbours

    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def step(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        """One episode per image of the batch, in order."""
        if x.shape[0] == 1:
            return super().step(x, domain)
        episode = super().step
        outs = [episode(x[i:i + 1], None if domain is None else domain[i:i + 1]) for i in range(x.shape[0])]
        losses = [o.loss for o in outs if o.loss is not None]
        loss = torch.stack(losses).mean() if losses else None
        out = StepOutput(torch.cat([o.logits for o in outs]), loss, len(outs),
                         {} if loss is None else {"marginal_entropy": loss})
        self.last = out
        return out

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        cfg = self.config
        loss = marginal_entropy(self.model(seeded_views(x, cfg)))
        return StepOutput(x.new_empty(0), loss, 1)

    def after_step(self, x: torch.Tensor, domain: torch.Tensor | None, out: StepOutput) -> StepOutput:
        with torch.no_grad():
            logits = self.model(x)
        loss = None if out.loss is None else out.loss.detach()
        return StepOutput(logits, loss, out.n_used, {} if loss is None else {"marginal_entropy": loss})


__all__ = ["MEMO", "MEMOConfig"]
