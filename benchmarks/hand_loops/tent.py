"""Tent: batch statistics, Adam 1e-3 on the BN affine parameters, one entropy step per batch."""

import torch
from torch import nn


def bn_affine_on_batch_statistics(model: nn.Module) -> list[nn.Parameter]:
    """BatchNorm on batch statistics, only its affine parameters trainable (returned); the mode is the caller's."""
    model.requires_grad_(False)
    params = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
            m.weight.requires_grad_(True)
            m.bias.requires_grad_(True)
            params += [m.weight, m.bias]
    return params


def make(model: nn.Module, device: torch.device, source: object = None):
    model.train()
    params = bn_affine_on_batch_statistics(model)
    optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))

    def step(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            logits = model(x)
            loss = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return logits.detach()

    return step
