"""LAME: eval-mode model, RBF affinity (k = 5) on normalised penultimate features, Laplacian iteration."""

import torch
import torch.nn.functional as F
from torch import nn


def make(model: nn.Module, device: torch.device, source: object = None):
    model.eval()
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    captured = {}
    head.register_forward_hook(lambda _, inputs, __: captured.__setitem__("f", inputs[0]))

    @torch.no_grad()
    def step(x: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        log_p = torch.log(logits.softmax(1) + 1e-10)
        f = F.normalize(captured["f"], dim=1)
        dist = torch.cdist(f, f, compute_mode="donot_use_mm_for_euclid_dist")
        sigma = dist.topk(min(5, len(f)), dim=1, largest=False).values[:, -1].mean()
        kernel = torch.exp(-dist.square() / (2 * sigma.square()))
        y, old = log_p.softmax(1), float("inf")
        for i in range(100):
            pairwise = kernel @ y
            y = (log_p + pairwise).softmax(1)
            energy = (-log_p * y - pairwise * y + y * y.clamp_min(1e-20).log()).sum().item()
            if i > 1 and abs(energy - old) <= 1e-8 * abs(old):
                break
            old = energy
        return y.clamp_min(1e-30).log()

    return step
