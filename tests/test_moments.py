"""The running-moment merge (tta.norm.moments): pooled statistics, exactly, in any order."""

from __future__ import annotations

import torch

from tta.norm.moments import merge_moments


def _stats(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.tensor(float(v.shape[0]), dtype=torch.float64), v.mean(0), (v - v.mean(0)).square().sum(0)


def test_merging_parts_gives_the_whole_sets_statistics_in_any_order() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(1000, 3, generator=gen, dtype=torch.float64) * 5 + 1e4  # far from 0: no cancellation
    parts = [values[:10], values[10:400], values[400:]]
    n, mean, m2 = _stats(parts[0])
    for part in parts[1:]:
        n, mean, m2 = merge_moments(n, mean, m2, *_stats(part))
    whole = _stats(values)
    assert float(n) == 1000
    torch.testing.assert_close(mean, whole[1], rtol=1e-14, atol=0)
    torch.testing.assert_close(m2, whole[2], rtol=1e-10, atol=0)
    n2, mean2, m22 = merge_moments(*_stats(parts[2]), *_stats(torch.cat(parts[:2])))
    assert float(n2) == 1000
    torch.testing.assert_close(mean2, mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(m22, m2, rtol=1e-10, atol=0)


def test_rows_merge_at_once_and_empty_pairs_keep_their_mean() -> None:
    n_a = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    mean_a = torch.tensor([[7.0], [1.0]], dtype=torch.float64)
    m2_a = torch.tensor([[0.0], [2.0]], dtype=torch.float64)  # values 0 and 2
    n_b = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    mean_b = torch.tensor([[3.0], [4.0]], dtype=torch.float64)  # value 4
    n, mean, m2 = merge_moments(n_a, mean_a, m2_a, n_b, mean_b, torch.zeros_like(m2_a))
    assert n.flatten().tolist() == [0.0, 3.0]
    assert mean.flatten().tolist() == [7.0, 2.0]  # nothing seen: the first mean stays
    assert m2.flatten().tolist() == [0.0, 8.0]  # (0-2)^2 + (2-2)^2 + (4-2)^2
