"""LAME: Laplacian-regularised maximum-likelihood estimation of the batch's labels (Boudiaf et al., CVPR 2022).

Nothing in the model changes: it runs in eval mode with its source statistics. For each batch, the class
assignment Y of every image is refined from the model's probabilities p with an affinity W between the images'
L2-normalised penultimate features (the input of the last linear layer): starting from Y = p, iterate
Y <- softmax(log p + lambda W Y) until the entropy-regularised energy changes by at most 1e-8 of itself (at most
``max_steps`` times). The prediction is log Y (its argmax is LAME's label).

Affinities, as the reference benchmark offers them: ``rbf`` (its default) exp(-d^2 / (2 sigma^2)) with sigma the
mean distance to the ``knn``-th nearest feature (the image itself counting as the first), ``knn`` (1 for the
``knn`` nearest other images, 0 elsewhere) and ``linear`` (feature dot products). On small CIFAR ResNets the RBF
default can pull a whole batch into one class (ResNet-20 on CIFAR-10-C: 10 % accuracy); ``affinity: knn`` does
not (see docs/methods/teachers.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from tta.core.base import AdaptedModel, StepOutput
from tta.core.requirements import Requirements
from tta.core.validate import check_range
from tta.models.surgery import FeatureSplit
from tta.registry import register


@dataclass(frozen=True)
class LAMEConfig:
    """Settings of ``lame``: the affinity, its neighbourhood size, symmetrisation and the iteration's limits."""

    affinity: Literal["rbf", "knn", "linear"] = "rbf"
    knn: int = 5
    force_symmetry: bool = False
    bound_lambda: float = 1.0
    max_steps: int = 100

    def __post_init__(self) -> None:
        if self.affinity not in ("rbf", "knn", "linear"):
            raise ValueError(f"affinity must be rbf, knn or linear, got {self.affinity!r}")
        for name, value in (("knn", self.knn), ("max_steps", self.max_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000:
                raise ValueError(f"{name} must be an integer in [1, 10000], got {value!r}")
        check_range("bound_lambda", self.bound_lambda, low=0.0)


def affinity_matrix(features: torch.Tensor, kind: str, knn: int) -> torch.Tensor:
    """The (N, N) affinity between L2-normalised ``features`` (N, D): ``rbf``, ``knn`` or ``linear``."""
    if kind == "linear":
        return features @ features.T
    # Exact pairwise distances (not the matrix-product shortcut): the image itself is at distance 0.
    dist = torch.cdist(features, features, compute_mode="donot_use_mm_for_euclid_dist")
    n = features.shape[0]
    if kind == "knn":
        nearest = dist.topk(min(knn + 1, n), dim=1, largest=False).indices[:, 1:]  # the first is the image itself
        return torch.zeros_like(dist).scatter_(1, nearest, 1.0)
    sigma = dist.topk(min(knn, n), dim=1, largest=False).values[:, -1].mean()
    # A zero bandwidth (one image, or identical ones) is the limit sigma -> 0: 1 at distance 0, 0 elsewhere.
    return torch.exp(-dist.square() / (2 * sigma.square()).clamp_min(torch.finfo(dist.dtype).tiny))


def laplacian_assignment(log_probs: torch.Tensor, kernel: torch.Tensor, bound_lambda: float = 1.0,
                         max_steps: int = 100) -> torch.Tensor:
    """LAME's bound optimisation: Y <- softmax(log p + lambda W Y) from Y = p, until the energy settles.

    ``log_probs`` are log(p + 1e-10) as in the reference; stops when the energy changes by at most 1e-8 of itself
    (from the third iteration on) or after ``max_steps`` iterations. Returns Y (N, K).
    """
    y = log_probs.softmax(1)
    old = float("inf")
    for i in range(max_steps):
        pairwise = bound_lambda * (kernel @ y)
        y = (log_probs + pairwise).softmax(1)
        energy = (-log_probs * y - bound_lambda * pairwise * y + y * y.clamp_min(1e-20).log()).sum().item()
        if i > 1 and abs(energy - old) <= 1e-8 * abs(old):
            break
        old = energy
    return y


@register("lame")
class LAME(AdaptedModel):
    """Laplacian adjustment of the batch's predictions over feature affinities; no parameter or statistic changes."""

    Config = LAMEConfig
    update = "none"
    requires = Requirements(classifier=True)
    presets: ClassVar[dict[str, dict[str, Any]]] = {"imagenet": {}}  # the reference uses the same settings

    def setup(self) -> None:
        self.split = FeatureSplit(self.model)

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        return StepOutput(self.predict(x, domain))

    def predict(self, x: torch.Tensor, domain: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        features, logits = self.split(x)
        log_probs = torch.log(logits.softmax(1) + 1e-10)
        kernel = affinity_matrix(F.normalize(features, p=2, dim=-1), cfg.affinity, cfg.knn)
        if cfg.force_symmetry:
            kernel = (kernel + kernel.T) / 2
        y = laplacian_assignment(log_probs, kernel, cfg.bound_lambda, cfg.max_steps)
        return y.clamp_min(torch.finfo(y.dtype).tiny).log()
