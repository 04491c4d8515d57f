"""TTAug: test-time augmentation, the average prediction over AugMix views of each image (the reference benchmark's
baseline, as in MEMO's paper).

Per test image, as the reference benchmark runs it: the image itself and ``n_augmentations`` AugMix views of it
(random crop and flip, then AugMix; see ``tta.core.augmix``) go through the model as one batch, and the prediction
is the mean of their logits. BatchNorm layers normalise with BN-alpha statistics, (1 - ``bn_alpha``) source +
``bn_alpha`` statistics of that batch of views. Nothing is learned: every image is predicted by the source model.

A batch of N images is N such predictions. The views of an image are drawn from a ``torch.Generator`` seeded with
``seed`` and the image's content (as MEMO's), so an image's prediction never depends on its batch-mates or on what
came before. ``crop: resized`` gives the random resized crop the reference draws for ImageNet-sized images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tta.core.augmix import check_view_settings, seeded_views
from tta.core.base import AdaptedModel, StepOutput
from tta.norm.adaptive_bn import use_bn_alpha
from tta.registry import register


@dataclass(frozen=True)
class TTAugConfig:
    """Settings of ``ttaug`` (defaults: the reference benchmark's, 32 AugMix views and BN-alpha 0.1)."""

    n_augmentations: int = 32
    augmix_severity: float = 1.0
    crop: Literal["pad", "resized"] = "pad"
    bn_alpha: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        check_view_settings(self)


@register("ttaug")
class TTAug(AdaptedModel):
    """The mean logits over each image and its AugMix views (BN-alpha statistics per image); nothing is learned."""

    Config = TTAugConfig
    update = "none"

    def configure(self, model: nn.Module) -> nn.Module:
        model.eval()
        use_bn_alpha(model, self.config.bn_alpha)
        model.requires_grad_(False)
        return model

    def setup(self) -> None:
        self.window = 0  # each image is predicted from its own views: no sliding window of neighbours

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        return StepOutput(self.predict(x, domain))

    def predict(self, x: torch.Tensor, domain: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        logits = []
        for image in x.split(1):
            views = seeded_views(image, cfg)
            logits.append(self.model(torch.cat([image, views.to(image.dtype)])).mean(0))
        return torch.stack(logits)


__all__ = ["TTAug", "TTAugConfig"]
