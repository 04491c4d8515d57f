"""SANTA: source-anchored test-time adaptation with contrastive learning against source prototypes
(Chakrabarty, Sreenivas and Biswas, TMLR 2023).

As the reference benchmark runs it: BatchNorm layers normalise with batch statistics and the affine parameters of
BatchNorm/LayerNorm/GroupNorm train, together with a projector (linear-ReLU-linear to ``projection_dim``), by one
Adam step per batch (1e-3 on CIFAR-10-C) on

- a source-anchored self-training loss: the frozen source model's log-probabilities on each image, weighted by the
  adapted model's probabilities on the image (1 - ``aug_weight``) and on a random augmentation of it
  (``aug_weight``): ``-sum_c [(1 - a) p_c(x) + a p_c(x_aug)] log p0_c(x)``, averaged over the batch;
- plus ``lambda_cont`` times a supervised-contrastive loss (temperature ``temperature``): for each image, its
  features, those of its augmentation and the nearest class prototype (cosine) of the source are three views of
  one instance, projected and L2-normalised; every view's positives are the other two of its instance.

The class prototypes are the mean penultimate features of the clean source images (``--source-data``, all of
them, in shuffled batches of ``source_batch_size``, through the model as configured: batch statistics), computed
once and cached by model weights and source data. The returned logits are the adapted model's, computed before
the update. The augmentation is CoTTA's (``tta.core.augment.tta_augment``).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tta.core.augment import tta_augment
from tta.core.base import AdaptedModel, StepOutput
from tta.core.params import OptimizerConfig, check_norm_affine, norm_affine_params
from tta.core.reliable import eval_with_batch_statistics
from tta.core.requirements import Requirements
from tta.core.validate import check_range
from tta.models.fingerprint import model_fingerprint
from tta.models.surgery import FeatureSplit
from tta.registry import register
from tta.source import SourceData, derived


@dataclass(frozen=True)
class SANTAConfig(OptimizerConfig):
    """Settings of ``santa`` (defaults: the reference benchmark's CIFAR-10-C configuration, Adam 1e-3)."""

    lambda_ce_trg: float = 1.0
    lambda_cont: float = 1.0
    aug_weight: float = 0.5
    temperature: float = 0.1
    projection_dim: int = 128
    source_batch_size: int = 200
    source_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("lambda_ce_trg", self.lambda_ce_trg, low=0.0)
        check_range("lambda_cont", self.lambda_cont, low=0.0)
        check_range("aug_weight", self.aug_weight, low=0.0, high=1.0)
        check_range("temperature", self.temperature, low=0.0, low_open=True)
        _check_int("projection_dim", self.projection_dim, 1, 65536)
        _check_int("source_batch_size", self.source_batch_size, 2, 65536)
        _check_int("source_seed", self.source_seed, 0, 2**62)


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def source_prototypes(model: nn.Module, split: FeatureSplit, source: SourceData, num_classes: int, *,
                      batch_size: int, seed: int) -> torch.Tensor:
    """(classes, D): the mean features of each class's clean source images, through ``model`` as configured, in
    shuffled batches of ``batch_size`` (a last single image joins the batch before it); a class with no image gets
    the mean of all features. Cached by the model's weights, the source data and these settings."""

    def compute() -> torch.Tensor:
        images, labels = source.sample(None)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        images, labels = images[order], labels[order]
        bounds = [*range(0, len(images), batch_size), len(images)]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] < 2:
            del bounds[-2]
        like = next(model.parameters())
        with torch.no_grad():
            feats = torch.cat([split(images[a:b].to(device=like.device, dtype=like.dtype))[0]
                               for a, b in itertools.pairwise(bounds)]).cpu()
        protos = feats.mean(0).repeat(num_classes, 1)
        for c in labels.unique().tolist():
            if 0 <= c < num_classes:
                protos[c] = feats[labels == c].mean(0)
        return protos

    settings = f"classes={num_classes}|batch={batch_size}|seed={seed}"
    return derived("class-prototypes", model_fingerprint(model), source, settings, compute)


