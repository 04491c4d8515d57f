"""Stream statistics: normalisation layers re-standardised with statistics accumulated one image at a time.

Made for batch-independent deployment: a Proxy Normalization model (per-image norms, see ``tta warmup --method
proxy-norm``) or a BatchNorm model predicting single images. Each BatchNorm2d and GroupNorm layer becomes a
``tta.norm.stream_stats.StreamStats``: every image updates running per-channel statistics (the source's, counted
as ``prior_n`` images, then every image of the stream, forgetting beyond ``memory`` images) and is normalised with
them. A batch gives the same outputs as its images one at a time, in order; no parameter trains. The GroupNorm
layers' clean statistics come from ``source_images`` clean source images (computed once and cached).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from tta.core.base import AdaptedModel, StepOutput
from tta.core.requirements import Requirements
from tta.core.validate import check_range
from tta.errors import ConfigError
from tta.models.fingerprint import model_fingerprint
from tta.norm.stream_stats import convert_to_stream_stats, source_moments
from tta.registry import register
from tta.source import derived


@dataclass(frozen=True)
class StreamStatsConfig:
    """Settings of ``stream-stats``: ``prior_n`` source pseudo-count, ``memory`` images the statistics pool before
    they forget geometrically, ``source_images`` clean images for the GroupNorm layers' source statistics."""

    prior_n: float = 16.0
    memory: float = 256.0
    source_images: int = 1000

    def __post_init__(self) -> None:
        check_range("prior_n", self.prior_n, low=0.0, low_open=True)
        check_range("memory", self.memory, low=2.0)
        if isinstance(self.source_images, bool) or not isinstance(self.source_images, int):
            raise ValueError(f"source_images must be an integer, got {self.source_images!r}")
        check_range("source_images", self.source_images, low=1, high=100_000)


@register("stream-stats")
class StreamStatsMethod(AdaptedModel):
    """Per-channel statistics of every BatchNorm2d/GroupNorm layer accumulated over the stream, image by image."""

    Config = StreamStatsConfig
    requires = Requirements(norm_layers=(nn.BatchNorm2d, nn.GroupNorm), running_stats=True)
    sliding_window: ClassVar[bool] = False

    def check_model(self, model: nn.Module) -> None:
        if self.window > 1:
            raise ConfigError("stream-stats adapts one image at a time by itself: a sliding window would count "
                              "its images twice; use window=0 (--window 0)")
        if self.source_data is None and any(isinstance(m, nn.GroupNorm) for m in model.modules()):
            raise ConfigError("stream-stats needs the clean statistics of the model's GroupNorm/LayerNorm layers; "
                              "pass source_data='cifar10' (or 'npz:PATH', 'folder:PATH') to tta.adapt, or "
                              "--source-data on the command line")

    def configure(self, model: nn.Module) -> nn.Module:
        model = super().configure(model)
        cfg = self.config
        moments = self._source_moments(model) if any(isinstance(m, nn.GroupNorm) for m in model.modules()) else {}
        convert_to_stream_stats(model, moments, cfg.prior_n, cfg.memory)
        return model

    def _source_moments(self, model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        source, n = self.source_data, self.config.source_images
        assert source is not None  # check_model refused a GroupNorm model without source data

        def compute() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
            images, _ = source.sample(n, seed=0)
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            return source_moments(model, images.to(device))

        return derived("stream-stats-moments", model_fingerprint(model), source, f"n={n}", compute)

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        return StepOutput(self.model(x))
