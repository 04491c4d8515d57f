"""Stream statistics: re-standardise normalisation layers with per-channel statistics of the stream so far.

AdaBN re-estimates BatchNorm's statistics on a test batch, so it needs a batch, and an image's output depends on
its batch-mates. ``StreamStats`` accumulates the statistics one image at a time instead: each image updates a
running per-channel mean and second moment, and is then normalised with them. The running statistics start from
the source's, counted as ``prior_n`` images, pool every image exactly until they hold ``memory`` images, and from
then on forget geometrically (an exponential moving average over about ``memory`` images), so a continual stream is
followed. Within a batch the update runs image after image (in closed form, not a Python loop), so a batch of B
images gives bit-for-bit (up to float rounding) the outputs of B calls with one image each: an image's output
depends on the images before it in the stream, never on the ones after it, and never on the batch size.

Two kinds of layer are wrapped:
- ``BatchNorm2d``: the statistics are those of the layer's input; the source statistics are its running ones;
  normalised output, then the layer's affine (AdaBN with source prior, one image at a time).
- ``GroupNorm`` (LayerNorm over channels and pixels is one group): a per-image norm, typically of a Proxy
  Normalization model. The layer first standardises each image as usual; per channel, the result's distribution
  over images then moves under a shift, which the per-image norm cannot see. The wrapper standardises each
  channel with the stream's statistics of that output and maps it back to the clean source's (recorded on clean
  images with ``source_moments``), then applies the layer's affine. On clean data it is the identity in
  expectation.

An image's per-channel statistics are its spatial mean and mean square, so the pooled variance is the variance
over images and pixels together, as BatchNorm's batch variance is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tta.norm.convert import Float64State

CHUNK = 64  # images per closed-form block of the sequential update (keeps the cumulative products well scaled)


def _spatial(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(range(2, t.ndim))


def sequential_moments(
    m: torch.Tensor, q: torch.Tensor, mean: torch.Tensor, sq: torch.Tensor, count: torch.Tensor, memory: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Running (mean, mean square) after each of the B images whose per-channel statistics are ``m``, ``q`` (B, C).

    The state (``mean``, ``sq``: (C,), ``count``: images it stands for) is updated image after image with weight
    1 / n_t, n_t = min(n_{t-1} + 1, memory), starting from n_0 = ``count`` (a float64 scalar tensor, so nothing
    waits for the device). Returns the (B, C) running values after each image (float64) and the final count.
    """
    means, sqs = [], []
    for start in range(0, m.shape[0], CHUNK):
        mc, qc = m[start:start + CHUNK].double(), q[start:start + CHUNK].double()
        steps = torch.arange(1, mc.shape[0] + 1, dtype=torch.float64, device=m.device)
        n = torch.clamp(count + steps, max=memory)
        w = 1.0 / n
        keep = torch.cumprod(1.0 - w, 0)  # product of (1 - w_k) for k <= t: the weight left on the initial state
        gain = (w / keep)[:, None]  # image j's weight at time t is w_j * keep_t / keep_j
        means.append(keep[:, None] * (mean + torch.cumsum(gain * mc, 0)))
        sqs.append(keep[:, None] * (sq + torch.cumsum(gain * qc, 0)))
        mean, sq, count = means[-1][-1], sqs[-1][-1], n[-1]
    return torch.cat(means), torch.cat(sqs), count


