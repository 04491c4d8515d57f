"""RPL: batch statistics, Adam 1e-3 on the BN affine, one generalised cross-entropy (q 0.8) step per batch."""

import torch
from torch import nn


def make(model: nn.Module, device: torch.device, source: object = None):
    model.eval()
    model.requires_grad_(False)
    params = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
            m.weight.requires_grad_(True)
            m.bias.requires_grad_(True)
            params += [m.weight, m.bias]
    optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))

    def step(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            logits = model(x)
            p = logits.softmax(1).amax(1)
            loss = ((1 - p ** 0.8) / 0.8).mean()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return logits.detach()

    return step
