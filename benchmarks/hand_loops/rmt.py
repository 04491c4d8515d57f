"""RMT: student (every weight and bias, batch statistics) and EMA teacher (0.999), Adam 1e-3, after a warm-up of
``warmup_samples // 200`` steps on source batches; per batch symmetric cross-entropy to the teacher on the image and
a CoTTA augmentation, SANTA's prototype contrast and cross-entropy on the next source batch; predicts student +
teacher logits."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from hand_loops.santa import contrast, features_hook, nearest, prototypes
from tta.core.augment import tta_augment

_WARM: dict = {}  # the warmed-up student, teacher and optimizer, computed once per process (the engine caches too)


def sce(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((teacher.softmax(1) * student.log_softmax(1)).sum(1)
                   + (student.softmax(1) * teacher.log_softmax(1)).sum(1))


def every_weight_with_batch_statistics(model: nn.Module) -> list[nn.Parameter]:
    """Eval mode, BatchNorm on batch statistics, every weight and bias trainable (returned)."""
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    model.requires_grad_(False)
    params = [p for m in model.modules() for name, p in m.named_parameters(recurse=False) if name in ("weight", "bias")]
    for p in params:
        p.requires_grad_(True)
    return params


def make(model: nn.Module, device: torch.device, source: tuple | None = None, warmup_samples: int = 50000):
    params = every_weight_with_batch_statistics(model)
    teacher = copy.deepcopy(model).requires_grad_(False)
    seen = features_hook(model)
    protos = prototypes(model, seen, source, 10)
    projector = nn.Sequential(nn.Linear(protos.shape[1], 128), nn.ReLU(), nn.Linear(128, 128)).to(device)
    optimizer = torch.optim.Adam(params + list(projector.parameters()), lr=1e-3, betas=(0.9, 0.999))
    images, labels = source[0].to(device), source[1].to(device)
    cursor = {"i": 0}

    def source_batch() -> tuple[torch.Tensor, torch.Tensor]:
        epoch, k = divmod(cursor["i"], len(images) // 200)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1 + epoch))[k * 200:(k + 1) * 200]
        cursor["i"] += 1
        return images[order.to(device)], labels[order.to(device)]

    def ema() -> None:
        with torch.no_grad():
            torch._foreach_mul_(list(teacher.parameters()), 0.999)
            torch._foreach_add_(list(teacher.parameters()), list(model.parameters()), alpha=0.001)

    steps = warmup_samples // 200
    key = (len(images), float(params[0].detach().sum()), steps)
    if key not in _WARM:
        with torch.enable_grad():
            for i in range(steps):
                for group in optimizer.param_groups:
                    group["lr"] = 1e-3 * (i + 1) / steps
                xs, _ = source_batch()
                sce(model(xs), teacher(xs)).mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                ema()
        for group in optimizer.param_groups:
            group["lr"] = 1e-3
        _WARM[key] = copy.deepcopy((model.state_dict(), teacher.state_dict(), optimizer.state_dict()))
    state = _WARM[key]
    model.load_state_dict(state[0])
    teacher.load_state_dict(state[1])
    optimizer.load_state_dict(state[2])
    cursor["i"] = steps

    def step(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            logits = model(x)
            features = seen["f"]
            logits_aug = model(tta_augment(x))
            features_aug = seen["f"]
            with torch.no_grad():
                teacher_logits = teacher(x)
            loss = 0.5 * (sce(logits, teacher_logits) + sce(logits_aug, teacher_logits)).mean()
            views = torch.stack([nearest(features, protos), features, features_aug], dim=1)
            loss = loss + contrast(views, projector)
            xs, ys = source_batch()
            loss = loss + F.cross_entropy(model(xs), ys)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema()
        return (logits + teacher_logits).detach()

    return step
