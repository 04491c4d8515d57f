"""UnMix-TNS: test-time normalisation with K statistics components (Tomar et al., ICLR 2024).

A BatchNorm2d's single pair of running statistics becomes K components (means and variances per channel). Each
test image is normalised on its own: its instance statistics (spatial mean and biased variance per channel) are
compared with the component means by cosine similarity, a softmax at temperature ``temperature`` gives its soft
assignment ``p_k`` to each component, every component is mixed with the image's statistics in proportion to the
assignment (``(1 - p_k) mu_k + p_k mu_image``, the same for the variances), and the image is normalised with the
mean and variance of the K mixed components (the mixture's, between-component spread included), then the layer's
affine. Afterwards each component moves towards the images assigned to it, weighted by their assignment:
``mu_k += rate * mean_b p_bk (mu_b - mu_k)`` (the same for the variances), so a component no image is assigned to
does not move. Because an image's normalisation depends on the components and itself only, a batch sorted by
class (label-correlated stream) does not skew the statistics the way a batch mean does, and one image is a batch.

The components start around the source statistics: means ``mu_s + sqrt(spread K / (K - 1)) sigma_s z`` (``z``
standard normal, drawn from a generator seeded with ``seed``, layer after layer in module order), variances
``(1 - spread) sigma_s^2``, so that the mixture of the K initial components has the source moments in expectation
(K = 1: the source statistics themselves). The update rate follows the batch size ``B``: ``rate = 1 - (1 -
momentum)^(B / reference_batch)``, BatchNorm's momentum 0.1 per 64 images by default, as the official code; ``B``
is each forward pass's own size, or ``batch_size`` when set: the official code computes the rate once from the
configured batch size and applies it to every forward pass, also to a method's second pass on part of a batch
(ROID's augmented views of the images it keeps), where the two rules differ.

BatchNorm1d layers (features without spatial extent, where an image has no instance statistics) normalise with the
source statistics, as the official code does. Components are buffers, so a method's ``reset()``, snapshot, state
dict and rollback cover them; they move on every forward pass (training or eval mode), as in the official code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tta.core.validate import check_range
from tta.errors import ModelError

MAX_COMPONENTS = 4096  # statistics components per layer


@dataclass(frozen=True)
class UnMixSettings:
    """The layer's settings (defaults: the official CIFAR-10-C ones; ``components`` 128 for mixed domains)."""

    components: int = 16
    momentum: float = 0.1
    reference_batch: int = 64
    temperature: float = 0.07
    spread: float = 0.5
    seed: int = 0
    batch_size: int = 0

    def __post_init__(self) -> None:
        _check_batch_size("batch_size", self.batch_size)
        for key, high in (("components", MAX_COMPONENTS), ("reference_batch", 1 << 20)):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise ValueError(f"{key} must be an integer in [1, {high}], got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        check_range("momentum", self.momentum, low=0.0, high=1.0)
        check_range("temperature", self.temperature, low=0.0, low_open=True)
        check_range("spread", self.spread, low=0.0, high=1.0, high_open=True)


def _check_batch_size(key: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1 << 20:
        raise ValueError(f"{key} must be an integer in [0, {1 << 20}] (0: each forward pass's own size), got {value!r}")


class UnMixTNS(nn.Module):
    """A BatchNorm2d (or BatchNorm1d) layer normalising each image with K statistics components mixed with its own.

    ``means``/``variances`` (K, C) are the components; ``source_mean``/``source_var`` the BN's running statistics.
    """

    def __init__(self, bn: nn.BatchNorm1d | nn.BatchNorm2d, settings: UnMixSettings | None = None,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or bn.running_mean is None or bn.running_var is None:
            raise ValueError("UnMixTNS replaces a BatchNorm1d/2d layer that has source running statistics")
        s = settings or UnMixSettings()
        self.settings, self.eps = s, float(bn.eps)
        self.spatial = isinstance(bn, nn.BatchNorm2d)
        mean, var = bn.running_mean.detach().clone(), bn.running_var.detach().clone()
        self.register_buffer("source_mean", mean)
        self.register_buffer("source_var", var)
        self.weight = None if bn.weight is None else nn.Parameter(bn.weight.detach().clone())
        self.bias = None if bn.bias is None else nn.Parameter(bn.bias.detach().clone())
        if self.spatial:
            k = s.components
            spread = s.spread if k > 1 else 0.0
            z = torch.randn((k, mean.numel()), generator=generator, dtype=mean.dtype).to(mean.device)
            scale = math.sqrt(spread * k / (k - 1)) if k > 1 else 0.0
            self.register_buffer("means", mean.unsqueeze(0) + scale * var.sqrt().unsqueeze(0) * z)
            self.register_buffer("variances", ((1 - spread) * var).unsqueeze(0).repeat(k, 1))

    def assignment(self, inst_mean: torch.Tensor) -> torch.Tensor:
        """Soft assignment (B, K) of images with instance means ``inst_mean`` (B, C) to the components."""
        sim = F.normalize(inst_mean, dim=1) @ F.normalize(self.means, dim=1).T
        return torch.softmax(sim / self.settings.temperature, dim=1)

    def update_rate(self, batch: int) -> float:
        """The components' update rate for a forward pass of ``batch`` images (``settings.batch_size`` when set)."""
        s = self.settings
        return 1.0 - (1.0 - s.momentum) ** ((s.batch_size or batch) / s.reference_batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.spatial:
            mean, var = self.source_mean.unsqueeze(0), self.source_var.unsqueeze(0)
        else:
            inst_var, inst_mean = torch.var_mean(x, dim=(2, 3), unbiased=False)  # (B, C)
            k = self.means.shape[0]
            with torch.no_grad():
                p = self.assignment(inst_mean)  # (B, K)
            # Mean and variance over the K components mixed with the image: (1 - p_k) c_k + p_k image.
            q = 1 - p
            mean = (q @ self.means + inst_mean) / k
            var = (q @ self.variances + inst_var) / k
            second = (q.square() @ self.means.square() + 2 * inst_mean * ((p * q) @ self.means)
                      + inst_mean.square() * p.square().sum(1, keepdim=True)) / k
            var = (var + second - mean.square()).clamp_min(0.0)  # the mixture's; rounding may dip below 0
            with torch.no_grad():  # each component moves towards the images assigned to it, in proportion
                rate = self.update_rate(x.shape[0]) / x.shape[0]
                weight = p.sum(0).unsqueeze(1)  # (K, 1)
                self.means.add_(p.T @ inst_mean - weight * self.means, alpha=rate)
                self.variances.add_(p.T @ inst_var - weight * self.variances, alpha=rate)
        scale = torch.rsqrt(var + self.eps)  # (B, C) or (1, C): one fused multiply-add over the feature map
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale if self.bias is None else self.bias - mean * scale
        shape = (*scale.shape, *(1,) * (x.ndim - 2))
        return torch.addcmul(shift.view(shape), x, scale.view(shape))

    def extra_repr(self) -> str:
        k = self.means.shape[0] if self.spatial else 0
        return f"{self.source_mean.numel()}, components={k}, eps={self.eps}"


def convert_to_unmix_tns(model: nn.Module, settings: UnMixSettings | None = None) -> int:
    """Replace every BatchNorm2d/BatchNorm1d (with running statistics) of ``model`` by an ``UnMixTNS``, in place and
    in module order (the components' random start is drawn in that order from a generator seeded with
    ``settings.seed``); returns how many layers were replaced."""
    s = settings or UnMixSettings()
    generator = torch.Generator().manual_seed(s.seed)
    count = 0
    for name, layer in list(model.named_modules()):
        if type(layer) not in (nn.BatchNorm1d, nn.BatchNorm2d) or layer.running_mean is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, UnMixTNS(layer, s, generator))
        count += 1
    return count


@dataclass(frozen=True)
class NormChoice:
    """The ``norm`` setting of the methods it is mixed into: ``batch`` keeps the model's BatchNorm layers (the
    method's own handling of them), ``unmix-tns`` replaces them by UnMix-TNS layers with ``norm_components``
    components (16; the paper uses 128 on mixed-domain streams) and ``norm_batch_size`` (the layer's
    ``batch_size``) before the method configures the model."""

    norm: Literal["batch", "unmix-tns"] = "batch"
    norm_components: int = 16
    norm_batch_size: int = 0

    def __post_init__(self) -> None:
        _check_batch_size("norm_batch_size", self.norm_batch_size)
        k = self.norm_components
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_COMPONENTS:
            raise ValueError(f"norm_components must be an integer in [1, {MAX_COMPONENTS}], got {k!r}")
        parent = super()
        if hasattr(parent, "__post_init__"):
            parent.__post_init__()  # type: ignore[misc]


def apply_norm(model: nn.Module, config: object, method: str) -> nn.Module:
    """``model`` with the normalisation layers ``config.norm`` asks for (``NormChoice``); ``ModelError`` if it has
    no BatchNorm2d layer to replace."""
    if getattr(config, "norm", "batch") != "unmix-tns":
        return model
    if not any(type(m) is nn.BatchNorm2d and m.running_mean is not None for m in model.modules()):
        raise ModelError(f"{method} with norm=unmix-tns replaces BatchNorm2d layers (with running statistics) and "
                         "this model has none; use norm=batch for this model")
    settings = UnMixSettings(components=config.norm_components,  # type: ignore[attr-defined]
                             batch_size=config.norm_batch_size)  # type: ignore[attr-defined]
    convert_to_unmix_tns(model, settings)
    return model


__all__ = ["NormChoice", "UnMixSettings", "UnMixTNS", "apply_norm", "convert_to_unmix_tns"]
