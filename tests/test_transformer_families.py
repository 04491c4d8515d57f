"""Swin and ConvNeXt (timm, tiny and randomly initialised) run through the methods that apply to LayerNorm models:
the norm-affine methods change LayerNorm affine parameters only (ConvNeXt's channels-first LayerNorm2d included),
and every method returns finite logits of the right shape."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import tta
from tta.models.normalize import normalized

NORM_AFFINE = ["tent", "eta", "sar", "deyo", "roid", "shot-im", "rpl"]
OTHERS = ["source", "lame", "cotta", "cmf", "rotta", "memo", "ttaug"]


def tiny_swin() -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    net = SwinTransformer(img_size=32, patch_size=2, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                          num_classes=10)
    return normalized(net, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).eval()


def tiny_convnext() -> nn.Module:
    from timm.models.convnext import ConvNeXt

    torch.manual_seed(0)
    net = ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16), patch_size=2, num_classes=10)
    return normalized(net, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).eval()


FAMILIES: dict[str, Callable[[], nn.Module]] = {"swin": tiny_swin, "convnext": tiny_convnext}


def _layer_norm_affine(model: nn.Module) -> set[str]:
    return {f"{name}.{p}" for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)
            for p in ("weight", "bias") if getattr(m, p, None) is not None}


def _batches(n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(8, 3, 32, 32, generator=g) for _ in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", NORM_AFFINE)
def test_norm_affine_methods_change_only_layer_norm_affine(family: str, method: str) -> None:
    model = FAMILIES[family]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = tta.adapt(model, method)
    for x in _batches():
        out = adapted(x)
        assert out.shape == (8, 10) and torch.isfinite(out).all()
    after = adapted.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= _layer_norm_affine(model), sorted(changed - _layer_norm_affine(model))[:5]
    if method in ("tent", "shot-im", "rpl"):  # no sample selection: every step moves the affine parameters
        assert changed


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", OTHERS)
def test_other_methods_run(family: str, method: str) -> None:
    adapted = tta.adapt(FAMILIES[family](), method)
    for x in _batches():
        out = adapted(x)
        assert out.shape == (8, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["adabn", "cora", "tribe"])
def test_batchnorm_methods_refuse_them_with_the_fix(family: str, method: str) -> None:
    with pytest.raises(tta.ModelError, match="use a"):
        tta.adapt(FAMILIES[family](), method)
