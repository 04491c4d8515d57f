"""TTAug: per image, the mean logits over the image and 32 AugMix views of it (views seeded by the image's content),
BN-alpha 0.1 statistics of those 33 images; nothing is learned."""

import torch
from torch import nn

from hand_loops.memo import _swap
from tta.core.augmix import augmix_views, content_seed


def make(model: nn.Module, device: torch.device, source: object = None):
    model.eval()
    _swap(model)
    model.requires_grad_(False)

    def step(x: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.no_grad():
            for image in x.split(1):
                views = augmix_views(image, 32, torch.Generator().manual_seed(content_seed(image, 0)))
                out.append(model(torch.cat([image, views])).mean(0))
        return torch.stack(out)

    return step