class StreamStats(Float64State):
    """A BatchNorm2d or GroupNorm layer normalised with statistics accumulated over the stream, image by image.

    ``source_mean``/``source_var`` are the clean source's per-channel statistics of what the wrapped layer
    normalises (a BN's running statistics; a GroupNorm's standardised output). The running state (``mean``,
    ``sq``, ``count``) starts there, counted as ``prior_n`` images, and is part of the module's buffers, so a
    method's ``reset()``, snapshot and rollback cover it.
    """

    def __init__(self, layer: nn.BatchNorm2d | nn.GroupNorm, source_mean: torch.Tensor, source_var: torch.Tensor,
                 prior_n: float = 16.0, memory: float = 256.0) -> None:
        super().__init__()
        if not isinstance(layer, (nn.BatchNorm2d, nn.GroupNorm)):
            raise TypeError(f"StreamStats wraps BatchNorm2d or GroupNorm layers, not {type(layer).__name__}")
        if prior_n <= 0 or memory < 2:
            raise ValueError(f"prior_n must be > 0 and memory >= 2, got {prior_n} and {memory}")
        self.layer, self.prior_n, self.memory = layer, float(prior_n), float(memory)
        self.per_image = isinstance(layer, nn.GroupNorm)
        src_mean = source_mean.detach().double().flatten()
        src_var = source_var.detach().double().flatten().clamp_min(0.0)
        self.register_buffer("source_mean", src_mean.clone())
        self.register_buffer("source_var", src_var.clone())
        self.register_buffer("mean", src_mean.clone())
        self.register_buffer("sq", (src_var + src_mean.square()).clone())
        self.register_buffer("count", torch.tensor(float(prior_n), dtype=torch.float64))

    @property
    def eps(self) -> float:
        return float(self.layer.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Update the running statistics with each image of ``x`` in turn and normalise it with them."""
        layer = self.layer
        if x.shape[0] == 0:  # nothing to learn from; the layer's own output keeps shapes consistent
            return layer(x)
        z = F.group_norm(x, layer.num_groups, eps=layer.eps) if self.per_image else x
        dims = _spatial(z)
        m, q = z.mean(dims), z.square().mean(dims)
        mean, sq, count = sequential_moments(m.detach(), q.detach(), self.mean, self.sq, self.count, self.memory)
        with torch.no_grad():
            self.mean.copy_(mean[-1])
            self.sq.copy_(sq[-1])
            self.count.copy_(count)
        scale = torch.rsqrt((sq - mean.square()).clamp_min(0.0) + self.eps)  # (B, C)
        shift = -mean * scale
        if self.per_image:  # back to the clean source's distribution of the per-image norm's output
            scale = scale * torch.sqrt(self.source_var + self.eps)
            shift = self.source_mean - mean * scale
        if layer.weight is not None:
            scale, shift = scale * layer.weight.double(), shift * layer.weight.double() + layer.bias.double()
        shape = (*scale.shape, *(1,) * len(dims))
        return torch.addcmul(shift.to(z.dtype).view(shape), z, scale.to(z.dtype).view(shape))

    def extra_repr(self) -> str:
        return f"prior_n={self.prior_n:g}, memory={self.memory:g}"


@torch.no_grad()
def source_moments(model: nn.Module, x: torch.Tensor, batch_size: int = 200) -> dict[str, tuple[torch.Tensor,
                                                                                                  torch.Tensor]]:
    """Per GroupNorm layer of ``model`` (by module name): the per-channel mean and variance, over the images ``x``
    and their pixels, of the layer's standardised output before its affine. ``model`` runs in eval mode."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.GroupNorm)}
    sums: dict[str, torch.Tensor] = {}  # per layer: (sum, sum of squares) per channel
    counts: dict[str, float] = {}  # per layer: values per channel

    def hook(name: str, layer: nn.GroupNorm):  # type: ignore[no-untyped-def]
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            z = F.group_norm(inputs[0], layer.num_groups, eps=layer.eps).double()
            dims = (0, *_spatial(z))
            both = torch.stack([z.sum(dims), z.square().sum(dims)])
            sums[name] = sums[name] + both if name in sums else both
            counts[name] = counts.get(name, 0.0) + z.numel() / z.shape[1]
        return record

    handles = [layer.register_forward_hook(hook(name, layer)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, x.shape[0], batch_size):
            model(x[start:start + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for name, (total, total_sq) in sums.items():
        mean = total / counts[name]
        out[name] = (mean, (total_sq / counts[name] - mean.square()).clamp_min(0.0))
    return out


def convert_to_stream_stats(model: nn.Module, moments: dict[str, tuple[torch.Tensor, torch.Tensor]],
                            prior_n: float = 16.0, memory: float = 256.0) -> int:
    """Wrap every BatchNorm2d (source statistics: its running ones) and every GroupNorm named in ``moments`` (from
    ``source_moments``) of ``model`` in a ``StreamStats``, in place; returns how many layers were wrapped."""
    count = 0
    for name, layer in list(model.named_modules()):
        if isinstance(layer, nn.BatchNorm2d) and layer.running_mean is not None:
            mean, var = layer.running_mean, layer.running_var
        elif isinstance(layer, nn.GroupNorm) and name in moments:
            mean, var = moments[name]
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        ref = layer.weight if layer.weight is not None else mean
        setattr(parent, child, StreamStats(layer, mean, var, prior_n, memory).to(device=ref.device))
        count += 1
    return count
