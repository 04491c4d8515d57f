"""Per-domain tallies of what a guard saw and did, for the engine's result rows.

``estimated_accuracy`` is the guard's estimate of the accuracy of the predictions returned (percent), accumulated per
sample on the device like the engine's accuracy (no synchronisation of its own). "Not estimated" has one spelling,
NaN (an empty cell in a CSV): without a guard, without calibration data, and for a domain any of whose batches the
guard declined to estimate (``Guard.estimate_note`` says why: outside the calibrated range, a collapsed model).
``skipped``, ``rollbacks``, ``resets`` and ``fallbacks`` count batches, each credited to the domain of the batch's
first image.
Resets the engine itself makes (its reset policy) are not counted: ``start()`` runs after them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tta.core.base import AdaptedModel

COUNTS: tuple[str, ...] = ("skipped", "rollbacks", "resets", "fallbacks")
COLUMNS: list[str] = ["estimated_accuracy", *COUNTS]


class GuardTally:
    """Accumulates the guard columns of the engine's rows over a stream."""

    def __init__(self, adapted: AdaptedModel, n_domains: int, device: torch.device) -> None:
        self.adapted = adapted
        self.above = torch.zeros(n_domains, dtype=torch.long, device=device)
        self.estimated = torch.zeros(n_domains, dtype=torch.long, device=device)
        self.seen = torch.zeros(n_domains, dtype=torch.long, device=device)
        self.counts = [dict.fromkeys(COUNTS, 0) for _ in range(n_domains)]
        self._before: dict[str, int] = {}

    def start(self) -> None:
        """Call right before the adapted model sees a batch."""
        counters = self.adapted.counters
        self._before = {k: getattr(counters, k) for k in COUNTS}

    def add(self, domain: torch.Tensor) -> None:
        """Call right after, with the batch's per-sample domain indices."""
        counters = self.adapted.counters
        first = None
        for k in COUNTS:
            delta = getattr(counters, k) - self._before[k]
            if delta:
                first = int(domain[0]) if first is None else first
                self.counts[first][k] += delta
        guard = getattr(self.adapted, "guard", None)
        above = None if guard is None else guard.above
        self.seen.index_add_(0, domain, torch.ones_like(domain))
        if above is not None and above.shape[0] == domain.shape[0]:
            self.above.index_add_(0, domain, above.to(domain.device))
            self.estimated.index_add_(0, domain, torch.ones_like(domain))

    def row(self, d: int) -> dict[str, Any]:
        """The guard columns of domain ``d``'s row."""
        n = int(self.estimated[d])
        estimate = 100.0 * int(self.above[d]) / n if n and n == int(self.seen[d]) else float("nan")
        return {"estimated_accuracy": estimate, **self.counts[d]}
