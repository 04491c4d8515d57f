"""The diagonal Fisher information of a model's parameters on clean source data (EATA's anti-forgetting term).

As EATA's official code: the model labels each source image with its own prediction (argmax), the cross-entropy
of a batch is averaged over the batch, and the Fisher of a parameter is the square of its batch gradient averaged
over the batches. The model is used as configured for adaptation (BatchNorm normalising with the batch's
statistics), and nothing about it changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tta.errors import ModelError
from tta.models.fingerprint import model_fingerprint
from tta.source import SourceData, derived


def pseudo_label_fisher(model: nn.Module, params: list[nn.Parameter], images: torch.Tensor,
                        batch_size: int) -> list[torch.Tensor]:
    """Mean over batches of ``images`` of the squared gradient of each parameter (one tensor per parameter)."""
    like = params[0] if params else images
    sums = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in params]
    batches = images.split(batch_size)
    with torch.inference_mode(False), torch.enable_grad():
        for batch in batches:
            logits = model(batch.to(device=like.device, dtype=like.dtype))
            loss = F.cross_entropy(logits, logits.argmax(1))
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for s, g in zip(sums, grads, strict=True):
                if g is not None:
                    s.add_(g.detach() ** 2)
    return [s / len(batches) for s in sums]


def finite(fisher: list[torch.Tensor]) -> bool:
    """Whether every value of a Fisher (one tensor per parameter) is finite: a cached inf or NaN is never used."""
    return isinstance(fisher, list) and all(isinstance(f, torch.Tensor) and bool(torch.isfinite(f).all())
                                            for f in fisher)


def source_fisher(model: nn.Module, params: list[nn.Parameter], source: SourceData, *, samples: int,
                  batch_size: int, seed: int) -> list[torch.Tensor]:
    """``pseudo_label_fisher`` on ``samples`` source images drawn with ``seed`` in shuffled batches of
    ``batch_size``; cached by the model's weights, the source data and these settings."""
    names = {id(p): n for n, p in model.named_parameters()}
    settings = f"samples={samples}|batch={batch_size}|seed={seed}|params={','.join(names[id(p)] for p in params)}"

    def compute() -> list[torch.Tensor]:
        images, _ = source.sample(samples, seed=seed)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        fisher = [f.cpu() for f in pseudo_label_fisher(model, params, images[order], batch_size)]
        if not finite(fisher):
            raise ModelError("the Fisher information on the source data is not finite (the model's loss on clean "
                             "source images overflows); check the model and the source data")
        return fisher

    fisher = derived("fisher", model_fingerprint(model), source, settings, compute, valid=finite)
    return [f.to(p) for f, p in zip(fisher, params, strict=True)]


__all__ = ["finite", "pseudo_label_fisher", "source_fisher"]
