"""Shared fixtures: tiny models with BN, LN and no norm layers, a fake CIFAR-10-C in the real layout, ../shared."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Derived values (EATA's Fisher, guard calibrations) are cached under a temporary folder, never in ~/.cache."""
    monkeypatch.setenv("TTA_CACHE", str(tmp_path_factory.getbasetemp() / "tta-cache"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def shared() -> Path:
    """The read-only real data and weights beside the checkout (see ../shared/DATA.md); skips when absent."""
    if not (SHARED / "DATA.md").is_file():
        pytest.skip(f"real data not available: {SHARED} is absent (it holds the CIFAR-10 test set and ResNets)")
    return SHARED


class TinyBNNet(nn.Module):
    """conv-BN-ReLU x2, pool, BN1d, linear: BatchNorm2d and BatchNorm1d in one small model."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(16),
        )
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TinyLNNet(nn.Module):
    """conv, GroupNorm, pool, LayerNorm, linear: no BatchNorm at all."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyGNNet(nn.Module):
    """conv-GroupNorm-ReLU x2, pool, linear: GroupNorm only (no BatchNorm, no LayerNorm)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
                                 nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def tiny_vit(seed: int = 0) -> nn.Module:
    """A 2-block timm ViT (patch 4, width 16, class token, any image size) behind [0, 1] input normalisation, as
    ``tta.load_model`` builds timm models: LayerNorm only, and prompt tokens fit (FOA)."""
    from timm.models.vision_transformer import VisionTransformer

    from tta.models.normalize import normalized

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0,
                                num_classes=10, dynamic_img_size=True, dynamic_img_pad=True)
    return normalized(vit, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).eval()


def _with_source_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BN layers non-trivial running statistics, as a pretrained network has, then switch to eval."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(5):
            model(torch.rand(32, 3, 16, 16, generator=g) * 0.8 + 0.1)
    return model.eval()


@pytest.fixture
def bn_model() -> nn.Module:
    return _with_source_stats(TinyBNNet())


@pytest.fixture
def ln_model() -> nn.Module:
    return TinyLNNet().eval()


@pytest.fixture
def gn_model() -> nn.Module:
    return TinyGNNet().eval()


@pytest.fixture
def vit_model() -> nn.Module:
    return tiny_vit()


@pytest.fixture
def no_norm_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


def write_fake_cifar_c(
    root: Path, corruptions: Sequence[str], per_severity: int = 20, size: int = 32, seed: int = 0,
    directory: str = "CIFAR-10-C",
) -> Path:
    """Write ``<root>/<directory>/{<corruption>,labels}.npy`` in the published layout (uint8 NHWC, 5 blocks)."""
    rng = np.random.default_rng(seed)
    out = root / directory
    out.mkdir(parents=True, exist_ok=True)
    labels = np.tile(rng.integers(0, 10, per_severity, dtype=np.uint8), 5)
    np.save(out / "labels.npy", labels)
    for c in corruptions:
        np.save(out / f"{c}.npy", rng.integers(0, 256, (5 * per_severity, size, size, 3), dtype=np.uint8))
    return out


@pytest.fixture
def fake_cifar_c(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing a fake CIFAR-10-C under tmp_path; returns the data dir (the parent of CIFAR-10-C/)."""

    def make(corruptions: Sequence[str] = ("gaussian_noise", "fog"), **kwargs: object) -> Path:
        write_fake_cifar_c(tmp_path / "data", corruptions, **kwargs)  # type: ignore[arg-type]
        return tmp_path / "data"

    return make


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for tests of many tiny tensor ops: on small shared machines threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Settings that keep a method's contract tests cheap without changing what they check (fewer augmented views).
CHEAP = {"memo": {"n_augmentations": 4}, "ttaug": {"n_augmentations": 4}, "rmt": {"warmup_samples": 800},
         "adacontrast": {"queue_size": 64, "warmup_samples": 16}, "foa": {"popsize": 4, "source_samples": 32}}
# Methods that adapt only Vision Transformers (prompt tokens), so not the BatchNorm CNNs every other method adapts.
VIT_ONLY = {"foa"}
# Methods that need clean source data for some models only (stream-stats: the statistics of GroupNorm layers).
SOURCE_FOR_SOME_MODELS = {"stream-stats"}


def _adapt_any(model: nn.Module, method: str, **overrides: object) -> nn.Module:
    import tta
    from tta.methods import get_method

    overrides = {**CHEAP.get(method, {}), **overrides}
    needs = get_method(method).requires.source_data or method in SOURCE_FOR_SOME_MODELS
    if needs and "source_data" not in overrides:
        g = torch.Generator().manual_seed(1)
        overrides["source_data"] = (torch.rand(64, 3, 16, 16, generator=g) * 0.8 + 0.1,
                                    torch.randint(0, 10, (64,), generator=g))
    return tta.adapt(model, method, **overrides)


@pytest.fixture
def adapt_any() -> Callable[..., nn.Module]:
    """``tta.adapt`` for any registered method, with small clean source data for the methods that need it."""
    return _adapt_any


@pytest.fixture
def record_steps() -> Callable[[nn.Module], list[list[torch.Tensor]]]:
    """Wraps an adapted model's ``optimizer.step`` so that the model's parameters after every step are recorded in
    the list it returns."""

    def wrap(adapted: nn.Module) -> list[list[torch.Tensor]]:
        stepped: list[list[torch.Tensor]] = []
        step = adapted.optimizer.step

        def record(*args: object, **kwargs: object) -> object:
            result = step(*args, **kwargs)
            stepped.append([p.detach().clone() for p in adapted.model.parameters()])
            return result

        adapted.optimizer.step = record
        return stepped

    return wrap