def make_projector(features: int, dim: int) -> nn.Module:
    """The contrastive projector: linear - ReLU - linear to ``dim`` (torch's default initialisation)."""
    return nn.Sequential(nn.Linear(features, dim), nn.ReLU(), nn.Linear(dim, dim))


def instance_contrastive_loss(views: torch.Tensor, projector: nn.Module, temperature: float) -> torch.Tensor:
    """Supervised-contrastive loss where the V views of each of the N instances (``views``: (N, V, D)) are each
    other's positives and every other projected view a negative; the mean over all N V anchors."""
    n, v, _ = views.shape
    z = F.normalize(projector(views.transpose(0, 1).reshape(n * v, -1)), p=2, dim=1)  # view-major, as SupCon
    sim = z @ z.T / temperature
    sim = sim - sim.max(1, keepdim=True).values.detach()
    not_self = ~torch.eye(n * v, dtype=torch.bool, device=z.device)
    instance = torch.arange(n, device=z.device).repeat(v)
    positive = (instance[:, None] == instance[None, :]) & not_self
    log_prob = sim - torch.log((sim.exp() * not_self).sum(1, keepdim=True))
    return -((log_prob * positive).sum(1) / positive.sum(1)).mean()


def nearest_prototypes(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """For each feature (N, D), the prototype (classes, D) of highest cosine similarity: (N, D)."""
    with torch.no_grad():
        index = F.cosine_similarity(prototypes[:, None, :], features[None, :, :], dim=-1).argmax(0)
    return prototypes[index]


@register("santa")
class SANTA(AdaptedModel):
    """Source-anchored self-training on an image and its augmentation, contrastive against source prototypes."""

    Config = SANTAConfig
    update = "gradient"
    requires = Requirements(source_data=True, classifier=True)
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The reference benchmark's ImageNet-C settings (ResNet-50, batch 64).
        "imagenet": {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "nesterov": True, "source_batch_size": 64}}

    def check_model(self, model: nn.Module) -> None:
        check_norm_affine(model, self.name)

    def configure(self, model: nn.Module) -> nn.Module:
        return eval_with_batch_statistics(model, norm_affine_params(model))

    def setup(self) -> None:
        cfg = self.config
        self.anchor = copy.deepcopy(self.model).requires_grad_(False)
        self.split = FeatureSplit(self.model)
        assert self.source_data is not None and self.num_classes is not None  # required, checked before setup
        protos = source_prototypes(self.model, self.split, self.source_data, self.num_classes,
                                   batch_size=cfg.source_batch_size, seed=cfg.source_seed)
        like = next(self.model.parameters())
        # A constant of the run, not adaptation state: never reset, saved or restored.
        self.register_buffer("prototypes", protos.to(like), persistent=False)
        self.projector = make_projector(protos.shape[1], cfg.projection_dim).to(like)

    def params(self) -> list[nn.Parameter]:
        return norm_affine_params(self.model) + list(self.projector.parameters())

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        cfg = self.config
        features, logits = self.split(x)
        features_aug, logits_aug = self.split(tta_augment(x))
        with torch.no_grad():
            anchor_log_probs = self.anchor(x).log_softmax(1)
        weights = (1 - cfg.aug_weight) * logits.softmax(1) + cfg.aug_weight * logits_aug.softmax(1)
        self_training = -(weights * anchor_log_probs).sum(1).mean()
        views = torch.stack([nearest_prototypes(features, self.prototypes), features, features_aug], dim=1)
        contrastive = instance_contrastive_loss(views, self.projector, cfg.temperature)
        loss = cfg.lambda_ce_trg * self_training + cfg.lambda_cont * contrastive
        return StepOutput(logits.detach(), loss, diagnostics={
            "self_training": self_training.detach(), "contrastive": contrastive.detach()})
