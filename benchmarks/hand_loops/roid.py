"""ROID: batch statistics, Adam 1e-3 on the BN affine parameters; weighted SLR + consistency with a colour/affine
view, weight ensembling with the source parameters (0.99) and prior correction of the returned logits."""

import torch
import torch.nn.functional as F
from torch import nn

from hand_loops.tent import bn_affine_on_batch_statistics
from tta.core.views import color_affine_view


def make(model: nn.Module, device: torch.device, source: object = None):
    model.eval()
    params = bn_affine_on_batch_statistics(model)
    source_params = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(0)
    state = {"ema": None}

    def step(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        with torch.enable_grad():
            logits = model(x)
            with torch.no_grad():
                probs = logits.softmax(1)
                if state["ema"] is None:
                    state["ema"] = torch.full_like(probs[0], 1 / probs.shape[1])
                div = 1 - F.cosine_similarity(state["ema"].unsqueeze(0), probs, dim=1)
                div = (div - div.min()) / (div.max() - div.min())
                keep = div >= div.mean()
                cert = (probs * logits.log_softmax(1)).sum(1)
                cert = (cert - cert.min()) / (cert.max() - cert.min())
                weights = torch.exp(div * cert * 3)
                state["ema"] = 0.9 * state["ema"] + 0.1 * probs.mean(0)
            p = logits.softmax(1).clamp(max=0.99)
            slr = -(p * torch.log(p / (1 - p) + 1e-5)).sum(1)
            loss = (slr * weights)[keep].sum() / n
            aug = model(color_affine_view(x[keep], gen))
            kept = logits[keep]
            sce = -0.5 * ((kept.softmax(1) * aug.log_softmax(1)).sum(1) + (aug.softmax(1) * kept.log_softmax(1)).sum(1))
            loss = loss + (sce * weights[keep]).sum() / n
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_mul_(params, 0.99)
            torch._foreach_add_(params, source_params, alpha=0.01)
            out = logits.detach()
            prior = probs.mean(0)
            smooth = max(1 / n, 1 / out.shape[1]) / prior.max()
            return out * (prior + smooth) / (1 + smooth * out.shape[1])

    return step
