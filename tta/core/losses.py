"""Losses and prediction statistics shared by the adaptation methods."""

from __future__ import annotations

import math

import torch

from tta.core.base import StepOutput


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample softmax entropy H = -sum_c p_c log p_c."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def entropy_margin(num_classes: int, fraction: float) -> float:
    """``fraction * ln(C)``: the entropy threshold below which EATA/SAR/DeYO call a prediction reliable."""
    return fraction * math.log(num_classes)


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the average prediction over the first dimension (MEMO's loss over augmented views)."""
    log_probs = logits.log_softmax(1)
    avg = torch.logsumexp(log_probs, dim=0) - math.log(logits.shape[0])
    avg = avg.clamp(min=torch.finfo(avg.dtype).min)
    return -(avg.exp() * avg).sum()


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy of ``logits`` against the softmax of ``target_logits`` (a teacher's)."""
    return -(target_logits.softmax(1) * logits.log_softmax(1)).sum(1)


def symmetric_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Per-sample symmetric cross-entropy between student and teacher (RMT/ROID's self-training loss)."""
    forward = soft_cross_entropy(logits, target_logits)
    backward = soft_cross_entropy(target_logits, logits)
    return alpha * forward + (1 - alpha) * backward


def soft_likelihood_ratio(logits: torch.Tensor, clip: float = 0.99, eps: float = 1e-5) -> torch.Tensor:
    """Per-sample soft likelihood ratio loss (ROID): ``-sum_c p_c log(p_c / (1 - p_c) + eps)``.

    Probabilities are clipped to at most ``clip`` so that the ratio stays finite; unlike entropy, its gradient does
    not vanish for confident predictions.
    """
    probs = logits.softmax(1).clamp(max=clip)
    return -(probs * torch.log(probs / (1 - probs) + eps)).sum(1)


def entropy_objective(logits: torch.Tensor) -> StepOutput:
    """Tent's objective: predict ``logits`` (detached) and minimise their mean softmax entropy."""
    ent = entropy(logits)
    return StepOutput(logits.detach(), ent.mean(), diagnostics={"entropy": ent.detach().mean()})
