"""MEMO: per image, 32 AugMix views, one Adam step on every parameter (marginal entropy), BN-alpha 0.1, predict the
image with the updated model, restore the source weights."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from tta.core.augmix import augmix_views


class AlphaBN(nn.Module):
    """0.9 source + 0.1 current-batch statistics (unbiased variance, no gradient through them)."""

    def __init__(self, bn: nn.BatchNorm2d, alpha: float = 0.1) -> None:
        super().__init__()
        self.bn, self.alpha = bn, alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), correction=1)
        a, bn = self.alpha, self.bn
        return F.batch_norm(x, (1 - a) * bn.running_mean + a * mean, (1 - a) * bn.running_var + a * var,
                            bn.weight, bn.bias, False, 0.0, bn.eps)


def _swap(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, AlphaBN(child))
        else:
            _swap(child)


def make(model: nn.Module, device: torch.device, source: object = None):
    model.eval()
    _swap(model)
    model.requires_grad_(True)
    initial = copy.deepcopy(model.state_dict())
    generator = torch.Generator().manual_seed(0)

    def step(x: torch.Tensor) -> torch.Tensor:
        out = []
        for image in x.split(1):
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
            with torch.enable_grad():
                logits = model(augmix_views(image, 32, generator))
                log_mean = logits.log_softmax(1).logsumexp(0) - torch.log(torch.tensor(32.0))
                loss = -(log_mean.exp() * log_mean).sum()
                loss.backward()
            optimizer.step()
            with torch.no_grad():
                out.append(model(image))
            model.load_state_dict(initial)
        return torch.cat(out)

    return step
