"""PeTTA: RoTTA's robust BN, category-balanced memory of 64 images and mean teacher, one update on the memory per
batch: symmetric cross-entropy against the teacher, a cosine regulariser towards the source parameters weighted by
10 * the divergence of the teacher's class-mean features from the source's, and an anchor loss; the teacher moves at
rate 0.001 * (1 - divergence)."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from hand_loops.rotta import BalancedMemory
from tta.core.augment import tta_augment
from tta.norm.convert import replace_batchnorms
from tta.norm.robust_bn import RobustBN

CLASSES = 10


def soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -(target.softmax(1) * logits.log_softmax(1)).sum(1)


def make(model: nn.Module, device: torch.device, source: tuple | None = None):
    replace_batchnorms(model, lambda bn: RobustBN(bn, 0.05))
    model.requires_grad_(False)
    params = [p for m in model.modules() if isinstance(m, RobustBN) for p in (m.weight, m.bias)]
    for p in params:
        p.requires_grad_(True)
    sources = [p.detach().clone() for p in params]
    teacher = copy.deepcopy(model).requires_grad_(False)
    anchor = copy.deepcopy(model).requires_grad_(False)
    teacher_params = [p for m in teacher.modules() if isinstance(m, RobustBN) for p in (m.weight, m.bias)]
    optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))
    seen_features: dict = {}
    for net in (model, teacher):
        head = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
        head.register_forward_hook(lambda _m, inputs, _out: seen_features.__setitem__("f", inputs[0]))

    # Source statistics: per class the source model predicts, mean and variance of the features.
    model.eval()
    feats, preds = [], []
    with torch.no_grad():
        for i in range(0, len(source[0]), 256):
            preds.append(model(source[0][i:i + 256].to(device)).argmax(1).cpu())
            feats.append(seen_features["f"].double().cpu())
    f, pred = torch.cat(feats), torch.cat(preds)
    mean, var = f.mean(0).repeat(CLASSES, 1), f.var(0).repeat(CLASSES, 1)
    for c in range(CLASSES):
        if int((pred == c).sum()) >= 2:
            mean[c], var[c] = f[pred == c].mean(0), f[pred == c].var(0)
    mean, var = mean.float().to(device), var.float().to(device)
    prototypes = mean.clone()
    memory = BalancedMemory()

    def step(x: torch.Tensor) -> torch.Tensor:
        model.eval()
        teacher.eval()
        with torch.no_grad():
            logits = teacher(x)
            labels = logits.argmax(1)
            classes = labels.unique()
            d = 1 - torch.exp(-((prototypes[classes] - mean[classes]).pow(2) / (var[classes] + 1e-6)).mean())
            for c in classes:
                prototypes[c] = 0.95 * prototypes[c] + 0.05 * seen_features["f"][labels == c].mean(0)
            p = logits.softmax(1)
            entropy = -(p * torch.log(p + 1e-6)).sum(1)
        for i, (label, ent) in enumerate(zip(labels.tolist(), entropy.tolist(), strict=True)):
            memory.add(x[i], label, ent)
        data = torch.stack([item[0] for item in memory.items()])
        for net in (teacher, model, anchor):
            net.train()
        with torch.enable_grad():
            with torch.no_grad():
                target = teacher(data)
            plain = model(data)
            with torch.no_grad():
                anchored = anchor(data)
            strong = model(tta_augment(data))
            self_training = 0.5 * (0.5 * (soft_ce(plain, target) + soft_ce(target, plain))
                                   + 0.5 * (soft_ce(strong, target) + soft_ce(target, strong))).mean()
            regularizer = torch.stack([-F.cosine_similarity(p.reshape(1, -1), s.reshape(1, -1)).mean()
                                       for p, s in zip(params, sources, strict=True)]).mean()
            loss = self_training + 10.0 * d * regularizer + soft_ce(strong, anchored).mean()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        rate = float(0.001 * (1 - d))
        with torch.no_grad():
            torch._foreach_mul_(teacher_params, 1 - rate)
            torch._foreach_add_(teacher_params, params, alpha=rate)
        return logits

    return step
