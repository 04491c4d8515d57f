"""DeYO: batch statistics, Adam 1e-3 on the BN affine parameters; entropy filter (0.5 ln C), PLPD > 0.2 on a
patch-shuffled view (4 x 4 patches), entropy weighted by exp(0.4 ln C - H) + exp(PLPD); no step when none pass."""

import math

import torch
from torch import nn

from hand_loops.tent import bn_affine_on_batch_statistics
from tta.core.views import patch_shuffle


def make(model: nn.Module, device: torch.device, source: object = None):
    model.eval()
    params = bn_affine_on_batch_statistics(model)
    optimizer = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(0)

    def step(x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            logits = model(x)
            c = logits.shape[1]
            ent = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
            reliable = ent < 0.5 * math.log(c)
            if not bool(reliable.any()):
                return logits.detach()
            with torch.no_grad():
                probs = logits[reliable].softmax(1)
                label = probs.argmax(1, keepdim=True)
                view = model(patch_shuffle(x[reliable], 4, gen)).softmax(1)
                plpd = (probs.gather(1, label) - view.gather(1, label)).squeeze(1)
            ok = plpd > 0.2
            if not bool(ok.any()):
                return logits.detach()
            e, d = ent[reliable][ok], plpd[ok]
            loss = (e * (torch.exp(0.4 * math.log(c) - e.detach()) + d.exp())).mean()
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return logits.detach()

    return step
