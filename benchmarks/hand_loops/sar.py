"""SAR: batch statistics in eval mode, SGD (lr 1e-3, momentum 0.9) inside SAM (rho 0.05) on the BN affine
parameters outside layer4, entropy of the reliable samples filtered again at the perturbed weights, and a reset
when the EMA of the second loss falls below 0.2."""

import copy
import math

import torch
from torch import nn


def make(model: nn.Module, device: torch.device, source: object = None):
    pristine = copy.deepcopy(model)
    e0 = 0.4 * math.log(10)

    def build(net: nn.Module) -> dict:
        net.eval()
        net.requires_grad_(False)
        params = []
        for name, m in net.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                m.track_running_stats, m.running_mean, m.running_var = False, None, None
                if "layer4" not in name:
                    m.weight.requires_grad_(True)
                    m.bias.requires_grad_(True)
                    params += [m.weight, m.bias]
        return {"net": net, "params": params, "ema": None,
                "optimizer": torch.optim.SGD(params, lr=1e-3, momentum=0.9)}

    state = build(model)

    def entropy(logits: torch.Tensor) -> torch.Tensor:
        return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)

    def step(x: torch.Tensor) -> torch.Tensor:
        net, params, optimizer = state["net"], state["params"], state["optimizer"]
        with torch.enable_grad():
            logits = net(x)
            ids = torch.where(entropy(logits) < e0)[0]
            if len(ids) == 0:
                return logits.detach()
            entropy(logits)[ids].mean().backward()
            with torch.no_grad():
                norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in params])))
                old = [p.detach().clone() for p in params]
                for p in params:
                    p.add_(p.grad * (0.05 / (norm + 1e-12)))
            optimizer.zero_grad(set_to_none=True)
            ent2 = entropy(net(x))[ids]
            loss2 = ent2[ent2 < e0].mean()
            loss2.backward()
            with torch.no_grad():
                for p, o in zip(params, old, strict=True):
                    p.copy_(o)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        value = loss2.item()
        if not math.isnan(value):
            state["ema"] = value if state["ema"] is None else 0.9 * state["ema"] + 0.1 * value
        if state["ema"] is not None and state["ema"] < 0.2:
            state.update(build(copy.deepcopy(pristine)))
        return logits.detach()

    return step
