"""RoTTA: robust BN, a category-balanced memory of 64 images, an update on it every 64 images, EMA teacher."""

import copy
import math

import torch
from torch import nn

from tta.core.augment import tta_augment
from tta.norm.convert import replace_batchnorms
from tta.norm.robust_bn import RobustBN

CAP, EVERY, CLASSES = 64, 64, 10


def make(model: nn.Module, device: torch.device, source: object = None):
    replace_batchnorms(model, lambda bn: RobustBN(bn, 0.05))
    model.requires_grad_(False)
    params = [p for m in model.modules() if isinstance(m, RobustBN) for p in (m.weight, m.bias)]
    for p in params:
        p.requires_grad_(True)
    teacher = copy.deepcopy(model).requires_grad_(False)
    teacher_params = [p for m in teacher.modules() if isinstance(m, RobustBN) for p in (m.weight, m.bias)]
    optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))
    memory: list[list] = [[] for _ in range(CLASSES)]  # per class: [image, entropy, birth]
    seen = [0]

    def score(age: int, entropy: float) -> float:
        return 1 / (1 + math.exp(-age / CAP)) + entropy / math.log(CLASSES)

    def add(image: torch.Tensor, label: int, entropy: float) -> None:
        counts = [len(c) for c in memory]
        if counts[label] < CAP / CLASSES:
            if sum(counts) < CAP:
                memory[label].append([image, entropy, seen[0]])
                return
            classes = [c for c, n in enumerate(counts) if n == max(counts)]
        else:
            classes = [label]
        best = max((score(seen[0] - item[2], item[1]), c, i) for c in classes for i, item in enumerate(memory[c]))
        if best[0] > score(0, entropy):
            memory[best[1]].pop(best[2])
            memory[label].append([image, entropy, seen[0]])

    def update() -> None:
        items = [item for c in memory for item in c]
        data = torch.stack([item[0] for item in items])
        weight = torch.sigmoid(-torch.tensor([(seen[0] - item[2]) / CAP for item in items], device=device))
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
            add(x[i], label, ent)
            seen[0] += 1
            if seen[0] % EVERY == 0:
                update()
        return logits

    return step
