"""RoTTA: robust BN, a category-balanced memory of 64 images, an update on it every 64 images, EMA teacher."""

import copy
import math

import torch
from torch import nn

from tta.core.augment import tta_augment
from tta.norm.convert import replace_batchnorms
from tta.norm.robust_bn import RobustBN

CAP, EVERY, CLASSES = 64, 64, 10


class BalancedMemory:
    """RoTTA's category-balanced memory of CAP images, per class a list of [image, entropy, birth]; ``seen`` counts
    the images offered. A new image joins while its class holds less than its share and there is room; otherwise it
    replaces the item of highest score (timeliness of its age plus normalised entropy) of its class, or of the
    fullest classes, when it scores lower itself."""

    def __init__(self) -> None:
        self.classes: list[list] = [[] for _ in range(CLASSES)]
        self.seen = 0

    def items(self) -> list[list]:
        return [item for c in self.classes for item in c]

    def add(self, image: torch.Tensor, label: int, entropy: float) -> None:
        self._insert(image, label, entropy)
        self.seen += 1

    def _insert(self, image: torch.Tensor, label: int, entropy: float) -> None:
        counts = [len(c) for c in self.classes]
        if counts[label] < CAP / CLASSES:
            if sum(counts) < CAP:
                self.classes[label].append([image, entropy, self.seen])
                return
            candidates = [c for c, n in enumerate(counts) if n == max(counts)]
        else:
            candidates = [label]
        best = max((_score(self.seen - item[2], item[1]), c, i) for c in candidates
                   for i, item in enumerate(self.classes[c]))
        if best[0] > _score(0, entropy):
            self.classes[best[1]].pop(best[2])
            self.classes[label].append([image, entropy, self.seen])


def _score(age: int, entropy: float) -> float:
    return 1 / (1 + math.exp(-age / CAP)) + entropy / math.log(CLASSES)


def make(model: nn.Module, device: torch.device, source: object = None):
    replace_batchnorms(model, lambda bn: RobustBN(bn, 0.05))
    model.requires_grad_(False)
    params = [p for m in model.modules() if isinstance(m, RobustBN) for p in (m.weight, m.bias)]
    for p in params:
        p.requires_grad_(True)
    teacher = copy.deepcopy(model).requires_grad_(False)
    teacher_params = [p for m in teacher.modules() if isinstance(m, RobustBN) for p in (m.weight, m.bias)]
    optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))
    memory = BalancedMemory()

    def update() -> None:
        items = memory.items()
        data = torch.stack([item[0] for item in items])
        weight = torch.sigmoid(-torch.tensor([(memory.seen - item[2]) / CAP for item in items], device=device))
        model.train()
        teacher.train()
        strong = tta_augment(data)
        with torch.no_grad():
            target = teacher(data)
        with torch.enable_grad():
            loss = (-(target.softmax(1) * model(strong).log_softmax(1)).sum(1) * weight).mean()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_mul_(teacher_params, 0.999)
            torch._foreach_add_(teacher_params, params, alpha=0.001)

    def step(x: torch.Tensor) -> torch.Tensor:
        model.eval()
        teacher.eval()
        with torch.no_grad():
            logits = teacher(x)
            p = logits.softmax(1)
            entropy = -(p * torch.log(p + 1e-6)).sum(1)
        for i, (label, ent) in enumerate(zip(p.argmax(1).tolist(), entropy.tolist(), strict=True)):
            memory.add(x[i], label, ent)
            if memory.seen % EVERY == 0:
                update()
        return logits

    return step
