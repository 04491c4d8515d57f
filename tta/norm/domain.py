"""Domain-aware normalisation: per-context BatchNorm statistics for mixed-domain streams (METHODS.md 3 and 4.5).

``DomainContextNorm`` replaces a pretrained BatchNorm. It keeps per-context statistics (mean, variance, counts);
context 0 is the source (the BN's running statistics, never updated) and a context per domain is created on first
sight (or declared up front) from the source statistics with a count of 0. Each forward routes every sample to its
context: the batch is split by context, each subset normalised with its own context's statistics, and the results
scattered back in batch order (so the output does not depend on the order of the samples).

Statistics of a context k >= 1 on a subset of b images (values-per-channel counts in float64, as AdaptiveBN):

- ``cumulative``: the context's pool (all target values it has seen, merged exactly) plus the subset, blended with
  the source by image counts, N_src/(N_src + n_k + b) (``prior_n`` = N_src; 0 = full adaptation, inf = source);
- ``ema``: an exponential moving average initialised from the source, updated with the subset before use.

Subsets smaller than ``min_subset`` images normalise with the context's running statistics and leave them as they
are. With ``per_context_affine`` every context also has its own gamma_k, beta_k (copies of the BN's): that is DSBN;
without, the affine is shared (DomainContextNorm, "per-domain AdaBN"). ``learned`` replaces the statistics of a
context by trainable mu_k and log sigma_k initialised from the source (the TTA analogue of context normalisation).

The model's forward does not take domain ids, so a ``ContextRouter`` shared by all layers of a model carries them:
``ContextNormModel.forward(x, domain)`` sets them on the router for the duration of one forward, then clears them.
When no ids are given the router infers contexts from a per-sample signature (channel mean and log-variance of the
input of the first layer the forward reaches) with the ``fallback``:

- ``source``: every sample goes to context 0 (the source statistics: no adaptation);
- ``spawn``: hard assignment to the most likely context (tau below); samples whose signature lies further than
  ``spawn_threshold`` (mean squared z-score over signature dimensions) from every context spawn a new one when
  there are at least ``min_spawn`` of them within ``spawn_threshold`` of a centre (found by mean shift from the
  tightest group of ``min_spawn`` unseen signatures; distances scaled by ``spawn_var`` x the signature variance
  of the first batch seen, within the clusters that 2-means finds in it when it mixes separable domains),
  up to ``max_contexts``;
- ``soft``: contexts are created as in ``spawn``, but each sample is normalised with the mixture
  sum_k tau_k (x - mu_k) / sigma_k, tau = softmax_k(log lambda_k + log N(s; m_k, diag v_k)), the same tau in every
  layer; context statistics are updated with tau-weighted moments.

Per-context Gaussians of signatures are kept for every context k >= 1 that has received samples (also when ids are
given, so a model adapted with known domains can later infer them). Context 0 has none (there are no source
samples), so inference never routes to it once some context exists.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.errors import ModelError
from tta.norm.adaptive_bn import blend_prior
from tta.norm.convert import Float64State, replace_batchnorms

Update = Literal["cumulative", "ema"]
Fallback = Literal["source", "soft", "spawn"]
UPDATES: tuple[str, ...] = ("cumulative", "ema")
FALLBACKS: tuple[str, ...] = ("source", "soft", "spawn")
# 2-means separation (mean over signature dimensions of the squared centroid gap in within-cluster variances) above
# which the first batch is taken to hold several domains. Batches of one domain of real CIFAR-10 images split at
# 1.5 (median) to 4.6 (max) by image content; low contrast against other corruptions splits at 8 to 15.
SPLIT_SEPARATION = 6.0


def _resize_rows(t: torch.Tensor, k: int, fill: torch.Tensor) -> torch.Tensor:
    """``t`` (K, ...) truncated or extended to ``k`` rows, new rows equal to ``fill``."""
    if k <= t.shape[0]:
        return t[:k].clone()
    extra = fill.to(t).expand(k - t.shape[0], *t.shape[1:])
    return torch.cat([t, extra], 0)


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


class ContextRouter(GrowingContexts):
    """Which context each sample of the current forward belongs to; shared by every layer of one model."""

    size_buffer = "sig_count"

    def __init__(
        self,
        signature_dim: int,
        declared: int = 0,
        fallback: Fallback = "source",
        spawn_threshold: float = 4.0,
        spawn_var: float = 1.0,
        min_spawn: int = 8,
        max_contexts: int = 16,
    ) -> None:
        super().__init__()
        if fallback not in FALLBACKS:
            raise ValueError(f"unknown fallback {fallback!r}; choose one of {', '.join(FALLBACKS)}")
        self.signature_dim, self.initial_contexts, self.fallback = signature_dim, 1 + declared, fallback
        self.spawn_threshold, self.spawn_var, self.min_spawn = spawn_threshold, spawn_var, min_spawn
        self.max_contexts = max_contexts
        k = self.initial_contexts
        self.register_buffer("sig_mean", torch.zeros(k, signature_dim, dtype=torch.float64))
        self.register_buffer("sig_m2", torch.zeros(k, signature_dim, dtype=torch.float64))
        self.register_buffer("sig_count", torch.zeros(k, dtype=torch.float64))
        # Scale of signatures (variance over the first batch seen, times spawn_var): the spread of a new context.
        self.register_buffer("sig_prior", torch.ones(signature_dim, dtype=torch.float64))
        self.register_buffer("sig_prior_set", torch.zeros((), dtype=torch.bool))
        # Routing of the forward in progress: not state, never saved.
        self.active = self.observed = False
        self.ids: torch.Tensor | None = None
        self.tau: torch.Tensor | None = None
        self._fresh: list[int] = []  # contexts spawned by the current batch (no samples merged yet)

    @property
    def num_contexts(self) -> int:
        """Contexts in use, the source (0) included."""
        return self.sig_count.shape[0]

    def resize(self, k: int) -> None:
        """Grow (new contexts start empty) or shrink to ``k`` contexts."""
        if k == self.num_contexts:
            return
        zero = torch.zeros((), dtype=torch.float64)
        self.sig_mean = _resize_rows(self.sig_mean, k, zero)
        self.sig_m2 = _resize_rows(self.sig_m2, k, zero)
        self.sig_count = _resize_rows(self.sig_count, k, zero)

    # ------------------------------------------------------------------------------------------- routing
    def begin(self, domain: torch.Tensor | None) -> None:
        """Route the next forward: ``domain`` holds per-sample domain ids (context = id + 1), or ``None`` to infer."""
        self.active, self.observed, self.tau = True, False, None
        if domain is None:
            self.ids = None
            return
        self.ids = domain.long() + 1
        self.resize(max(self.num_contexts, int(self.ids.max()) + 1))

    def end(self) -> None:
        """Forget the routing of the forward that just finished."""
        self.active, self.observed, self.ids, self.tau = False, False, None, None

    @property
    def pending(self) -> bool:
        """Whether the next layer should compute signatures (the first layer a routed forward reaches)."""
        return self.active and not self.observed

    def observe(self, x: torch.Tensor) -> None:
        """Called by the first layer a forward reaches: compute signatures, infer contexts if needed, update."""
        self.observed = True
        with torch.no_grad():
            s = signature(x.detach())
            if s.shape[1] != self.signature_dim:
                raise ModelError(f"the first normalisation layer reached by the forward has {s.shape[1] // 2} channels "
                                 f"but the router was built for {self.signature_dim // 2}; convert the model with "
                                 "convert_context_norm so that the first BatchNorm in module order runs first")
            if not bool(self.sig_prior_set):
                self.sig_prior.copy_(within_variance(s, self.min_spawn, self.max_contexts) * self.spawn_var)
                self.sig_prior_set.fill_(True)
            if self.ids is not None:
                weights = F.one_hot(self.ids, self.num_contexts).to(s)
            elif self.fallback == "source":
                self.ids = torch.zeros(len(s), dtype=torch.long, device=s.device)
                return
            else:
                weights = self._infer(s)
                if self.fallback == "soft":
                    self.tau = weights
                else:
                    self.ids = weights.argmax(1)
                    weights = F.one_hot(self.ids, self.num_contexts).to(s)
            weights = weights.clone()
            weights[:, 0] = 0.0  # the source context keeps no signature model
            self._update(s, weights)

    def _known(self) -> torch.Tensor:
        known = self.sig_count > 0
        known[self._fresh] = True
        return known

    def _variance(self) -> torch.Tensor:
        # Shrink each context's signature variance towards the prior with a pseudo-count of min_spawn samples.
        c0 = float(max(self.min_spawn, 1))
        return (c0 * self.sig_prior + self.sig_m2) / (c0 + self.sig_count[:, None])

    def _log_likelihood(self, s: torch.Tensor) -> torch.Tensor:
        """(N, K) log lambda_k + log N(s; m_k, diag v_k); -inf for contexts without a signature model."""
        var = self._variance()
        known = self._known()
        # Mixture weights from the counts, with the same pseudo-count as the variances (fresh contexts have 0).
        weight = self.sig_count + float(max(self.min_spawn, 1))
        log_lambda = torch.log(weight / weight[known].sum())
        diff = (s[:, None, :] - self.sig_mean[None]) ** 2 / var[None]
        ll = -0.5 * (diff + torch.log(2 * math.pi * var)[None]).sum(2) + log_lambda[None]
        return ll.masked_fill(~known[None], -math.inf)

    def _z2(self, s: torch.Tensor) -> torch.Tensor:
        """(N,) mean squared z-score of each signature under its closest context (inf when there is none)."""
        known = self._known()
        if not bool(known.any()):
            return torch.full((len(s),), math.inf, dtype=s.dtype, device=s.device)
        z2 = ((s[:, None, :] - self.sig_mean[None]) ** 2 / self._variance()[None]).mean(2)
        return z2.masked_fill(~known[None], math.inf).min(1).values

    def _infer(self, s: torch.Tensor) -> torch.Tensor:
        """(N, K) responsibilities of the known contexts, spawning new contexts for unseen signatures first."""
        self._fresh = []
        while self.num_contexts < self.max_contexts:
            unseen = self._z2(s) > self.spawn_threshold
            if int(unseen.sum()) < self.min_spawn:
                break
            cand = s[unseen]
            d = ((cand[:, None, :] - cand[None]) ** 2 / self.sig_prior).mean(2)
            # Start from the tightest group of min_spawn unseen signatures (smallest k-nearest-neighbour radius),
            # then a few mean-shift steps to the centre of its cluster.
            radius, neighbours = d.topk(self.min_spawn, dim=1, largest=False)
            centre = cand[neighbours[int(radius[:, -1].argmin())]].mean(0)
            for _ in range(3):
                near = ((cand - centre) ** 2 / self.sig_prior).mean(1) < self.spawn_threshold
                if int(near.sum()) < self.min_spawn:
                    break
                centre = cand[near].mean(0)
            if int(near.sum()) < self.min_spawn:
                break
            k = self.num_contexts
            self.resize(k + 1)
            self.sig_mean[k] = centre  # its spread is the prior's until samples are merged below
            self._fresh.append(k)
        ll = self._log_likelihood(s)
        self._fresh = []
        if not bool(torch.isfinite(ll).any()):
            # Nothing known yet and too few unseen samples to spawn: the source context takes them.
            return F.one_hot(torch.zeros(len(s), dtype=torch.long, device=s.device), self.num_contexts).to(s)
        return ll.softmax(1)

    def _update(self, s: torch.Tensor, weights: torch.Tensor) -> None:
        """Weighted exact merge of the batch's signatures into each context's Gaussian."""
        w = weights.sum(0)
        for k in torch.nonzero(w > 0).flatten().tolist():
            wk = weights[:, k:k + 1]
            n_b = w[k]
            mean_b = (wk * s).sum(0) / n_b
            m2_b = (wk * (s - mean_b) ** 2).sum(0)
            n_a = self.sig_count[k]
            n = n_a + n_b
            delta = mean_b - self.sig_mean[k]
            self.sig_mean[k] += delta * (n_b / n)
            self.sig_m2[k] += m2_b + delta**2 * (n_a * n_b / n)
            self.sig_count[k] = n


def two_means(x: torch.Tensor, min_size: int) -> tuple[float, torch.Tensor]:
    """Split ``x`` (n, d) in two by 2-means on standardised values: (separation, mask of the second half).

    The separation is the mean over dimensions of the squared gap between the halves' means in units of their
    pooled within-half variance; 0 when a half has fewer than ``min_size`` rows.
    """
    z = (x - x.mean(0)) / x.var(0, unbiased=False).clamp_min(1e-12).sqrt()
    a = z[z.square().sum(1).argmax()]
    b = z[(z - a).square().sum(1).argmax()]
    second = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    for _ in range(10):
        second = (z - a).square().sum(1) > (z - b).square().sum(1)
        if min(int(second.sum()), int((~second).sum())) < max(min_size, 1):
            return 0.0, second
        a, b = z[~second].mean(0), z[second].mean(0)
    xa, xb = x[~second], x[second]
    within = (xa.var(0, unbiased=False) * len(xa) + xb.var(0, unbiased=False) * len(xb)) / len(x)
    return float(((xa.mean(0) - xb.mean(0)).square() / within.clamp_min(1e-12)).mean()), second


def within_variance(s: torch.Tensor, min_size: int, max_clusters: int) -> torch.Tensor:
    """Per-dimension variance of ``s`` within its clusters: the first batch split by 2-means while separable.

    A first batch that mixes domains would otherwise set the scale of a context to the spread between domains, and
    every later sample would look like one seen before.
    """
    done: list[torch.Tensor] = []
    todo = [s]
    while todo:
        x = todo.pop()
        if len(x) >= 2 * min_size and len(done) + len(todo) + 2 <= max_clusters:
            separation, second = two_means(x, min_size)
            if separation > SPLIT_SEPARATION:
                todo += [x[~second], x[second]]
                continue
        done.append(x)
    pooled = sum(x.var(0, unbiased=False) * len(x) for x in done) / len(s)
    return pooled.clamp_min(1e-6)


def signature(x: torch.Tensor) -> torch.Tensor:
    """Per-sample channel mean and log-variance (N, 2C) in float64: what the router recognises domains by."""
    flat = x.reshape(x.shape[0], x.shape[1], -1).double()
    var, mean = torch.var_mean(flat, dim=2, correction=0)
    return torch.cat([mean, torch.log(var + 1e-5)], 1)


class DomainContextNorm(GrowingContexts):
    """BatchNorm with per-context statistics (and optionally per-context affine): DomainContextNorm and DSBN."""

    size_buffer = "ctx_mean"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        update: Update = "cumulative",
        prior_n: float = 16.0,
        momentum: float = 0.1,
        min_subset: int = 2,
        per_context_affine: bool = False,
        learned: bool = False,
        affine: bool = True,
        declared: int = 0,
    ) -> None:
        super().__init__()
        if update not in UPDATES:
            raise ValueError(f"unknown update {update!r}; choose one of {', '.join(UPDATES)}")
        self.num_features, self.eps, self.update, self.prior_n = num_features, eps, update, float(prior_n)
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
        self._router: ContextRouter | None = None
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
        for name in ("ctx_weight", "ctx_bias", "ctx_mu", "ctx_logstd"):
            plist = getattr(self, name)
            if len(plist) > k:
                setattr(self, name, nn.ParameterList(list(plist)[:k]))

    def resize(self, k: int) -> None:
        """Grow to ``k`` contexts (new ones start from the source with count 0) or drop the ones beyond ``k``."""
        if k == self.num_contexts:
            return
        self.ctx_mean = _resize_rows(self.ctx_mean, k, self.source_mean.double())
        self.ctx_var = _resize_rows(self.ctx_var, k, self.source_var.double())
        zero = torch.zeros((), dtype=torch.float64)
        self.ctx_values = _resize_rows(self.ctx_values, k, zero)
        self.ctx_images = _resize_rows(self.ctx_images, k, zero)
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

    # ---------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise every sample of ``x`` with the statistics of its context (see the module docstring)."""
        router = self._router
        if router is None or not router.active:
            return self._normalise(x, 0, *self._source())  # outside a routed forward: the source model
        if router.pending:
            router.observe(x)
        if self.num_contexts < router.num_contexts:
            self.resize(router.num_contexts)
        if router.tau is not None:
            return self._soft(x, router.tau)
        ids = router.ids
        if ids is None:
            ids = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        present = torch.unique(ids).tolist()
        if len(present) == 1:
            return self._normalise(x, present[0], *self._stats(present[0], x))
        parts, order = [], []
        for k in present:
            idx = torch.nonzero(ids == k).flatten()
            xs = x.index_select(0, idx)
            parts.append(self._normalise(xs, k, *self._stats(k, xs)))
            order.append(idx)
        out = torch.cat(parts, 0)
        inverse = torch.empty_like(ids)
        inverse[torch.cat(order)] = torch.arange(len(ids), device=ids.device)
        return out.index_select(0, inverse)

    def _soft(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        shape = (-1,) + (1,) * (x.ndim - 1)
        for k in torch.nonzero(tau.sum(0) > 0).flatten().tolist():
            w = tau[:, k].to(x.dtype)
            out = out + w.view(shape) * self._normalise(x, k, *self._stats(k, x, w))
        return out

    def _source(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.source_mean, self.source_var

    def _running(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The statistics context ``k`` would normalise with if it saw no new data."""
        if self.update == "ema":
            return self.ctx_mean[k], self.ctx_var[k]
        images = self.ctx_images[k]
        if float(images) == 0.0:
            return self._source()
        return blend_prior(self.source_mean.double(), self.source_var.double(), self.ctx_mean[k], self.ctx_var[k],
                           images, self.prior_n)

    def _stats(
        self, k: int, x: torch.Tensor, w: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance to normalise context ``k``'s samples ``x`` with (weights ``w``), updating its state."""
        if k == 0:
            return self._source()
        if self.learned:
            return self.ctx_mu[k], torch.exp(2 * self.ctx_logstd[k])
        dims = [0, *range(2, x.ndim)]
        per_image = x[0].numel() // x.shape[1]
        images = float(x.shape[0]) if w is None else float(w.sum())
        values = images * per_image
        if images < self.min_subset or values < 2:
            return self._running(k)  # too few samples for statistics of their own
        xs = x.detach()
        with torch.no_grad():
            if w is None:
                var, mean = torch.var_mean(xs, dim=dims, correction=0)
            else:
                wv = w.view((-1,) + (1,) * (x.ndim - 1))
                mean = (wv * xs).sum(dims) / values
                var = (wv * (xs - mean.view(1, -1, *([1] * (x.ndim - 2)))) ** 2).sum(dims) / values
            mean, var = mean.double(), var.double()
            if self.update == "ema":
                self.ctx_mean[k].lerp_(mean, self.momentum)
                self.ctx_var[k].lerp_(var * values / (values - 1), self.momentum)
                self.ctx_images[k] += images
                self.ctx_values[k] += values
                return self.ctx_mean[k], self.ctx_var[k]
            # Chan et al.'s exact merge of the context's pool with this subset (as AdaptiveBN's cumulative mode).
            n_a = self.ctx_values[k]
            n = n_a + values
            delta = mean - self.ctx_mean[k]
            m2 = self.ctx_var[k] * n_a + var * values + delta.square() * (n_a * values / n)
            self.ctx_mean[k] += delta * (values / n)
            self.ctx_var[k] = m2 / n
            self.ctx_values[k] = n
            self.ctx_images[k] += images
        return self._running(k)

    def _normalise(self, x: torch.Tensor, k: int, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        if self.per_context_affine:
            weight, bias = (self.source_weight, self.source_bias) if k == 0 else (self.ctx_weight[k], self.ctx_bias[k])
        else:
            weight, bias = self.weight, self.bias
        if self.learned and k > 0:
            # Differentiable in mu and log sigma: F.batch_norm does not pass gradients to its running statistics.
            shape = (1, -1) + (1,) * (x.ndim - 2)
            y = (x - mean.view(shape)) * torch.exp(-self.ctx_logstd[k]).view(shape)
            if weight is not None:
                y = y * weight.view(shape) + bias.view(shape)
            return y
        return F.batch_norm(x, mean.to(x.dtype), var.to(x.dtype), weight, bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, contexts={self.num_contexts}, update={self.update}, prior_n={self.prior_n}, "
                f"per_context_affine={self.per_context_affine}, learned={self.learned}")


class ContextNormModel(nn.Module):
    """A model whose BatchNorms are ``DomainContextNorm``s; ``forward(x, domain)`` routes samples by domain id."""

    def __init__(self, net: nn.Module, router: ContextRouter) -> None:
        super().__init__()
        self.net, self.router = net, router

    def forward(self, x: torch.Tensor, domain: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of ``x``; ``domain`` (N,) gives each sample's domain id (context id + 1), ``None`` infers it."""
        self.router.begin(None if domain is None else torch.as_tensor(domain, device=x.device))
        try:
            return self.net(x)
        finally:
            self.router.end()

    def layers(self) -> list[DomainContextNorm]:
        """Every DomainContextNorm of the model, in module order."""
        return [m for m in self.net.modules() if isinstance(m, DomainContextNorm)]


def convert_context_norm(
    model: nn.Module,
    *,
    update: Update = "cumulative",
    prior_n: float = 16.0,
    momentum: float = 0.1,
    min_subset: int = 2,
    per_context_affine: bool = False,
    learned: bool = False,
    declared: int = 0,
    fallback: Fallback = "source",
    spawn_threshold: float = 4.0,
    spawn_var: float = 1.0,
    min_spawn: int = 8,
    max_contexts: int = 16,
) -> ContextNormModel:
    """Replace every BatchNorm of ``model`` (in place) by a ``DomainContextNorm`` and wrap it with a router.

    ``declared`` contexts (1..declared) exist from the start and survive ``reset_structure``; others are created on
    first sight. ``per_context_affine=True`` gives DSBN.
    """
    holder = nn.Sequential(model)  # so that a bare BatchNorm is replaced too
    count = replace_batchnorms(holder, lambda bn: DomainContextNorm.from_bn(
        bn, update=update, prior_n=prior_n, momentum=momentum, min_subset=min_subset,
        per_context_affine=per_context_affine, learned=learned, declared=declared))
    if count == 0:
        raise ModelError("the model has no BatchNorm layers to make domain-aware; use a BN network")
    net = holder[0]
    layers = [m for m in net.modules() if isinstance(m, DomainContextNorm)]
    router = ContextRouter(2 * layers[0].num_features, declared=declared, fallback=fallback,
                           spawn_threshold=spawn_threshold, spawn_var=spawn_var, min_spawn=min_spawn,
                           max_contexts=max_contexts)
    wrapped = ContextNormModel(net, router).to(layers[0].source_mean.device)
    for layer in layers:
        # A plain reference, not a submodule (nn.Module.__setattr__ would register it): saved once, by the wrapper.
        object.__setattr__(layer, "_router", router)
    return wrapped
