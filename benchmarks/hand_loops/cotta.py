"""CoTTA: student with batch statistics, EMA teacher averaged over 32 augmentations, stochastic restore."""

import copy

import torch
from torch import nn

from tta.core.augment import tta_augment


def make(model: nn.Module, device: torch.device, source: object = None):
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    model.requires_grad_(True)
    teacher = copy.deepcopy(model).requires_grad_(False)
    anchor = copy.deepcopy(model).requires_grad_(False)
    params, teacher_params = list(model.parameters()), list(teacher.parameters())
    source_params = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))

    def step(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            logits = model(x)
            with torch.no_grad():
                if anchor(x).softmax(1).amax(1).mean() < 0.92:
                    target = torch.stack([teacher(tta_augment(x)) for _ in range(32)]).mean(0)
                else:
                    target = teacher(x)
            loss = -(target.softmax(1) * logits.log_softmax(1)).sum(1).mean()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_mul_(teacher_params, 0.999)
            torch._foreach_add_(teacher_params, params, alpha=0.001)
            for p, s in zip(params, source_params, strict=True):
                p.copy_(torch.where(torch.rand(p.shape, device=p.device) < 0.01, s, p))
        return target

    return step
