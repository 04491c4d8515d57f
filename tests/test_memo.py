"""MEMO: episodic per image, a batch is its images one at a time, the loss is the views' marginal entropy; AugMix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import tta
from tta.core.augmix import _apply, augmix_views, content_seed

VIEWS = 4  # fewer views than the default 32: the invariants do not depend on the count


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_memo_is_episodic_and_updates_every_parameter(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "memo", n_augmentations=VIEWS, lr=0.05)
    source = _state(adapted.model)
    seen: list[bool] = []

    def changed(*_: object) -> None:  # before the reset that ends the episode: the update happened
        seen.append(any(not torch.equal(v, source[k]) for k, v in adapted.model.state_dict().items()))

    original = adapted.after_step
    adapted.after_step = lambda x, d, out: (changed(), original(x, d, out))[1]  # type: ignore[method-assign]
    adapted(torch.rand(3, 3, 16, 16))
    assert seen == [True, True, True]
    after = adapted.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in source.items())  # back to the source after every image
    assert adapted.counters.updates == 3 and adapted.counters.resets == 3
    assert all(p.requires_grad for p in adapted.model.parameters())


def test_a_batch_is_its_images_one_at_a_time(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "memo", n_augmentations=VIEWS)
    x = torch.rand(4, 3, 16, 16)
    batch = adapted(x)
    singles = torch.cat([adapted(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batch, singles, atol=0, rtol=0)


def test_the_loss_is_the_marginal_entropy_of_the_views(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "memo", n_augmentations=VIEWS)
    x = torch.rand(1, 3, 16, 16)
    adapted(x)  # afterwards, adapted.model is the source model again (with its BN-alpha layers)
    views = augmix_views(x, VIEWS, torch.Generator().manual_seed(content_seed(x, 0)))
    with torch.no_grad():
        mean_probs = adapted.model(views).softmax(1).mean(0)
    expected = -(mean_probs * mean_probs.log()).sum()
    torch.testing.assert_close(adapted.last.loss, expected, atol=1e-5, rtol=1e-5)


def test_the_sliding_window_does_not_apply(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "memo", n_augmentations=VIEWS, window=8)
    x = torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(adapted(x), adapted(x), atol=0, rtol=0)
    assert adapted.counters.updates == 2


def test_bad_settings_are_rejected(bn_model: nn.Module) -> None:
    for bad in ({"n_augmentations": 0}, {"bn_alpha": 1.5}, {"crop": "centre"}, {"seed": -1}):
        with pytest.raises(tta.ConfigError):
            tta.adapt(bn_model, "memo", **bad)


def test_views_are_reproducible_in_range_and_varied() -> None:
    x = torch.rand(2, 3, 32, 32)
    for crop in ("pad", "resized"):
        views = augmix_views(x, 8, torch.Generator().manual_seed(3), crop=crop)
        assert views.shape == (16, 3, 32, 32)
        assert views.min() >= 0 and views.max() <= 1
        torch.testing.assert_close(views, augmix_views(x, 8, torch.Generator().manual_seed(3), crop=crop))
        assert not torch.equal(views[0], views[1])


@pytest.mark.parametrize(("name", "exact"), [
    ("autocontrast", True), ("equalize", True), ("posterize", True), ("solarize", True), ("translate_x", True),
    ("translate_y", True), ("rotate", False), ("shear_x", False), ("shear_y", False),
])
def test_operations_match_pil(name: str, exact: bool) -> None:
    from PIL import Image, ImageOps

    level, size = 1.0, 32  # AugMix's severity 1 at its strongest, on CIFAR-sized images
    pil_ops = {
        "autocontrast": ImageOps.autocontrast,
        "equalize": ImageOps.equalize,
        "posterize": lambda im: ImageOps.posterize(im, 4),
        "solarize": lambda im: ImageOps.solarize(im, 256 - 25),
        "translate_x": lambda im: im.transform((size, size), Image.AFFINE, (1, 0, 1, 0, 1, 0), Image.BILINEAR),
        "translate_y": lambda im: im.transform((size, size), Image.AFFINE, (1, 0, 0, 0, 1, 1), Image.BILINEAR),
        "rotate": lambda im: im.rotate(3, resample=Image.BILINEAR),
        "shear_x": lambda im: im.transform((size, size), Image.AFFINE, (1, 0.03, 0, 0, 1, 0), Image.BILINEAR),
        "shear_y": lambda im: im.transform((size, size), Image.AFFINE, (1, 0, 0, 0.03, 1, 0), Image.BILINEAR),
    }
    rng = np.random.default_rng(0)
    images = (rng.random((4, size, size, 3)) ** 2 * 200 + 20).astype(np.uint8)  # skewed: equalize has work to do
    expected = np.stack([np.asarray(pil_ops[name](Image.fromarray(im))) for im in images]).astype(np.float32)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    ours = _apply(name, x, torch.full((4,), level, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    diff = np.abs(ours.permute(0, 2, 3, 1).numpy() * 255 - expected)
    if exact:
        assert diff.max() <= 1.0 + 1e-3  # the same 8-bit values up to one level of rounding
        assert diff.mean() < 0.05
    else:  # bilinear resampling differs from PIL's in the last bits
        assert diff.mean() < 3.0
