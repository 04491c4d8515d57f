"""FOA: forward only (no backward pass, no weight change), prompts searched with CMA-ES, back-to-source shifting."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import TinyBNNet, tiny_vit
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import tta
from tta.methods.foa import CMAES

CHEAP = {"popsize": 6, "source_samples": 48}


def _source(n: int = 48, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g) * 0.8 + 0.1, torch.randint(0, 10, (n,), generator=g)


def _foa(model: nn.Module | None = None, **settings: object) -> tta.AdaptedModel:
    return tta.adapt(model if model is not None else tiny_vit(), "foa", source_data=_source(),
                     **{**CHEAP, **settings})


def _batch(seed: int, n: int = 12) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_never_runs_a_backward_pass_nor_changes_a_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    backward = torch.autograd.backward
    monkeypatch.setattr(torch.autograd, "backward", lambda *a, **k: (calls.append(1), backward(*a, **k))[1])
    grad = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: (calls.append(1), grad(*a, **k))[1])
    model = tiny_vit()
    adapted = _foa(model)
    weights = {k: v.clone() for k, v in adapted.model.state_dict().items()}
    for seed in range(4):
        out = adapted(_batch(seed))
        assert not out.requires_grad
    assert calls == [] and adapted.optimizer is None
    assert all(not p.requires_grad for p in adapted.model.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in adapted.model.state_dict().items())
    assert adapted.generation == 4 and not torch.equal(adapted.cma_mean, torch.zeros_like(adapted.cma_mean))


@pytest.mark.parametrize(("model", "message"), [
    (TinyBNNet().eval(), "needs a timm VisionTransformer .* not a TinyBNNet; use a timm VisionTransformer"),
    (VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=10,
                       global_pool="avg"), "pools with 'avg'; use a timm"),
    (VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, num_classes=10,
                       class_token=False, global_pool="avg"), "has no class token"),
])
def test_models_without_a_promptable_class_token_are_refused(model: nn.Module, message: str) -> None:
    with pytest.raises(tta.ModelError, match=message):
        tta.adapt(model, "foa", source_data=_source())


def test_torchvision_vits_are_refused_with_the_fix() -> None:
    import torchvision

    model = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=1, num_heads=2,
                                                 hidden_dim=8, mlp_dim=8, num_classes=10)
    with pytest.raises(tta.ModelError, match="not a VisionTransformer; use a timm VisionTransformer"):
        tta.adapt(model, "foa", source_data=_source())


def test_needs_clean_source_data() -> None:
    with pytest.raises(tta.ConfigError, match="source"):
        tta.adapt(tiny_vit(), "foa")


def test_without_prompts_the_features_give_the_models_own_prediction() -> None:
    adapted = _foa()
    x = _batch(0)
    feats = adapted._features(x, None)
    assert feats.shape == (12, 2 * 16)
    torch.testing.assert_close(adapted._head(feats[:, -16:], None), adapted.model(x))


def test_prompts_are_tokens_after_the_class_token() -> None:
    adapted = _foa(num_prompts=5)
    seen = []
    hook = adapted._vit.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    adapted(_batch(0))
    hook.remove()
    assert set(seen) == {1 + 5 + 16}  # class token, prompts, 4x4 patches
    assert adapted.best_prompts.shape == (5 * 16,) and adapted.es.dim == 80


def test_the_prediction_is_the_kept_prompts_with_the_shift_of_the_previous_batches() -> None:
    adapted = _foa()
    first = adapted(_batch(0))
    feats = adapted._features(_batch(0), adapted.best_prompts.float())
    torch.testing.assert_close(first, adapted._head(feats[:, -16:], None))  # the first batch is not shifted
    shift = adapted.source_mean[-16:] - adapted.test_mean
    second = adapted(_batch(1))
    feats = adapted._features(_batch(1), adapted.best_prompts.float())
    torch.testing.assert_close(second, adapted._head(feats[:, -16:], shift))


def test_without_shifting_the_head_sees_the_plain_class_feature() -> None:
    adapted = _foa(shift=False)
    for seed in range(2):
        out = adapted(_batch(seed))
    feats = adapted._features(_batch(1), adapted.best_prompts.float())
    torch.testing.assert_close(out, adapted._head(feats[:, -16:], None))


def test_the_kept_prompts_never_get_worse_on_a_repeated_batch() -> None:
    adapted = _foa()
    x = _batch(3)
    fitness = []
    for _ in range(6):
        adapted(x)
        fitness.append(float(adapted.last.diagnostics["fitness"]))
    assert all(b <= a for a, b in itertools.pairwise(fitness))
    assert fitness[-1] < fitness[0]


def test_source_statistics_are_those_of_the_clean_images() -> None:
    adapted = _foa(source_samples=40)
    images, _ = adapted.source_data.sample(40, seed=0)  # as stored (uint8), drawn as the method draws them
    std, mean = torch.std_mean(adapted._features(images, None), dim=0)
    torch.testing.assert_close(adapted.source_mean, mean)
    torch.testing.assert_close(adapted.source_std, std)


def test_single_images_need_the_sliding_window() -> None:
    with pytest.raises(tta.InputError, match="at least 2 images"):
        _foa()(_batch(0, n=1))
    assert _foa(window=4)(_batch(0, n=1)).shape == (1, 10)


@pytest.mark.parametrize("dim", [4, 20])
def test_cma_es_minimises_an_ill_conditioned_quadratic(dim: int) -> None:
    es = CMAES(dim, 4 + int(3 * math.log(dim)))
    state = es.initial_state(1.0)
    g = torch.Generator().manual_seed(0)
    target = torch.linspace(-2, 2, dim, dtype=torch.float64)
    scale = 10 ** torch.linspace(0, 2, dim, dtype=torch.float64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return (((x - target) ** 2) * scale).sum(-1)

    for generation in range(1, 600):
        x = es.ask(state, torch.randn(es.popsize, dim, generator=g, dtype=torch.float64))
        es.tell(state, x, f(x), generation, generation % es.eigen_every == 0)
    assert float(f(state["mean"])) < 1e-8
    eigen = torch.linalg.eigvalsh(state["cov"])
    assert float(eigen.max() / eigen.min()) > 10  # the covariance learned the scaling


@pytest.mark.parametrize("bad", [{"popsize": 1}, {"num_prompts": 0}, {"sigma0": 0.0}, {"shift_momentum": 1.5}])
def test_settings_are_checked(bad: dict[str, object]) -> None:
    with pytest.raises(tta.ConfigError):
        _foa(**bad)


def test_the_pass_counter_sees_forward_passes_only() -> None:
    from tta.run.cost import PassCounter

    adapted = _foa()
    counter = PassCounter()
    with counter.attached(adapted.model, 10):
        adapted(_batch(0))
    assert counter.backward == 0 and counter.forward == 12 * (6 + 1)  # every candidate and the previous best
    counter = PassCounter()
    with counter.attached(adapted.model, 10):
        adapted(_batch(1))  # shifted: still one pass per candidate
    assert counter.backward == 0 and counter.forward == 12 * (6 + 1)
