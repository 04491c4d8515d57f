"""TRIBE: balanced BN (tta.norm.balanced_bn), Adam 1e-3 on its affine; a teacher sharing the student's parameters
with its own statistics, a frozen anchor; cross-entropy on confident images plus the teacher-anchor squared gap."""

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from tta.core.augment import tta_augment
from tta.norm.balanced_bn import BalancedBN, class_labels
from tta.norm.convert import replace_batchnorms

CLASSES = 10


def make(model: nn.Module, device: torch.device, source: object = None, eta: float = 0.01, gamma: float = 0.0,
         h0: float = 0.05, lambda_anchor: float = 0.5):
    replace_batchnorms(model, lambda bn: BalancedBN(bn, CLASSES, eta, gamma))
    model.requires_grad_(False)
    params = [p for m in model.modules() if isinstance(m, BalancedBN) for p in (m.weight, m.bias)]
    for p in params:
        p.requires_grad_(True)
    anchor = copy.deepcopy(model).requires_grad_(False)
    teacher = copy.deepcopy(model)
    for mine, theirs in zip(teacher.modules(), model.modules(), strict=True):
        for name, p in theirs.named_parameters(recurse=False):
            setattr(mine, name, p)
    optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))
    threshold = h0 * math.log(CLASSES)

    def step(x: torch.Tensor) -> torch.Tensor:
        teacher.eval()
        with torch.no_grad():
            logits = teacher(x)
        labels = logits.argmax(1)
        strong = tta_augment(x)
        for net in (teacher, model, anchor):
            net.train()
        with torch.enable_grad():
            with class_labels(teacher, labels):
                t = teacher(x)
            with class_labels(model, labels):
                s = model(strong)
            with torch.no_grad(), class_labels(anchor, labels):
                a = anchor(x)
            confident = -(t.softmax(1) * t.log_softmax(1)).sum(1) < threshold
            n = confident.sum().clamp(min=1).to(t.dtype)
            loss = ((F.cross_entropy(s, t.argmax(1), reduction="none") * confident).sum() / n
                    + lambda_anchor * (F.mse_loss(t, a, reduction="none").mean(1) * confident).sum() / n)
            loss.backward()
        for net in (teacher, model, anchor):
            net.eval()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return logits

    return step
