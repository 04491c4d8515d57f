"""TTAug: the mean logits over each image and its AugMix views; nothing is learned, images are independent."""

from __future__ import annotations

import copy

import torch
from torch import nn

import tta
from tta.core.augmix import augmix_views, content_seed


def _batch(seed: int = 1, n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def test_prediction_is_the_mean_over_the_image_and_its_views(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "ttaug", n_augmentations=6)
    x = _batch(n=2)
    out = adapted(x)
    for i in range(2):
        image = x[i:i + 1]
        views = augmix_views(image, 6, torch.Generator().manual_seed(content_seed(image, 0)))
        batch = torch.cat([image, views])
        # BN-alpha by hand: 0.9 source + 0.1 statistics of the 7 images, in the first BatchNorm's place
        model = copy.deepcopy(bn_model)
        expected = adapted.model(batch).mean(0)
        torch.testing.assert_close(out[i], expected)
        with torch.no_grad():
            conv_out = model.features[0](batch)
            bn = model.features[1]
            mean = 0.9 * bn.running_mean + 0.1 * conv_out.mean((0, 2, 3))
            var = 0.9 * bn.running_var + 0.1 * conv_out.var((0, 2, 3), unbiased=True)
            hand = (conv_out - mean[None, :, None, None]) / (var[None, :, None, None] + bn.eps).sqrt()
            hand = hand * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]
            torch.testing.assert_close(adapted.model.features[1](conv_out), hand)


def test_nothing_is_learned_and_images_are_independent(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "ttaug", n_augmentations=4)
    before = {k: v.clone() for k, v in adapted.state_dict().items() if isinstance(v, torch.Tensor)}
    x = _batch(n=3)
    together = adapted(x)
    adapted(_batch(seed=2))
    alone = torch.cat([adapted(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone)
    after = {k: v for k, v in adapted.state_dict().items() if isinstance(v, torch.Tensor)}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert adapted.optimizer is None


def test_more_views_move_the_prediction_away_from_the_plain_one(bn_model: nn.Module) -> None:
    x = _batch(n=2)
    one = tta.adapt(bn_model, "ttaug", n_augmentations=1, bn_alpha=0.0)(x)
    many = tta.adapt(bn_model, "ttaug", n_augmentations=8, bn_alpha=0.0)(x)
    plain = bn_model(x)
    assert not torch.allclose(one, plain) and not torch.allclose(many, one)
