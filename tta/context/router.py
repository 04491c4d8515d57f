"""The router: which contexts the samples of a forward belong to, decided once per batch for every layer.

A ``ContextRouter`` routes by domain ids (context = id + 1) when it is given them; otherwise by its ``fallback``:
``source`` sends every sample to context 0 (no adaptation), ``infer`` routes by the images' style descriptors
(``tta.context.descriptors``) with the source-calibrated online assignment of ``tta.context.assign`` (create,
merge, forget, soft responsibilities). It writes its decision into a ``Routing`` (``tta.norm.context_norm``) that
the model's layers were given when they were built; it holds no layer. The structural changes the assignment decides
(new, split, merged, forgotten contexts) are applied to the router's own counts before the next batch and returned,
for the model that owns both to mirror in its layers (``mirror``). An image's routing depends only on the state
before its batch and on the image itself (unless ``immediate`` is set: then a batch's new contexts route it; or
``whole_batch``: then a batch whose descriptors are one cloud goes whole to the context most responsible for it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from tta.context.assign import ContextAssigner
from tta.norm.context_norm import GrowingContexts, Routing, resize_rows

Fallback = Literal["source", "infer"]
FALLBACKS: tuple[str, ...] = ("source", "infer")
OPS: tuple[str, ...] = ("grow", "clear", "merge", "split")  # structural changes of inferred contexts
Op = tuple[str, int, int]


class ContextLayer(Protocol):
    """What a layer with per-context state offers to have the router's structural changes mirrored in it."""

    @property
    def num_contexts(self) -> int: ...
    def resize(self, k: int) -> None: ...
    def clear_context(self, k: int) -> None: ...
    def split_context(self, dst: int, src: int) -> None: ...
    def merge_context(self, dst: int, src: int) -> None: ...


def mirror(ops: Iterable[Op], layers: Iterable[ContextLayer]) -> None:
    """Apply the structural changes ``ops`` (as ``ContextRouter.begin`` returns them, in order) to ``layers``."""
    layers = list(layers)
    for op, a, b in ops:
        for layer in layers:
            if op == "grow":
                layer.resize(max(layer.num_contexts, a))
            elif op == "clear":
                if a < layer.num_contexts:
                    layer.clear_context(a)
            elif op == "split":  # b was split, a holds its other half
                if max(a, b) < layer.num_contexts:
                    layer.split_context(a, b)
            elif b < layer.num_contexts:  # merge b into a
                layer.merge_context(a, b)


