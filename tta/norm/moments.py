"""The running-moment merge, in one place: pooled statistics of two sets of values, exactly.

Statistics are kept as (count, mean, M2), M2 the sum of squared deviations from the mean (variance = M2 / count).
Chan et al.'s parallel merge gives the pooled set's statistics from the two parts', in any order, without the
catastrophic cancellation of sums of squares; AdaptiveBN's cumulative modes, the per-context statistics of
``DomainContextNorm`` and the merge of two of its contexts all use it, in float64.
"""

from __future__ import annotations

import torch


def merge_moments(
    n_a: torch.Tensor, mean_a: torch.Tensor, m2_a: torch.Tensor,
    n_b: torch.Tensor | float, mean_b: torch.Tensor, m2_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, M2) of the union of set a (``n_a`` values, ``mean_a``, ``m2_a``) and set b.

    Broadcasts: counts (K, 1) with means (K, C) merge K pairs at once. A pair with no values at all (count 0 on
    both sides) keeps ``mean_a`` and gets M2 0.
    """
    n = n_a + n_b
    ratio = n_b / n.clamp_min(1e-12)  # b's share of the pooled values
    delta = mean_b - mean_a
    return n, mean_a + delta * ratio, m2_a + m2_b + delta.square() * (n_a * ratio)


__all__ = ["merge_moments"]
