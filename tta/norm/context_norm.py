"""Domain-aware normalisation: per-context BatchNorm statistics for mixed-domain streams (docs/methods/contexts.md).

``DomainContextNorm`` replaces a pretrained BatchNorm. It keeps per-context statistics (mean, variance, counts);
context 0 is the source (the BN's running statistics, never updated) and further contexts are created at test time
(from domain ids, or inferred) starting from the source statistics with a count of 0, or declared up front.

Routing is dense and decided outside the layer: every layer of a model reads the same ``Routing``, an object the
model's router (``tta.context.router``) fills once per batch with an (N, K) matrix of routing weights (one-hot rows
for hard routing, responsibilities for soft). A layer never reaches its owner: it is given the ``Routing`` when it
is built. Each layer computes every context's statistics on its weighted share of the batch with matrix products
(no per-context loop, no host-device synchronisation) and normalises every sample with the weighted mixture of its
contexts' normalisations, which is one per-sample, per-channel scale and shift:

    y_i = sum_k w_ik (gamma_k (x_i - mu_k) / sigma_k + beta_k).

With one-hot weights, each sample is normalised exactly with its own context (the result does not depend on the
order or the other contexts of the batch). With inferred contexts the weights are soft responsibilities, but each
context's statistics are estimated from its members only (``Routing.members``: the images it is most responsible
for): with soft weights every image of a batch would leak a little into every context's statistics (at severity 3
about a quarter of a target context's weight came from images routed elsewhere). Statistics of a context k >= 1 on
a share of b images (values-per-channel counts in float64, as AdaptiveBN), by ``stats_update``:

- ``cumulative``: the context's pool (all target values it has seen, merged exactly by ``tta.norm.moments``) plus
  the share, blended with the source by image counts, N_src/(N_src + n_k + b) (``prior_n`` = N_src; 0 = full
  adaptation, inf = source);
- ``ema``: an exponential moving average initialised from the source, updated with the share before use
  (new = (1 - momentum) old + momentum share).

Shares smaller than ``min_subset`` images normalise with the context's running statistics and leave them as they
are. With ``per_context_affine`` every context also has its own gamma_k, beta_k (copies of the BN's): that is DSBN;
without, the affine is shared (DomainContextNorm, "per-domain AdaBN"). ``learned`` replaces the statistics of a
context by trainable mu_k and log sigma_k initialised from the source (the TTA analogue of context normalisation).
A forward routed with ``store=False`` (the sliding window's in-between predictions) uses the same statistics but
stores nothing. Outside a routed forward a layer is the source BatchNorm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.norm.adaptive_bn import blend_prior
from tta.norm.convert import Float64State
from tta.norm.moments import merge_moments

StatsUpdate = Literal["cumulative", "ema"]
STATS_UPDATES: tuple[str, ...] = ("cumulative", "ema")


def resize_rows(t: torch.Tensor, k: int, fill: torch.Tensor) -> torch.Tensor:
    """``t`` (K, ...) truncated or extended to ``k`` rows, new rows equal to ``fill``."""
    if k <= t.shape[0]:
        return t[:k].clone()
    extra = fill.to(t).expand(k - t.shape[0], *t.shape[1:])
    return torch.cat([t, extra], 0)


@dataclass
class Routing:
    """The routing of the forward in progress, written by a router and read by every layer it is given to.

    ``weights`` (N, K): how much each sample belongs to each context (``None``: no routed forward, the layers are
    the source BatchNorm); ``members`` (N, K): the one-hot rows the contexts' statistics are estimated with
    (``None``: ``weights``); ``store``: whether the forward stores statistics. Not state: never saved.
    """

    weights: torch.Tensor | None = None
    members: torch.Tensor | None = None
    store: bool = True

    @property
    def active(self) -> bool:
        """Whether a routed forward is in progress."""
        return self.weights is not None

    def clear(self) -> None:
        """Forget the routing of the forward that just finished."""
        self.weights = None
        self.members = None


class GrowingContexts(Float64State):
    """A layer whose per-context rows grow at test time: ``reset()`` drops them, a saved state regrows them.

    Subclasses set ``initial_contexts``, name the buffer whose first dimension counts the contexts
    (``size_buffer``) and implement ``resize(k)``.
    """

    size_buffer: str
    initial_contexts: int

    def resize(self, k: int) -> None:
        """Grow (new contexts start from their initial values) or shrink to ``k`` contexts."""
        raise NotImplementedError

    def reset_structure(self) -> None:
        """Drop the contexts grown at test time (``AdaptedModel.reset`` then restores the values)."""
        self.resize(self.initial_contexts)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        saved = state_dict.get(prefix + self.size_buffer)
        if saved is not None:
            self.resize(saved.shape[0])  # a saved adapted model may have grown contexts
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class DomainContextNorm(GrowingContexts):
    """BatchNorm with per-context statistics (and optionally per-context affine): DomainContextNorm and DSBN."""

    size_buffer = "ctx_mean"
    # the per-context parameter lists (affine for DSBN, mu / log sigma in learned mode; empty when unused)
    PARAM_LISTS: ClassVar[tuple[str, ...]] = ("ctx_weight", "ctx_bias", "ctx_mu", "ctx_logstd")

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        stats_update: StatsUpdate = "cumulative",
        prior_n: float = 16.0,
        momentum: float = 0.1,
        min_subset: int = 2,
        per_context_affine: bool = False,
        learned: bool = False,
        affine: bool = True,
        declared: int = 0,
        routing: Routing | None = None,
    ) -> None:
        super().__init__()
        if stats_update not in STATS_UPDATES:
            raise ValueError(f"unknown stats_update {stats_update!r}; choose one of {', '.join(STATS_UPDATES)}")
        self.num_features, self.eps, self.stats_update, self.prior_n = num_features, eps, stats_update, float(prior_n)
        self.momentum, self.min_subset = momentum, min_subset
        self.per_context_affine, self.learned, self.initial_contexts = per_context_affine, learned, 1 + declared
        self.train_affine = False  # whether per-context affine parameters (k >= 1) require grad (branch-local Tent)
        self.register_buffer("source_mean", torch.zeros(num_features))
        self.register_buffer("source_var", torch.ones(num_features))
        self.register_buffer("source_weight", torch.ones(num_features))
        self.register_buffer("source_bias", torch.zeros(num_features))
        shared = affine and not per_context_affine
        self.weight = nn.Parameter(torch.ones(num_features)) if shared else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if shared else None
        k = self.initial_contexts
        self.register_buffer("ctx_mean", torch.zeros(k, num_features, dtype=torch.float64))
        self.register_buffer("ctx_var", torch.ones(k, num_features, dtype=torch.float64))
        self.register_buffer("ctx_values", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("ctx_images", torch.zeros(k, dtype=torch.float64))
        self.ctx_weight = nn.ParameterList()
        self.ctx_bias = nn.ParameterList()
        self.ctx_mu = nn.ParameterList()
        self.ctx_logstd = nn.ParameterList()
        # shared with the router that fills it and every other layer of the model (a plain object: never saved)
        self.routing = routing if routing is not None else Routing()
        self._grow_params(k)

    @classmethod
    def from_bn(cls, bn: _BatchNorm, **kwargs: object) -> DomainContextNorm:
        """Copy the BN's affine parameters and running statistics (the source context) into a new layer."""
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"{bn} has no running statistics to use as the source; it was built with "
                             "track_running_stats=False")
        layer = cls(bn.num_features, eps=bn.eps, affine=bn.affine, **kwargs)  # type: ignore[arg-type]
        with torch.no_grad():
            layer.source_mean.copy_(bn.running_mean)
            layer.source_var.copy_(bn.running_var)
            if bn.affine:
                layer.source_weight.copy_(bn.weight)
                layer.source_bias.copy_(bn.bias)
                if layer.weight is not None:
                    layer.weight.copy_(bn.weight)
                    layer.bias.copy_(bn.bias)
            layer.ctx_mean.copy_(bn.running_mean.double().expand_as(layer.ctx_mean))
            layer.ctx_var.copy_(bn.running_var.double().expand_as(layer.ctx_var))
            layer._trim_params(0)
            layer._grow_params(layer.num_contexts)
        return layer.to(bn.running_mean.device)

    # -------------------------------------------------------------------------------------- structure
    @property
    def num_contexts(self) -> int:
        """Contexts this layer holds, the source (0) included."""
        return self.ctx_mean.shape[0]

    def _new_param(self, value: torch.Tensor, k: int) -> nn.Parameter:
        # Context 0 is the source and never trains; the others train when the method says so.
        trains = k > 0 and (self.learned or self.train_affine)
        return nn.Parameter(value.detach().clone(), requires_grad=trains)

    def _grow_params(self, k: int) -> None:
        """Per-context parameters for contexts up to ``k``, new ones initialised from the source."""
        lists: list[tuple[str, torch.Tensor]] = []
        if self.per_context_affine:
            lists += [("ctx_weight", self.source_weight), ("ctx_bias", self.source_bias)]
        if self.learned:
            lists += [("ctx_mu", self.source_mean), ("ctx_logstd", 0.5 * torch.log(self.source_var + self.eps))]
        for name, init in lists:
            plist = getattr(self, name)
            for i in range(len(plist), k):
                plist.append(self._new_param(init, i))

    def _trim_params(self, k: int) -> None:
        for name in self.PARAM_LISTS:
            plist = getattr(self, name)
            if len(plist) > k:
                setattr(self, name, nn.ParameterList(list(plist)[:k]))

    def resize(self, k: int) -> None:
        """Grow to ``k`` contexts (new ones start from the source with count 0) or drop the ones beyond ``k``."""
        if k == self.num_contexts:
            return
        self.ctx_mean = resize_rows(self.ctx_mean, k, self.source_mean.double())
        self.ctx_var = resize_rows(self.ctx_var, k, self.source_var.double())
        zero = torch.zeros((), dtype=torch.float64)
        self.ctx_values = resize_rows(self.ctx_values, k, zero)
        self.ctx_images = resize_rows(self.ctx_images, k, zero)
        self._trim_params(k)
        self._grow_params(k)

    def set_trainable(self, flag: bool) -> None:
        """Whether the per-context affine parameters of contexts k >= 1 train (branch-local Tent), now and later."""
        self.train_affine = flag
        for p in self.context_params():
            p.requires_grad_(flag or self.learned)

    def context_params(self) -> list[nn.Parameter]:
        """The per-context parameters of contexts k >= 1 (affine for DSBN, mu/log sigma in learned mode)."""
        return [p for plist in (self.ctx_weight, self.ctx_bias, self.ctx_mu, self.ctx_logstd)
                for p in list(plist)[1:]]

    @torch.no_grad()
    def clear_context(self, k: int) -> None:
        """Context ``k`` (>= 1) starts afresh: source statistics, no count, source-initialised parameters."""
        self.ctx_mean[k] = self.source_mean.double()
        self.ctx_var[k] = self.source_var.double()
        self.ctx_values[k] = 0.0
        self.ctx_images[k] = 0.0
        for name, init in (("ctx_weight", self.source_weight), ("ctx_bias", self.source_bias),
                           ("ctx_mu", self.source_mean), ("ctx_logstd", 0.5 * torch.log(self.source_var + self.eps))):
            plist = getattr(self, name)
            if k < len(plist):
                plist[k].copy_(init)

    @torch.no_grad()
    def split_context(self, dst: int, src: int) -> None:
        """Context ``src`` was split in two and ``dst`` holds its other half: both start from ``src``'s statistics
        (and parameters) with half its evidence, so that neither normalises with its first few images alone."""
        self.ctx_values[src] /= 2
        self.ctx_images[src] /= 2
        for name in ("ctx_mean", "ctx_var", "ctx_values", "ctx_images"):
            getattr(self, name)[dst] = getattr(self, name)[src]
        for name in self.PARAM_LISTS:
            plist = getattr(self, name)
            if dst < len(plist) and src < len(plist):
                plist[dst].copy_(plist[src])

    @torch.no_grad()
    def merge_context(self, dst: int, src: int) -> None:
        """Context ``src``'s statistics join ``dst``'s (exact pooling; ``dst`` keeps its parameters); ``src`` is
        cleared. Merging into the source context (0) only clears ``src``: the source never changes."""
        if dst > 0 and self.stats_update == "cumulative":
            n_a, n_b = self.ctx_values[dst], self.ctx_values[src]
            if float(n_a + n_b) > 0:
                n, mean, m2 = merge_moments(n_a, self.ctx_mean[dst], self.ctx_var[dst] * n_a,
                                            n_b, self.ctx_mean[src], self.ctx_var[src] * n_b)
                self.ctx_mean[dst] = mean
                self.ctx_var[dst] = m2 / n
                self.ctx_values[dst] = n
                self.ctx_images[dst] += self.ctx_images[src]
        elif dst > 0:  # ema: the running estimates, weighted by the images each has seen
            a, b = self.ctx_images[dst], self.ctx_images[src]
            if float(a + b) > 0:
                self.ctx_mean[dst] = (a * self.ctx_mean[dst] + b * self.ctx_mean[src]) / (a + b)
                self.ctx_var[dst] = (a * self.ctx_var[dst] + b * self.ctx_var[src]) / (a + b)
                self.ctx_images[dst] = a + b
                self.ctx_values[dst] += self.ctx_values[src]
        self.clear_context(src)

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise every sample of ``x`` with its contexts' statistics (see the module docstring)."""
        routing = self.routing
        if routing.weights is None:  # outside a routed forward: the source model
            weight, bias = (self.source_weight, self.source_bias) if self.per_context_affine else \
                (self.weight, self.bias)
            return F.batch_norm(x, self.source_mean, self.source_var, weight, bias, False, 0.0, self.eps)
        weights = routing.weights
        if self.num_contexts < weights.shape[1]:
            self.resize(weights.shape[1])
        mean, var = self._context_stats(x, weights if routing.members is None else routing.members, routing.store)
        shape = (x.shape[0], x.shape[1]) + (1,) * (x.ndim - 2)
        w = weights.to(x.dtype)
        if self.learned:  # context 0's mu and log sigma are the source's and never train
            mu = torch.stack(list(self.ctx_mu)).to(x.dtype)
            inv = torch.exp(-torch.stack(list(self.ctx_logstd))).to(x.dtype)
        else:
            mu, inv = mean.to(x.dtype), torch.rsqrt(var + self.eps).to(x.dtype)
        gamma, beta = self._affine(x.dtype)
        if gamma is None:
            scale, shift = w @ inv, -(w @ (mu * inv))
        else:
            scale, shift = w @ (gamma * inv), w @ (beta - gamma * mu * inv)
        return x * scale.view(shape) + shift.view(shape)

    @property
    def affine(self) -> bool:
        """Whether the layer has an affine transform (per context or shared)."""
        return self.per_context_affine or self.weight is not None

    def _affine(self, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(K, C) gamma and beta of every context (``None`` without affine)."""
        if self.per_context_affine:
            return torch.stack(list(self.ctx_weight)).to(dtype), torch.stack(list(self.ctx_bias)).to(dtype)
        if self.weight is None or self.bias is None:
            return None, None
        return self.weight.to(dtype)[None], self.bias.to(dtype)[None]

    def _context_stats(self, x: torch.Tensor, w: torch.Tensor, store: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, C) mean and variance every context normalises with; stores the new running state if ``store``."""
        k = self.num_contexts
        source_mean, source_var = self.source_mean.double()[None], self.source_var.double()[None]
        if self.learned:
            return source_mean.expand(k, -1), source_var.expand(k, -1)  # unused: learned mode has its own
        with torch.no_grad():
            flat = x.detach().reshape(x.shape[0], x.shape[1], -1).double()
            per_image = flat.shape[2]
            v_i, m_i = torch.var_mean(flat, dim=2, correction=0)  # (N, C)
            w = w.to(flat)
            images = w.sum(0)  # (K,)
            values = images * per_image
            safe = images.clamp_min(1e-12)[:, None]
            mean = (w.t() @ m_i) / safe
            var = ((w.t() @ (v_i + m_i.square())) / safe - mean.square()).clamp_min(0.0)
            # too few samples for statistics of their own, and the source context: no new statistics
            fresh = (images >= self.min_subset) & (values >= 2)
            fresh[0] = False
            f = fresh[:, None]
            if self.stats_update == "ema":
                var_unbiased = var * (values / (values - 1).clamp_min(1e-12))[:, None]
                new_mean = torch.where(f, torch.lerp(self.ctx_mean, mean, self.momentum), self.ctx_mean)
                new_var = torch.where(f, torch.lerp(self.ctx_var, var_unbiased, self.momentum), self.ctx_var)
                new_images = self.ctx_images + torch.where(fresh, images, 0.0)
                new_values = self.ctx_values + torch.where(fresh, values, 0.0)
                run_mean, run_var = new_mean, new_var
            else:
                # the exact merge of each context's pool with its share (as AdaptiveBN's cumulative mode)
                n_b = torch.where(fresh, values, 0.0)[:, None]
                n_a = self.ctx_values[:, None]
                n, new_mean, m2 = merge_moments(n_a, self.ctx_mean, self.ctx_var * n_a, n_b, mean, var * n_b)
                new_var = torch.where(f, m2 / n.clamp_min(1e-12), self.ctx_var)
                new_mean = torch.where(f, new_mean, self.ctx_mean)
                new_values = n[:, 0]
                new_images = self.ctx_images + torch.where(fresh, images, 0.0)
                blended = blend_prior(source_mean, source_var, new_mean, new_var, new_images[:, None], self.prior_n)
                seen = (new_images > 0)[:, None]
                run_mean = torch.where(seen, blended[0], source_mean)
                run_var = torch.where(seen, blended[1], source_var)
            if store:
                self.ctx_mean.copy_(new_mean)
                self.ctx_var.copy_(new_var)
                self.ctx_values.copy_(new_values)
                self.ctx_images.copy_(new_images)
            run_mean = torch.cat([source_mean, run_mean[1:]])
            run_var = torch.cat([source_var, run_var[1:]])
        return run_mean, run_var

    def extra_repr(self) -> str:
        return (f"{self.num_features}, contexts={self.num_contexts}, stats_update={self.stats_update}, "
                f"prior_n={self.prior_n}, per_context_affine={self.per_context_affine}, learned={self.learned}")
