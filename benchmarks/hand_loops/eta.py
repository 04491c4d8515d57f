"""ETA: batch statistics in eval mode, Adam 1e-3 on the BN affine parameters, entropy of the reliable and
non-redundant samples weighted by 1/exp(H - E0), no step when nothing is selected."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from hand_loops.tent import bn_affine_on_batch_statistics


def make(model: nn.Module, device: torch.device, source: object = None, fisher_alpha: float = 0.0):
    model.eval()
    params = bn_affine_on_batch_statistics(model)
    optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))
    e0, state = 0.4 * math.log(10), {"probs": None}
    penalty = _fisher_penalty(model, params, source, fisher_alpha) if fisher_alpha > 0 else None

    def step(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            logits = model(x)
            ent = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
            ids = torch.where(ent < e0)[0]
            ent, probs = ent[ids], logits[ids].softmax(1)
            if state["probs"] is not None:
                keep = torch.where(F.cosine_similarity(state["probs"][None], probs, dim=1).abs() < 0.4)[0]
                ent, probs = ent[keep], probs[keep]
            if len(probs):
                mean = probs.detach().mean(0)
                state["probs"] = mean if state["probs"] is None else 0.9 * state["probs"] + 0.1 * mean
            if len(ent):
                loss = (ent * torch.exp(e0 - ent.detach())).mean()
                if penalty is not None:
                    loss = loss + penalty()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return logits.detach()

    return step


def _fisher_penalty(model: nn.Module, params: list, source: tuple, alpha: float):
    images = source[0][:2000]
    fisher = [torch.zeros_like(p) for p in params]
    batches = images.split(200)
    for xb in batches:
        logits = model(xb.to(params[0].device))
        grads = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(1)), params)
        for f, g in zip(fisher, grads, strict=True):
            f += g ** 2
    fisher = torch.cat([f.reshape(-1) for f in fisher]) / len(batches)
    anchor = torch.cat([p.detach().reshape(-1) for p in params])
    return lambda: alpha * (fisher * (torch.cat([p.reshape(-1) for p in params]) - anchor) ** 2).sum()