class ContextRouter(GrowingContexts):
    """Which contexts the samples of the current forward belong to, for every layer of one model.

    Holds the ``Routing`` of the forward in progress (shared with the layers), how many images each context has
    seen, and (with ``fallback`` ``infer``) the ``ContextAssigner`` whose structural changes it applies before the
    next forward.
    """

    size_buffer = "seen"

    def __init__(self, declared: int = 0, fallback: Fallback = "source", assigner: ContextAssigner | None = None,
                 routing: Routing | None = None) -> None:
        super().__init__()
        if fallback not in FALLBACKS:
            raise ValueError(f"unknown fallback {fallback!r}; choose one of {', '.join(FALLBACKS)}")
        if fallback == "infer" and assigner is None:
            raise ValueError("fallback 'infer' needs a ContextAssigner (calibrated on clean source data)")
        self.initial_contexts, self.fallback, self.assigner = 1 + declared, fallback, assigner
        # whether the contexts a batch creates (split, merge) route that batch itself, not only the next ones
        self.immediate = False
        # whether a batch that is one cloud of descriptors is routed whole to the context most responsible for it
        self.whole_batch = False
        self.routing = routing if routing is not None else Routing()  # a plain object: never saved
        self.register_buffer("seen", torch.zeros(self.initial_contexts, dtype=torch.float64))
        # structural changes decided by the last batch, applied before the next (op code, a, b); saved state
        self.register_buffer("pending", torch.zeros(0, 3, dtype=torch.long))

    @property
    def num_contexts(self) -> int:
        """Contexts in use, the source (0) included."""
        return self.seen.shape[0]

    @property
    def weights(self) -> torch.Tensor | None:
        """The (N, K) routing weights of the forward in progress (``None`` outside one)."""
        return self.routing.weights

    def resize(self, k: int) -> None:
        """Grow (new contexts start unseen) or shrink to ``k`` contexts."""
        if k != self.num_contexts:
            self.seen = resize_rows(self.seen, k, torch.zeros((), dtype=torch.float64))

    def reset_structure(self) -> None:
        super().reset_structure()
        self.pending = torch.zeros(0, 3, dtype=torch.long)
        if self.assigner is not None:
            self.assigner.resize(1)
            self.assigner.resize_buffer(0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        saved_pending = state_dict.get(prefix + "pending")
        if saved_pending is not None:
            self.pending = torch.zeros_like(saved_pending)
        if self.assigner is not None:
            saved_buffer = state_dict.get(prefix + "assigner.buffer")
            saved_count = state_dict.get(prefix + "assigner.count")
            if saved_buffer is not None:
                self.assigner.resize_buffer(saved_buffer.shape[0])
            if saved_count is not None:
                self.assigner.resize(saved_count.shape[0])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def begin(self, x: torch.Tensor, domain: torch.Tensor | None, descriptors: torch.Tensor | None,
              store: bool = True) -> list[Op]:
        """Route the next forward of ``x``: by ``domain`` ids (context = id + 1), else by the fallback
        (``descriptors``: the images' style descriptors, needed by ``infer``); ``store=False`` stores nothing.
        Returns the structural changes applied to the contexts first, for the layers to ``mirror``."""
        routing, applied = self.routing, []
        routing.store = store
        n = x.shape[0]
        if domain is not None:
            ids = domain.long() + 1
            self.resize(max(self.num_contexts, int(ids.max()) + 1))  # the one synchronisation of the batch
            routing.weights = F.one_hot(ids, self.num_contexts).to(torch.float64)
        elif self.fallback == "source" or self.assigner is None:
            routing.weights = torch.zeros(n, self.num_contexts, dtype=torch.float64, device=x.device)
            routing.weights[:, 0] = 1.0
        else:
            if descriptors is None:
                raise ValueError("fallback 'infer' routes by descriptors; pass the images' descriptors")
            applied = self.apply_pending()
            weights = self.assigner.assign(descriptors)  # on the CPU: one transfer of (N, D) descriptors
            if store:
                ops = self.assigner.observe(descriptors, weights)
                self.pending = torch.tensor([(OPS.index(op), a, b) for op, a, b in ops], dtype=torch.long
                                            ).reshape(-1, 3)
                if self.immediate and ops:  # the batch's own new contexts route it
                    applied += self.apply_pending()
                    weights = self.assigner.assign(descriptors)
            if self.whole_batch and self.assigner.one_domain(descriptors):
                weights = F.one_hot(weights.sum(0).argmax(), weights.shape[1]).to(weights).expand_as(weights)
            self.resize(max(self.num_contexts, weights.shape[1]))
            weights = F.pad(weights, (0, self.num_contexts - weights.shape[1]))
            # statistics are estimated from each context's members (the images it is most responsible for)
            members = F.one_hot(weights.argmax(1), weights.shape[1]).to(weights.dtype)
            routing.weights = weights.to(x.device, non_blocking=True)
            routing.members = members.to(x.device, non_blocking=True)
        if store:
            self.seen += routing.weights.sum(0)
        return applied

    def apply_pending(self) -> list[Op]:
        """Apply the assigner's structural changes of the last batch to the router's counts; returns them (in
        order) for the layers to ``mirror``."""
        ops = [(OPS[code], a, b) for code, a, b in self.pending.tolist()]
        for op, a, b in ops:
            if op == "grow":
                self.resize(max(self.num_contexts, a))
            elif op == "clear":
                self.seen[a] = 0.0
            elif op == "split":  # b was split, a holds its other half
                self.seen[b] /= 2
                self.seen[a] = self.seen[b]
            else:  # merge b into a
                self.seen[a] += self.seen[b]
                self.seen[b] = 0.0
        self.pending = torch.zeros(0, 3, dtype=torch.long)
        return ops

    def end(self) -> None:
        """Forget the routing of the forward that just finished."""
        self.routing.clear()
