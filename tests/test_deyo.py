"""DeYO: the step is skipped when no sample passes both filters; the shape-destroying views keep the pixels."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tta
from tta.core.views import color_affine_view, generator_from, new_rng_state, occlude, patch_shuffle, pixel_shuffle


def _batch(n: int = 16) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1


@pytest.mark.parametrize("settings", [{"margin": 1e-6}, {"margin": 10.0, "plpd_threshold": 1.0}],
                         ids=["entropy filter", "plpd filter"])
def test_step_is_skipped_when_nothing_passes_both_filters(bn_model: nn.Module, settings: dict) -> None:
    adapted = tta.adapt(bn_model, "deyo", **settings)
    before = {k: v.clone() for k, v in adapted.model.state_dict().items()}
    adapted(_batch())
    assert adapted.counters.skipped == 1 and adapted.counters.updates == 0
    assert int(adapted.last.n_used) == 0 and adapted.last.loss is None
    assert not adapted.optimizer.state
    assert all(torch.equal(v, before[k]) for k, v in adapted.model.state_dict().items())


def test_a_step_on_what_passes(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "deyo", margin=10.0, plpd_threshold=-1.0)
    before = [p.detach().clone() for p in adapted.params()]
    adapted(_batch())
    assert adapted.counters.updates == 1 and int(adapted.last.n_used) == 16
    assert any(not torch.equal(b, p) for b, p in zip(before, adapted.params(), strict=True))


def test_norm_layers_in_frozen_modules_do_not_adapt() -> None:
    model = nn.Sequential()
    model.add_module("stem", nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    model.add_module("layer4", nn.Sequential(nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)))
    model.add_module("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)))
    adapted = tta.adapt(model.eval(), "deyo")
    trainable = {n for n, p in adapted.model.named_parameters() if p.requires_grad}
    assert trainable == {"stem.1.weight", "stem.1.bias"}
    with pytest.raises(tta.ModelError, match="frozen_modules"):
        tta.adapt(model.eval(), "deyo", frozen_modules=["stem", "layer4"])


def test_patch_grid_larger_than_the_image_is_an_input_error(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "deyo", patch_len=32)
    before = [p.detach().clone() for p in adapted.params()]
    with pytest.raises(tta.InputError, match="patch_len 32 exceeds"):
        adapted(_batch())
    assert all(torch.equal(b, p) for b, p in zip(before, adapted.params(), strict=True))


def _multiset(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(2).sort(dim=2).values


@pytest.mark.parametrize("size", [16, 18])
def test_patch_shuffle_permutes_whole_patches(size: int) -> None:
    x = torch.rand(5, 3, size, size)
    with generator_from(new_rng_state()) as gen:
        out = patch_shuffle(x, 4, gen)
    assert out.shape == x.shape
    if size % 4:
        return  # resized around the shuffle: only the shape is kept
    assert torch.equal(_multiset(out), _multiset(x))
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4).reshape(5, 3, 16, 4, 4).transpose(1, 2)
    shuffled = out.unfold(2, 4, 4).unfold(3, 4, 4).reshape(5, 3, 16, 4, 4).transpose(1, 2)
    for i in range(5):
        matches = (shuffled[i].unsqueeze(1) == patches[i].unsqueeze(0)).flatten(2).all(2)
        assert bool(matches.any(1).all())  # every patch of the view is a patch of its own image
    assert not torch.equal(out, x)


def test_pixel_shuffle_and_occlusion() -> None:
    x = torch.rand(4, 3, 8, 8)
    with generator_from(new_rng_state()) as gen:
        out = pixel_shuffle(x, gen)
    assert torch.equal(_multiset(out), _multiset(x)) and not torch.equal(out, x)
    occluded = occlude(x, 4, 2, 3)
    torch.testing.assert_close(occluded[:, :, 2:6, 3:7], x.mean((2, 3), keepdim=True).expand(4, 3, 4, 4))
    assert torch.equal(occluded[:, :, :2], x[:, :, :2]) and torch.equal(occlude(x, 4, 50, 50), x)


def test_views_replay_from_the_generator_state() -> None:
    x = torch.rand(4, 3, 16, 16)
    state = new_rng_state()
    saved = state.clone()
    with generator_from(state) as gen:
        first = color_affine_view(x, gen)
    assert not torch.equal(state, saved)  # the state moved on
    with generator_from(saved) as gen:
        again = color_affine_view(x, gen)
    assert torch.equal(first, again) and first.shape == x.shape
    assert float(first.min()) >= 0 and float(first.max()) <= 1
