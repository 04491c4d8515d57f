"""GTTA (mixup variant): every weight and bias (batch statistics), Adam 1e-5; per batch confident pseudo-labels
(confidence >= sqrt of its running mean), a step on the next source batch mixed 1/3 towards the test images with
the closest predictions, then a step on the pseudo-labels; predicts between the two steps."""

import torch
import torch.nn.functional as F
from torch import nn

from hand_loops.rmt import every_weight_with_batch_statistics


def make(model: nn.Module, device: torch.device, source: tuple | None = None):
    params = every_weight_with_batch_statistics(model)
    optimizer = torch.optim.Adam(params, lr=1e-5, betas=(0.9, 0.999))
    images, labels = source[0].to(device), source[1].to(device)
    state = {"i": 0, "conf": torch.tensor(0.9, device=device)}

    def step(x: torch.Tensor) -> torch.Tensor:
        epoch, k = divmod(state["i"], len(images) // 200)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1 + epoch))[k * 200:(k + 1) * 200]
        state["i"] += 1
        xs, ys = images[order.to(device)][:len(x)], labels[order.to(device)][:len(x)]
        with torch.no_grad():
            probs = model(x).softmax(1)
            conf, pseudo = probs.max(1)
            state["conf"] = 0.9 * state["conf"] + 0.1 * conf.mean()
            pseudo[conf < state["conf"].sqrt()] = -1
            closest = (model(xs).softmax(1) @ probs.T).argmax(1)
            mixed = x[closest] / 3 + xs * (2 / 3)
        with torch.enable_grad():
            F.cross_entropy(model(mixed), ys).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            if (pseudo >= 0).any():
                F.cross_entropy(logits, pseudo, ignore_index=-1).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return logits.detach()

    return step
