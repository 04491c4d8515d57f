"""FOA: CMA-ES (tta.methods.foa's) over 3 prompt tokens of a timm ViT, fitness 0.4 * the discrepancy of the class
tokens' batch statistics from the source's * N / 64 plus the summed entropy; the best candidate's prediction, shifted
by the source mean minus an EMA (0.9) of the test batches' mean final class feature. No backward pass."""

import math

import numpy as np
import torch
from torch import nn

from tta.methods.foa import CMAES, find_vit

PROMPTS, POPSIZE = 3, 27


def make(model: nn.Module, device: torch.device, source: tuple | None = None):
    model.eval()
    prefix, vit = find_vit(model)
    width = int(vit.embed_dim)
    es = CMAES(PROMPTS * width, POPSIZE)
    g = torch.Generator().manual_seed(2020)
    patch = vit.patch_embed.patch_size
    bound = math.sqrt(6.0 / (3 * patch[0] * patch[1] + width))
    best = ((torch.rand(PROMPTS * width, generator=g, dtype=torch.float64) * 2 - 1) * bound).to(device)
    state = {k: v.to(device) for k, v in es.initial_state(1.0).items()}
    generation = [0]
    test_mean: list = [None]

    def features(x: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        for module in prefix:
            x = module(x)
        t = vit.patch_drop(vit._pos_embed(vit.patch_embed(x)))
        if prompts is not None:
            t = torch.cat([t[:, :1], prompts.view(1, -1, width).expand(t.shape[0], -1, -1), t[:, 1:]], dim=1)
        t = vit.norm_pre(t)
        feats = []
        for i, block in enumerate(vit.blocks):
            t = block(t)
            feats.append((vit.blocks[i + 1].norm1 if i + 1 < len(vit.blocks) else vit.norm)(t[:, 0]))
        return torch.cat(feats, dim=1)

    images = source[0]
    index = np.sort(np.random.default_rng(0).choice(len(images), size=1000, replace=False))
    with torch.no_grad():
        feats = torch.cat([features(b.to(device), None) for b in images[torch.from_numpy(index)].split(64)])
    source_std, source_mean = torch.std_mean(feats, dim=0)

    def step(x: torch.Tensor) -> torch.Tensor:
        shift = None if test_mean[0] is None else source_mean[-width:] - test_mean[0]
        z = torch.randn(POPSIZE, es.dim, generator=g, dtype=torch.float64)
        candidates = torch.cat([es.ask(state, z.to(device)), best[None]])
        fitness = torch.empty(len(candidates), dtype=torch.float64)
        means = []
        with torch.no_grad():
            for j, prompts in enumerate(candidates):
                f = features(x, prompts.to(x))
                std, mean = torch.std_mean(f, dim=0)
                logits = vit.head(vit.fc_norm(f[:, -width:]))
                value = (0.4 * (((std - source_std) ** 2).sum() + ((mean - source_mean) ** 2).sum()) * len(x) / 64
                         - (logits.softmax(1) * logits.log_softmax(1)).sum())
                fitness[j] = value.item()
                means.append(f[:, -width:].mean(0))
                if j == 0 or fitness[j] < fitness[:j].min():
                    best_logits = logits
            generation[0] += 1
            if bool(torch.isfinite(fitness).all()):
                es.tell(state, candidates, fitness.to(device), generation[0], generation[0] % es.eigen_every == 0)
                best.copy_(candidates[int(torch.argmin(fitness))])
            batch_mean = torch.stack(means).mean(0)
            test_mean[0] = batch_mean if test_mean[0] is None else 0.9 * test_mean[0] + 0.1 * batch_mean
            return best_logits if shift is None else best_logits + shift @ vit.head.weight.T

    return step
