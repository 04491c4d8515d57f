"""The warm-up registry: a conversion is one registered value, and the one training loop runs any of them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

from tta.errors import ConfigError
from tta.warmup import CONVERSIONS, Conversion, register_conversion, warmup
from tta.warmup.job import WarmupJob
from tta.warmup.train import Recipe


class Scale(nn.Module):
    """A learned per-channel scale after a frozen BatchNorm: the toy conversion's layer."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        self.bn, self.scale = bn, nn.Parameter(torch.ones(bn.num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * self.scale[:, None, None]


def _convert(model: nn.Module, settings: dict) -> nn.Module:
    for name, child in list(model.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, Scale(child))
        else:
            _convert(child, settings)
    return model


@pytest.fixture
def toy() -> Iterator[tuple[Conversion, list[str]]]:
    calls: list[str] = []
    conversion = register_conversion(Conversion(
        name="toy-scale", settings={"unused": 1}, recipe={"loss": "ce", "schedule": "constant", "epochs": 2},
        convert=_convert, trainable=lambda m: [p for n, p in m.named_parameters() if n.endswith("scale")],
        train_mode=lambda m: calls.append("train") or m.eval(),
        calibrate=lambda net, base, x: calls.append(f"calibrate {len(x)}")))
    yield conversion, calls
    CONVERSIONS.pop("toy-scale")


def test_a_registered_conversion_trains_with_the_one_loop(bn_model: nn.Module,
                                                        toy: tuple[Conversion, list[str]]) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(12, 3, 16, 16, generator=g), torch.randint(0, 10, (12,), generator=g)
    before = {k: v.clone() for k, v in bn_model.state_dict().items()}
    warm = warmup(bn_model, x, y, "toy-scale", batch_size=4, lr=0.1, calibrate=5, progress=False, device="cpu")
    assert toy[1] == ["calibrate 5", "train", "train"]  # its default of 2 epochs
    scales = [p for n, p in warm.model.named_parameters() if n.endswith("scale")]
    assert scales and any(not torch.equal(p, torch.ones_like(p)) for p in scales)  # what it says trains, trained
    original = dict(bn_model.named_parameters())
    assert all(torch.equal(p, original[n.replace(".bn.", ".")]) for n, p in warm.model.named_parameters()
               if not n.endswith("scale"))  # and nothing else
    assert all(torch.equal(v, bn_model.state_dict()[k]) for k, v in before.items())  # the caller's model untouched
    assert warm.warmup["epochs"] == 2 and warm.warmup["calibrate"] == 5 and warm.settings == {"unused": 1}


def test_a_name_is_registered_once_and_unknown_options_are_refused(toy: tuple[Conversion, list[str]]) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_conversion(toy[0])
    with pytest.raises(ConfigError, match="unknown warm-up option"):
        Recipe.of(None, {"epoch": 3})
    with pytest.raises(ConfigError, match="unknown toy-scale warm-up setting"):
        WarmupJob(source="npz:x.npz", out="w.pt", method="toy-scale", settings={"groups": 2})
    with pytest.raises(ConfigError, match="--arch"):
        WarmupJob.from_options(source="npz:x.npz", out="w.pt", checkpoint="r20.th", epochs=1)
    assert WarmupJob.from_options(source="s", out="o", epochs=3, lr=0.5).recipe == Recipe(epochs=3, lr=0.5)
