"""SHOT-IM: batch statistics, SGD 0.01 (momentum 0.9) on the BN affine, one information maximisation step per batch."""

import torch
from torch import nn

from hand_loops.tent import bn_affine_on_batch_statistics


def make(model: nn.Module, device: torch.device, source: object = None):
    model.eval()
    params = bn_affine_on_batch_statistics(model)
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def step(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            logits = model(x)
            p = logits.softmax(1)
            mean = p.mean(0)
            loss = -(p * torch.log(p + 1e-5)).sum(1).mean() + (mean * torch.log(mean + 1e-5)).sum()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return logits.detach()

    return step
