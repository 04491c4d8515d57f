"""CMF: ROID's step (batch statistics, Adam 1e-3 on the BN affine, weighted SLR + consistency with a colour/affine
view), then one Kalman step of a hidden model between source and adapted weights fused into the weights (0.99),
and prior correction of the returned logits."""

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
    state = {"ema": None, "var": 0.0}
    hidden = [p.detach().clone() for p in params]
    q = 0.005 * sum(p.numel() for p in params) / 38400

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
            for h, s in zip(hidden, source_params, strict=True):
                h.mul_(0.99).add_(s, alpha=0.01)
            var = 0.99 ** 2 * state["var"] + q
            beta = (1 - q) / (var + 1 - q)
            beta = 1.0 if beta >= 0.9999 else max(beta, 0.89)
            state["var"] = beta * var
            for h, p in zip(hidden, params, strict=True):
                if beta < 1.0:
                    h.mul_(beta).add_(p, alpha=1 - beta)
                p.mul_(0.99).add_(h, alpha=0.01)
            out = logits.detach()
            prior = probs.mean(0)
            smooth = max(1 / n, 1 / out.shape[1]) / prior.max()
            return out * (prior + smooth) / (1 + smooth * out.shape[1])

    return step
