"""A BN model made domain-aware: its BatchNorms become ``DomainContextNorm`` layers routed by one ``ContextRouter``.

``ContextNormModel.forward(x, domain)`` routes by domain id (context = id + 1) when ids are given; without them the
router's fallback decides (``source``, or ``infer`` from the images' style descriptors, read by a ``StyleProbe`` of
the frozen source model). The model owns the router and the layers; the router and every layer share one
``Routing``, and the model mirrors the router's structural changes in its layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from tta.context.assign import Calibration, ContextAssigner, calibrate
from tta.context.descriptors import DEFAULT_DEPTH, StyleProbe, describe
from tta.context.router import ContextRouter, mirror
from tta.errors import ModelError
from tta.norm.context_norm import DomainContextNorm, Routing, StatsUpdate
from tta.norm.convert import replace_batchnorms


class ContextNormModel(nn.Module):
    """A model whose BatchNorms are ``DomainContextNorm``s; ``forward(x, domain)`` routes samples by domain id.

    ``probe`` (a ``StyleProbe`` of the source model) gives the descriptors the router infers contexts from when it
    is given no ids and its fallback is ``infer``.
    """

    def __init__(self, net: nn.Module, router: ContextRouter, probe: StyleProbe | None = None) -> None:
        super().__init__()
        self.net, self.router, self.probe = net, router, probe

    def forward(self, x: torch.Tensor, domain: torch.Tensor | None = None, store: bool = True) -> torch.Tensor:
        """Logits of ``x``; ``domain`` (N,) gives each sample's domain id (context id + 1), ``None`` routes by the
        fallback; ``store=False`` predicts without storing statistics or learning contexts."""
        ids = None if domain is None else torch.as_tensor(domain, device=x.device)
        descriptors = None
        if ids is None and self.router.fallback == "infer" and self.probe is not None:
            descriptors = self.probe(x)
        ops = self.router.begin(x, ids, descriptors, store=store)
        try:
            if ops:
                mirror(ops, self.layers())
            return self.net(x)
        finally:
            self.router.end()

    def apply_pending(self) -> None:
        """Apply the structural changes the last batch decided (new, split, merged, forgotten contexts) now rather
        than before the next inferred forward, to the router and every layer."""
        mirror(self.router.apply_pending(), self.layers())

    def layers(self) -> list[DomainContextNorm]:
        """Every DomainContextNorm of the model, in module order."""
        return [m for m in self.net.modules() if isinstance(m, DomainContextNorm)]


@dataclass(frozen=True)
class ContextInference:
    """How contexts are inferred when no domain ids are given: the source ``calibration`` of the ``descriptor``
    (``calibrate_contexts``), the images a new context needs (``min_spawn``) and the most contexts in use."""

    calibration: Calibration
    descriptor: str = DEFAULT_DEPTH
    min_spawn: int = 8
    max_contexts: int = 16


def convert_context_norm(
    model: nn.Module,
    *,
    stats_update: StatsUpdate = "cumulative",
    prior_n: float = 16.0,
    momentum: float = 0.1,
    min_subset: int = 2,
    per_context_affine: bool = False,
    learned: bool = False,
    declared: int = 0,
    inference: ContextInference | None = None,
    layer: type[DomainContextNorm] = DomainContextNorm,
    layer_options: Mapping[str, object] | None = None,
) -> ContextNormModel:
    """Replace every BatchNorm of ``model`` (in place) by a ``DomainContextNorm`` and wrap it with a router.

    ``declared`` contexts (1..declared) exist from the start and survive ``reset_structure``; others are created on
    first sight. ``per_context_affine=True`` gives DSBN. Without ids, samples go to the source context, or with
    ``inference`` to inferred contexts. ``layer`` (a ``DomainContextNorm`` subclass) replaces every BatchNorm, given
    ``layer_options`` beside the settings above.
    """
    probe, assigner = None, None
    if inference is not None:
        probe = StyleProbe(model, inference.descriptor)  # a frozen copy of the source model, before the conversion
        if inference.calibration.mean.shape[0] != probe.dim:
            raise ValueError(f"the calibration is for {inference.calibration.mean.shape[0]}-dimensional descriptors, "
                             f"the {inference.descriptor!r} descriptor of this model has {probe.dim}; calibrate on "
                             "this model")
        assigner = ContextAssigner(inference.calibration, min_spawn=inference.min_spawn,
                                   max_contexts=inference.max_contexts)
    routing = Routing()  # written by the router, read by every layer
    holder = nn.Sequential(model)  # so that a bare BatchNorm is replaced too
    count = replace_batchnorms(holder, lambda bn: layer.from_bn(
        bn, stats_update=stats_update, prior_n=prior_n, momentum=momentum, min_subset=min_subset,
        per_context_affine=per_context_affine, learned=learned, declared=declared, routing=routing,
        **(layer_options or {})))
    if count == 0:
        raise ModelError("the model has no BatchNorm layers to make domain-aware; use a BN network")
    net = holder[0]
    first = next(m for m in net.modules() if isinstance(m, DomainContextNorm))
    router = ContextRouter(declared=declared, fallback="source" if inference is None else "infer",
                           assigner=assigner, routing=routing)
    return ContextNormModel(net, router, probe).to(first.source_mean.device)


def calibrate_contexts(model: nn.Module, images: torch.Tensor, descriptor: str = DEFAULT_DEPTH,
                       quantile: float = 0.99) -> Calibration:
    """The source calibration of context inference: descriptors of clean source ``images`` (N, C, H, W) in
    [0, 1] under ``model`` (the unconverted BN model), their spread and distance quantiles, without the directions
    that tell apart the classes the model predicts for them (an image's context must follow its domain, not its
    content)."""
    probe = StyleProbe(model, descriptor)
    device = next(model.parameters(), torch.empty(0)).device
    logits = [probe.logits(chunk.to(device)) for chunk in images.split(500)]
    content = torch.cat([out.argmax(1).cpu() for out in logits]) if all(
        isinstance(out, torch.Tensor) and out.ndim == 2 for out in logits) else None
    return calibrate(describe(probe, images.to(device)), quantile, content=content)
