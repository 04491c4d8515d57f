"""UnMix-TNS alone: every BatchNorm2d becomes 16 statistics components mixed per image; nothing trains."""

import math

import torch
import torch.nn.functional as F
from torch import nn


class Layer(nn.Module):
    def __init__(self, bn: nn.BatchNorm2d, g: torch.Generator, k: int = 16, spread: float = 0.5) -> None:
        super().__init__()
        mean, var = bn.running_mean.clone(), bn.running_var.clone()
        z = torch.randn((k, mean.numel()), generator=g).to(mean.device)
        self.means = mean + math.sqrt(spread * k / (k - 1)) * var.sqrt() * z
        self.vars = ((1 - spread) * var).repeat(k, 1)
        self.weight, self.bias, self.eps, self.k = bn.weight, bn.bias, bn.eps, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, a = torch.var_mean(x, dim=(2, 3), unbiased=False)
        p = torch.softmax(F.normalize(a, dim=1) @ F.normalize(self.means, dim=1).T / 0.07, dim=1)
        q = 1 - p
        mu = (q @ self.means + a) / self.k
        var = (q @ self.vars + s + q.square() @ self.means.square() + 2 * a * ((p * q) @ self.means)
               + a.square() * p.square().sum(1, keepdim=True)) / self.k - mu.square()
        rate = (1 - 0.9 ** (x.shape[0] / 64)) / x.shape[0]
        w = p.sum(0).unsqueeze(1)
        self.means += rate * (p.T @ a - w * self.means)
        self.vars += rate * (p.T @ s - w * self.vars)
        scale = self.weight / torch.sqrt(var + self.eps)
        return x * scale[:, :, None, None] + (self.bias - mu * scale)[:, :, None, None]


def make(model: nn.Module, device: torch.device, source: object = None):
    model.eval()
    g = torch.Generator().manual_seed(0)
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.BatchNorm2d):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, Layer(m, g))

    @torch.no_grad()
    def step(x: torch.Tensor) -> torch.Tensor:
        return model(x)

    return step
