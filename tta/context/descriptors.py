"""Per-image domain descriptors: an image's feature "style" at several depths of the frozen source model.

For a BatchNorm layer with running statistics (mu, sigma^2) whose input for one image has per-channel spatial mean
m_c and variance v_c, the image's style at that layer is, per channel,

    ((m_c - mu_c) / sigma_c,  0.5 * log(v_c / sigma_c^2))

i.e. how far the image's channel statistics sit from the source's, in source units (both 0 for an image that looks
like the average training image). A descriptor concatenates these over a chosen set of BatchNorm layers, computed
with the *source* model (every BN normalising with its running statistics), so it does not depend on any test-time
state nor on the other images of the batch. The forward stops after the deepest layer used.

``benchmarks/context_descriptors.py`` scores layer choices by how well they separate the generated corruptions and
how much they say about the images' classes; ``DEPTHS`` are the choices offered. ``DEFAULT_DEPTH`` reads the first
half of the layers: the deeper half adds little about the domain and much about what the image shows, and
contexts that group images by class normalise the class away (measured in docs/methods/contexts.md's inferred-contexts
section).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.errors import ModelError

# Which BatchNorm layers (in module order) a descriptor reads: "first" (the first only), "early" (the first third),
# "half" (the first half), "all".
DEPTHS: tuple[str, ...] = ("first", "early", "half", "all")
DEFAULT_DEPTH = "half"


class _Stop(Exception):
    """Raised by the last hook to end a probe forward early (never escapes ``StyleProbe``)."""


def select_layers(n_layers: int, depth: str) -> list[int]:
    """Indices of the BatchNorm layers a descriptor of ``depth`` reads, out of ``n_layers``."""
    if depth not in DEPTHS:
        raise ValueError(f"unknown descriptor depth {depth!r}; choose one of {', '.join(DEPTHS)}")
    count = {"first": 1, "early": -(-n_layers // 3), "half": -(-n_layers // 2), "all": n_layers}[depth]
    return list(range(count))


def channel_style(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float) -> torch.Tensor:
    """(N, 2C): per-image channel mean and log-std of ``x`` (N, C, ...) relative to source ``mean``/``var``."""
    flat = x.detach().reshape(x.shape[0], x.shape[1], -1).double()
    m = flat.mean(2)  # two passes in float64: faster than var_mean's Welford on CPU, rounded to float32 after
    v, m = (flat - m[..., None]).square_().mean(2).float(), m.float()
    ref_var = var.float() + eps
    return torch.cat([(m - mean.float()) * ref_var.rsqrt(), 0.5 * torch.log((v + eps) / ref_var)], 1)


class StyleProbe(nn.Module):
    """The frozen source model with hooks that read the style of every image at the chosen BatchNorm layers.

    ``probe(x)`` returns the (N, D) descriptor in float32, ``probe.logits(x)`` the source model's output; the copy it
    runs never changes and never trains.
    """

    def __init__(self, model: nn.Module, depth: str = DEFAULT_DEPTH) -> None:
        super().__init__()
        net = copy.deepcopy(model).eval().requires_grad_(False)
        bns = [m for m in net.modules() if isinstance(m, _BatchNorm)]
        if not bns:
            raise ModelError("the model has no BatchNorm layers to read image styles from; use a BN network")
        if any(bn.running_mean is None or bn.running_var is None for bn in bns):
            raise ModelError("every BatchNorm needs running statistics to read image styles; load the pretrained "
                             "model with its running statistics")
        self.net, self.depth = net, depth
        self.indices = select_layers(len(bns), depth)
        self.dim = sum(2 * bns[i].num_features for i in self.indices)
        self._parts: list[torch.Tensor] = []
        self._reading = True  # the hooks read styles (and stop the forward); off for ``logits``
        for rank, i in enumerate(self.indices):
            bns[i].register_forward_pre_hook(functools.partial(self._read, last=rank == len(self.indices) - 1))

    def _read(self, bn: nn.Module, args: tuple[torch.Tensor, ...], last: bool = False) -> None:
        # a bound method (in a partial), not a closure: a deep copy of the probe then hooks the copy, not this probe
        if not self._reading:
            return
        self._parts.append(channel_style(args[0], bn.running_mean, bn.running_var, bn.eps))
        if last:
            raise _Stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) descriptors of the images ``x`` (the source model's input)."""
        self._parts = []
        try:
            with torch.no_grad():
                self.net(x)
        except _Stop:
            pass
        parts, self._parts = self._parts, []
        if len(parts) != len(self.indices):
            raise ModelError(f"the forward reached {len(parts)} of the {len(self.indices)} BatchNorm layers the "
                             "descriptor reads; every BatchNorm must run on every forward")
        return torch.cat(parts, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen source model's whole forward on ``x`` (its output), reading no styles."""
        self._reading = False
        try:
            with torch.no_grad():
                return self.net(x)
        finally:
            self._reading = True

    def train(self, mode: bool = True) -> StyleProbe:
        """The probe's model stays in eval mode (its BatchNorms are the source)."""
        super().train(mode)
        self.net.eval()
        return self


def describe(probe: StyleProbe, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Descriptors of ``images`` (N, C, H, W) in [0, 1], in chunks of ``batch_size`` (CPU float32)."""
    device = next(probe.net.parameters(), torch.empty(0)).device
    return torch.cat([probe(chunk.to(device)).cpu() for chunk in images.split(batch_size)])


__all__: Sequence[str] = ["DEFAULT_DEPTH", "DEPTHS", "StyleProbe", "channel_style", "describe", "select_layers"]
