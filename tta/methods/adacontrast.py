"""AdaContrast: contrastive test-time adaptation with online pseudo-label refinement (Chen, Wang, Ghosh and
Mohan, CVPR 2022).

As the reference benchmark runs it: every parameter of the model trains, BatchNorm in training mode (batch
statistics, running statistics updated by every training forward), one SGD step per batch (lr 2e-4, Nesterov
momentum 0.9, weight decay 1e-4 on CIFAR-10-C). Each batch gives three random views of every image: a weak one
``x_w`` (horizontal flip) and two strong ones ``x_q``, ``x_k`` (colour jitter 0.4/0.4/0.4/0.1 with probability 0.8,
grayscale with 0.2, Gaussian blur of sigma in [0.1, 2] with 0.5, horizontal flip; 8-bit values after every
operation, as the reference's PIL images). A key encoder (a copy of the model, EMA momentum ``key_momentum`` over
every parameter) and a MoCo queue of ``queue_size`` normalised keys with their pseudo-labels hold the contrastive
memory; a bank of the key encoder's weak-view features and probabilities
(at most ``queue_size``) holds the neighbourhood. Per batch:

- pseudo-labels ``y``: the argmax of the model's probabilities on ``x_w`` during the first ``warmup_samples``
  images, then the argmax of the mean bank probabilities of the ``num_neighbors`` bank features nearest (cosine) to
  the model's features of ``x_w`` (the argmax again while the bank is empty);
- the key encoder moves towards the model, and keys ``k`` are its normalised features of ``x_k``; the queue
  receives this batch's keys and pseudo-labels (first in, first out);
- the loss ``alpha * CE(f(x_q), y) + beta * L_ins + eta * L_div``: ``L_ins`` is the InfoNCE of the normalised query
  ``q`` of ``x_q`` against its key (positive) and the queue as it was before this batch (negatives, temperature
  ``temperature``), leaving out the queue entries whose (updated) pseudo-label equals ``y``; ``L_div = -H(mean_i
  p(x_q,i))`` spreads the predictions over the classes;
- after the update, the bank receives the key encoder's features and probabilities of ``x_w`` (appended until it
  holds ``queue_size``, then written over from its pointer), and the prediction returned is the updated model's on
  the image itself, BatchNorm with its running statistics.

Random draws (views, the initial random queue) come from the method's own generator, kept as state. With several
``steps`` per batch, the bank takes the batch once, after the last step.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn

from tta.core.base import AdaptedModel, StepOutput
from tta.core.params import IMAGENET_SGD, OptimizerConfig, ema_update
from tta.core.requirements import Requirements
from tta.core.validate import check_range
from tta.core.views import _uniform, generator_from, new_rng_state
from tta.methods.santa import _check_int
from tta.models.surgery import FeatureSplit
from tta.registry import register


@dataclass(frozen=True)
class AdaContrastConfig(OptimizerConfig):
    """Settings of ``adacontrast`` (defaults: the reference benchmark's CIFAR-10-C configuration)."""

    optimizer: str = "sgd"
    lr: float = 2e-4
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    queue_size: int = 16384
    key_momentum: float = 0.999
    temperature: float = 0.07
    alpha: float = 1.0
    beta: float = 1.0
    eta: float = 1.0
    num_neighbors: int = 10
    warmup_samples: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_int("queue_size", self.queue_size, 1, 2**24)
        check_range("key_momentum", self.key_momentum, low=0.0, high=1.0)
        check_range("temperature", self.temperature, low=0.0, low_open=True)
        check_range("alpha", self.alpha, low=0.0)
        check_range("beta", self.beta, low=0.0)
        check_range("eta", self.eta, low=0.0)
        _check_int("num_neighbors", self.num_neighbors, 1, 2**24)
        _check_int("warmup_samples", self.warmup_samples, 0, 2**62)


def _to_8_bits(img: torch.Tensor) -> torch.Tensor:
    """Rounded to multiples of 1/255, as the reference's PIL images are after every operation."""
    return (img * 255).round() / 255


def strong_view(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """MoCo-v2-light per image: colour jitter (p 0.8), grayscale (p 0.2), Gaussian blur (p 0.5), flip (p 0.5)."""
    out = []
    for img in x:
        if _uniform(gen, 0, 1) < 0.8:
            factors = (_uniform(gen, 0.6, 1.4), _uniform(gen, 0.6, 1.4), _uniform(gen, 0.6, 1.4),
                       _uniform(gen, -0.1, 0.1))
            for op in torch.randperm(4, generator=gen).tolist():
                if op == 0:
                    img = TF.adjust_brightness(img, factors[0])
                elif op == 1:
                    img = TF.adjust_contrast(img, factors[1])
                elif op == 2:
                    img = TF.adjust_saturation(img, factors[2])
                else:
                    img = TF.adjust_hue(img, factors[3])
                img = _to_8_bits(img)
        if _uniform(gen, 0, 1) < 0.2:
            img = _to_8_bits(TF.rgb_to_grayscale(img, num_output_channels=3))
        if _uniform(gen, 0, 1) < 0.5:
            sigma = _uniform(gen, 0.1, 2.0)
            size = min(2 * math.ceil(3 * sigma) + 1, 2 * (min(img.shape[-2:]) // 2) - 1)
            img = _to_8_bits(TF.gaussian_blur(img, [size, size], [sigma, sigma])) if size > 1 else img
        if _uniform(gen, 0, 1) < 0.5:
            img = img.flip(-1)
        out.append(img)
    return torch.stack(out)


def weak_view(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each image flipped horizontally with probability 0.5."""
    flip = (torch.rand(len(x), generator=gen) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def knn_pseudo_labels(features: torch.Tensor, bank_features: torch.Tensor, bank_probs: torch.Tensor,
                      k: int) -> torch.Tensor:
    """The argmax of the mean bank probabilities of the ``k`` bank features nearest (cosine) to each feature."""
    sim = F.normalize(features, dim=1) @ F.normalize(bank_features, dim=1).T
    idx = (1 - sim).sort(dim=1).indices[:, :k]
    return bank_probs[idx].mean(1).argmax(1)


def instance_loss(logits_ins: torch.Tensor, pseudo_labels: torch.Tensor, queue_labels: torch.Tensor) -> torch.Tensor:
    """InfoNCE with the positive in column 0; queue columns whose label equals the pseudo-label are left out."""
    mask = torch.ones_like(logits_ins, dtype=torch.bool)
    mask[:, 1:] = pseudo_labels[:, None] != queue_labels[None, :]
    logits_ins = logits_ins.masked_fill(~mask, float("-inf"))
    return F.cross_entropy(logits_ins, torch.zeros(len(logits_ins), dtype=torch.long, device=logits_ins.device))


def diversity_loss(logits: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Minus the entropy of the batch's mean prediction."""
    mean = logits.softmax(1).mean(0)
    return (mean * torch.log(mean + eps)).sum()


@register("adacontrast")
class AdaContrast(AdaptedModel):
    """MoCo contrast with a key encoder and queue, plus cross-entropy on nearest-neighbour refined pseudo-labels."""

    Config = AdaContrastConfig
    update = "gradient"
    requires = Requirements(classifier=True)
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        # The reference benchmark's ImageNet-C settings (ResNet-50, batch 64).
        "imagenet": {**IMAGENET_SGD, "lr": 2e-4, "weight_decay": 1e-4}}

    def configure(self, model: nn.Module) -> nn.Module:
        model.train()
        model.requires_grad_(True)
        return model

    def setup(self) -> None:
        cfg = self.config
        self.key_model = copy.deepcopy(self.model).requires_grad_(False)
        self.split = FeatureSplit(self.model)
        self.key_split = FeatureSplit(self.key_model)
        assert self.num_classes is not None  # required, checked before setup
        like = next(self.model.parameters())
        dim = self.split.classifier.in_features
        self.add_state("rng", new_rng_state())
        with generator_from(self.rng) as gen:
            queue = F.normalize(torch.randn(dim, cfg.queue_size, generator=gen), dim=0)
            queue_labels = torch.randint(0, self.num_classes, (cfg.queue_size,), generator=gen)
        self.add_state("queue", queue.to(like))
        self.add_state("queue_labels", queue_labels.to(like.device))
        self.add_state("queue_ptr", 0)
        self.add_state("bank_features", torch.zeros(0, dim).to(like), dynamic=True)
        self.add_state("bank_probs", torch.zeros(0, self.num_classes).to(like), dynamic=True)
        self.add_state("bank_ptr", 0)
        self.add_state("seen", 0)
        self._views: torch.Tensor | None = None

    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        cfg = self.config
        self.model.train()
        self.key_model.train()
        with generator_from(self.rng) as gen:
            x_w = weak_view(x, gen)
            x_q, x_k = strong_view(x, gen), strong_view(x, gen)
        self._views = x_w
        feats_w, logits_w = self.split(x_w)
        with torch.no_grad():
            if self.seen >= cfg.warmup_samples and len(self.bank_features):
                pseudo = knn_pseudo_labels(feats_w, self.bank_features, self.bank_probs, cfg.num_neighbors)
            else:
                pseudo = logits_w.argmax(1)
                self.seen += len(x)
        feats_q, logits_q = self.split(x_q)
        q = F.normalize(feats_q, dim=1)
        with torch.no_grad():
            ema_update(self.key_model, self.model, cfg.key_momentum)
            keys = F.normalize(self.key_split(x_k)[0], dim=1)
        logits_ins = torch.cat([(q * keys).sum(1, keepdim=True), q @ self.queue.clone()], dim=1) / cfg.temperature
        with torch.no_grad():
            idx = (torch.arange(len(keys), device=keys.device) + self.queue_ptr) % cfg.queue_size
            self.queue[:, idx] = keys.T.to(self.queue.dtype)
            self.queue_labels[idx] = pseudo
            self.queue_ptr = (self.queue_ptr + len(keys)) % cfg.queue_size
        contrast = instance_loss(logits_ins, pseudo, self.queue_labels)
        ce = F.cross_entropy(logits_q, pseudo)
        div = diversity_loss(logits_q)
        loss = cfg.alpha * ce + cfg.beta * contrast + cfg.eta * div
        return StepOutput(logits_w.detach(), loss, diagnostics={
            "cross_entropy": ce.detach(), "contrastive": contrast.detach(), "diversity": div.detach()})

    def after_step(self, x: torch.Tensor, domain: torch.Tensor | None, out: StepOutput) -> StepOutput:
        cfg = self.config
        with torch.no_grad():
            if self._views is not None:
                self.key_model.train()
                feats, logits = self.key_split(self._views)
                self._views = None
                self._bank_add(feats, logits.softmax(1), cfg.queue_size)
            logits = self.predict(x, domain)
        return StepOutput(logits, out.loss, diagnostics=out.diagnostics)

    def _bank_add(self, feats: torch.Tensor, probs: torch.Tensor, size: int) -> None:
        """Append to the bank until it holds ``size`` entries or more, then overwrite from the pointer (the end of the
        last write modulo the bank's length, as the reference)."""
        start = self.bank_ptr
        if len(self.bank_features) < size:
            self.bank_features = torch.cat([self.bank_features, feats.to(self.bank_features)])
            self.bank_probs = torch.cat([self.bank_probs, probs.to(self.bank_probs)])
        else:
            idx = torch.arange(start, start + len(feats), device=feats.device) % len(self.bank_features)
            self.bank_features[idx] = feats.to(self.bank_features)
            self.bank_probs[idx] = probs.to(self.bank_probs)
        self.bank_ptr = (start + len(feats)) % len(self.bank_features)

    def predict(self, x: torch.Tensor, domain: torch.Tensor | None) -> torch.Tensor:
        was = self.model.training
        self.model.eval()
        try:
            return self.model(x)
        finally:
            self.model.train(was)
