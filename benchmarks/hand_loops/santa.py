"""SANTA: batch statistics, Adam 1e-3 on the BN affine and a projector; source-anchored self-training on the image
and a CoTTA augmentation of it, plus instance contrast of (nearest source prototype, features, augmented features)."""

import copy
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from hand_loops.tent import bn_affine_on_batch_statistics
from tta.core.augment import tta_augment


def features_hook(model: nn.Module) -> dict:
    """Records the input of the model's last linear layer (the features) on every forward."""
    seen: dict = {}
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    head.register_forward_hook(lambda _m, inputs, _out: seen.__setitem__("f", inputs[0]))
    return seen


def prototypes(model: nn.Module, seen: dict, source: tuple, classes: int) -> torch.Tensor:
    """The mean features of each class of the source images, in batches of 200 shuffled with seed 0."""
    images, labels = source
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    bounds = [*range(0, len(images), 200), len(images)]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 2:
        del bounds[-2]
    device = next(model.parameters()).device
    feats = []
    with torch.no_grad():
        for a, b in itertools.pairwise(bounds):
            model(images[a:b].to(device))
            feats.append(seen["f"].cpu())
    feats = torch.cat(feats)
    return torch.stack([feats[labels == c].mean(0) for c in range(classes)]).to(device)


def contrast(views: torch.Tensor, projector: nn.Module) -> torch.Tensor:
    """Supervised contrast of the 3 views (N, 3, D) of each instance, temperature 0.1."""
    n, v, _ = views.shape
    z = F.normalize(projector(views.transpose(0, 1).reshape(n * v, -1)), dim=1)
    sim = z @ z.T / 0.1
    sim = sim - sim.max(1, keepdim=True).values.detach()
    not_self = ~torch.eye(n * v, dtype=torch.bool, device=z.device)
    instance = torch.arange(n, device=z.device).repeat(v)
    positive = (instance[:, None] == instance[None, :]) & not_self
    log_prob = sim - torch.log((sim.exp() * not_self).sum(1, keepdim=True))
    return -((log_prob * positive).sum(1) / positive.sum(1)).mean()


def nearest(features: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return protos[F.cosine_similarity(protos[:, None], features[None], dim=-1).argmax(0)]


def make(model: nn.Module, device: torch.device, source: tuple | None = None):
    model.eval()
    params = bn_affine_on_batch_statistics(model)
    anchor = copy.deepcopy(model).requires_grad_(False)
    seen = features_hook(model)
    protos = prototypes(model, seen, source, 10)
    projector = nn.Sequential(nn.Linear(protos.shape[1], 128), nn.ReLU(), nn.Linear(128, 128)).to(device)
    optimizer = torch.optim.Adam(params + list(projector.parameters()), lr=1e-3, betas=(0.9, 0.999))

    def step(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            logits = model(x)
            features = seen["f"]
            logits_aug = model(tta_augment(x))
            features_aug = seen["f"]
            with torch.no_grad():
                anchor_log_probs = anchor(x).log_softmax(1)
            weights = 0.5 * logits.softmax(1) + 0.5 * logits_aug.softmax(1)
            loss = -(weights * anchor_log_probs).sum(1).mean()
            views = torch.stack([nearest(features, protos), features, features_aug], dim=1)
            loss = loss + contrast(views, projector)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return logits.detach()

    return step
