"""ViT presets as their authors ran ViT-B/16, which LayerNorms each method adapts on a ViT, the methods that refuse
a ViT, and the self-describing file a ViT trained from scratch is saved in."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_vit
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import tta
from tta.models.normalize import normalized
from tta.models.saved import FORMAT, VERSION
from tta.run.spec import method_settings

SGD_1E3 = {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "nesterov": False}


@pytest.mark.parametrize(("method", "expected"), [
    ("tent", SGD_1E3),
    ("eta", {**SGD_1E3, "d_margin": 0.05}),
    ("eata", {**SGD_1E3, "d_margin": 0.05, "fisher_alpha": 2000.0}),
    ("sar", {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "freeze_final_norm": True}),
    ("deyo", {**SGD_1E3, "plpd_threshold": 0.2, "margin": 0.5, "margin_e0": 0.4}),
    ("cotta", {"optimizer": "sgd", "lr": 0.005, "momentum": 0.9, "nesterov": False, "restore_prob": 0.001,
               "aug_threshold": 0.1, "loss": "symmetric"}),
    ("foa", {"num_prompts": 3, "fitness_lambda": 0.4, "popsize": 27}),
])
def test_vit_presets_are_the_published_settings(method: str, expected: dict[str, object]) -> None:
    settings = method_settings(method, preset="vit")
    assert {k: getattr(settings, k) for k in expected} == expected


def _twelve_blocks() -> nn.Module:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=8, embed_dim=8, depth=12, num_heads=1, mlp_ratio=1.0,
                            num_classes=10)
    return normalized(vit, (0.5,) * 3, (0.5,) * 3).eval()


def _adapted_norms(adapted: tta.AdaptedModel) -> set[str]:
    ids = {id(p) for p in adapted.params()}
    return {name.rsplit(".", 1)[0] for name, p in adapted.model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize(("method", "preset", "final_norm"), [
    ("sar", None, True),  # the reference benchmark: behind the normalisation wrapper its final norm adapts
    ("sar", "vit", False),  # SAR's official ViT runs freeze it
    ("deyo", None, False),  # DeYO freezes modules named norm, wrapped or not
    ("deyo", "vit", False),
])
def test_sar_and_deyo_leave_the_top_blocks_of_a_vit_alone(method: str, preset: str | None, final_norm: bool) -> None:
    norms = _adapted_norms(tta.adapt(_twelve_blocks(), method, preset=preset))
    blocks = {f"1.blocks.{i}.norm{j}" for i in range(9) for j in (1, 2)}
    assert norms == blocks | ({"1.norm"} if final_norm else set())


@pytest.mark.parametrize("method", ["tent", "eta", "roid"])
def test_entropy_methods_adapt_every_layernorm_of_a_vit(method: str) -> None:
    norms = _adapted_norms(tta.adapt(_twelve_blocks(), method))
    assert norms == {f"1.blocks.{i}.norm{j}" for i in range(12) for j in (1, 2)} | {"1.norm"}


# A random ViT is unsure of everything: accept every sample, so that one batch certainly updates.
EVERY_SAMPLE = {"eta": {"e_margin": 1.0}, "eata": {"e_margin": 1.0}, "sar": {"e_margin": 1.0},
                "deyo": {"margin": 1.0, "plpd_threshold": -1.0}, "cotta": {"n_augmentations": 2}}


@pytest.mark.parametrize("method", ["tent", "eta", "eata", "sar", "deyo", "cotta"])
def test_vit_presets_adapt_a_vit(method: str) -> None:
    g = torch.Generator().manual_seed(0)
    source = (torch.rand(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g))
    adapted = tta.adapt(tiny_vit(), method, preset="vit", source_data=source, **EVERY_SAMPLE.get(method, {}))
    before = [p.clone() for p in adapted.params()]
    out = adapted(torch.rand(16, 3, 16, 16, generator=g))
    assert out.shape == (16, 10) and torch.isfinite(out).all()
    assert adapted.counters.updates == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, adapted.params(), strict=True))


@pytest.mark.parametrize("method", ["adabn", "dsbn", "context-norm", "stream-stats", "afn"])
def test_batchnorm_methods_refuse_a_vit_with_the_fix(method: str) -> None:
    with pytest.raises(tta.ModelError, match=r"but the model has no .*; use a model with such layers"):
        tta.adapt(tiny_vit(), method)


def test_a_timm_model_trained_from_scratch_loads_from_its_self_describing_file(tmp_path: Path) -> None:
    kwargs = {"img_size": 16, "patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2, "num_classes": 10}
    model = tta.load_model("timm:test_vit", pretrained=False, model_kwargs=kwargs)
    path = tmp_path / "vit.pt"
    torch.save({"format": FORMAT, "version": VERSION, "method": None, "settings": {},
                "build": {"name": "timm:test_vit", "dataset": "cifar10", "pretrained": False, "model_kwargs": kwargs},
                "state_dict": model.state_dict()}, path)
    loaded = tta.load_model(checkpoint=path)
    x = torch.rand(4, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    assert not loaded.training
