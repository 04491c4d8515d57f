"""FOA: forward-only test-time adaptation of a ViT by input prompts searched with CMA-ES (Niu et al., ICML 2024).

FOA never runs a backward pass and never changes a weight, so it adapts models that cannot be trained at test time
(quantised or compiled for deployment). It learns ``num_prompts`` prompt tokens inserted after the class token of a
Vision Transformer with the covariance matrix adaptation evolution strategy (CMA-ES), and shifts the final class
feature toward the source. As the official code, for each batch:

1. CMA-ES proposes ``popsize`` prompt vectors; the best prompts of the previous batch are evaluated with them;
2. each candidate's fitness is ``fitness_lambda * (sum (std - std_S)^2 + sum (mean - mean_S)^2) * N / 64`` plus the
   summed softmax entropy, with std/mean the batch statistics of the class token's normalised features after every
   block (block ``i``'s output through block ``i+1``'s ``norm1``, the last through the final ``norm``) and
   ``std_S``/``mean_S`` the same statistics on clean source images (``source_samples`` from ``--source-data``);
3. CMA-ES is told every candidate's fitness (the previous best included) and the best candidate's prompts are kept;
4. the prediction is the best candidate's: its head applied to the final class feature plus the shift
   ``mean_S - m``, with ``m`` an EMA (``shift_momentum``) of the test batches' mean final class feature (averaged over
   the candidates); the first batch is not shifted (there is no ``m`` yet). ``shift: false`` turns this off.

CMA-ES is this file's own ((mu/mu_w, lambda) with cumulative step-size adaptation and rank-one plus rank-mu
covariance updates, the eigendecomposition refreshed lazily; Hansen's tutorial defaults): the official code uses the
``cma`` package, whose random draws and defaults beyond these (active negative weights) differ, so runs agree in
accuracy over seeds, not batch by batch. As the official code, the ``popsize + 1`` candidates are ranked together
and the ``popsize // 2`` best recombined; the search starts at the zero vector with step size ``sigma0`` (the prompts
before the first batch are VPT's Xavier-uniform initialisation). Its state (mean, step size, covariance, evolution
paths, random generator) is adaptation state: ``reset()`` restores it and ``state_dict()`` saves it.

Models: a timm ``VisionTransformer`` with a class token and class-token pooling, alone or last in an
``nn.Sequential`` after input transforms (``tta.load_model``'s normalisation): ``--model timm:vit_base_patch16_224``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from tta.core.base import AdaptedModel, StepOutput
from tta.core.losses import entropy
from tta.core.requirements import Requirements
from tta.core.validate import check_range
from tta.errors import ModelError
from tta.models.fingerprint import model_fingerprint
from tta.registry import register


@dataclass(frozen=True)
class FOAConfig:
    """Settings of ``foa``: prompts, fitness weight, CMA-ES population, step size and seed, activation shifting and
    the clean source images its statistics come from."""

    num_prompts: int = 3
    fitness_lambda: float = 0.4
    popsize: int = 27
    sigma0: float = 1.0
    seed: int = 2020
    shift: bool = True
    shift_momentum: float = 0.9
    source_samples: int = 1000
    source_batch_size: int = 64
    source_seed: int = 0

    def __post_init__(self) -> None:
        check_range("num_prompts", self.num_prompts, low=1, high=64)
        check_range("fitness_lambda", self.fitness_lambda, low=0.0)
        check_range("popsize", self.popsize, low=2, high=4096)
        check_range("sigma0", self.sigma0, low=0.0, low_open=True)
        check_range("shift_momentum", self.shift_momentum, low=0.0, high=1.0)
        check_range("source_samples", self.source_samples, low=2)
        check_range("source_batch_size", self.source_batch_size, low=1)


def find_vit(model: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """The input transforms before the ViT and the timm ``VisionTransformer`` itself; ``ModelError`` for any model
    FOA cannot prompt (no timm ViT, no class token, or pooling other than the class token)."""
    from timm.models.vision_transformer import VisionTransformer

    fix = ("; use a timm VisionTransformer with a class token (e.g. --model timm:vit_base_patch16_224), or a "
           "method that fits this model (see `tta methods`)")
    if isinstance(model, VisionTransformer):
        prefix, vit = [], model
    elif isinstance(model, nn.Sequential) and len(model) and isinstance(model[-1], VisionTransformer):
        prefix, vit = list(model)[:-1], model[-1]
    else:
        raise ModelError("foa learns prompt tokens of a Vision Transformer and needs a timm VisionTransformer (alone "
                         f"or last in an nn.Sequential after input transforms), not a {type(model).__name__}" + fix)
    if getattr(vit, "cls_token", None) is None or vit.global_pool != "token" or getattr(vit, "attn_pool", None):
        raise ModelError("foa reads the class token of every block, and this VisionTransformer has no class token "
                         f"or pools with {vit.global_pool!r}" + fix)
    if any(getattr(b, "norm1", None) is None for b in vit.blocks[1:]):
        raise ModelError("foa normalises the class token with the next block's norm1, and a block of this "
                         "VisionTransformer has none" + fix)
    return prefix, vit


class CMAES:
    """Constants of (mu/mu_w, lambda)-CMA-ES in ``dim`` dimensions with ``popsize`` samples (Hansen's defaults)."""

    def __init__(self, dim: int, popsize: int) -> None:
        n = float(dim)
        self.dim, self.popsize, self.mu = dim, popsize, popsize // 2
        w = math.log(self.mu + 0.5) - torch.log(torch.arange(1, self.mu + 1, dtype=torch.float64))
        self.weights = w / w.sum()
        self.mueff = float(1.0 / (self.weights ** 2).sum())
        mueff = self.mueff
        self.cc = (4 + mueff / n) / (n + 4 + 2 * mueff / n)
        self.cs = (mueff + 2) / (n + mueff + 5)
        self.c1 = 2 / ((n + 1.3) ** 2 + mueff)
        self.cmu = min(1 - self.c1, 2 * (mueff - 2 + 1 / mueff) / ((n + 2) ** 2 + mueff))
        self.damps = 1 + 2 * max(0.0, math.sqrt((mueff - 1) / (n + 1)) - 1) + self.cs
        self.chi_n = math.sqrt(n) * (1 - 1 / (4 * n) + 1 / (21 * n * n))
        self.eigen_every = max(1, int(popsize / (self.c1 + self.cmu) / n / 10))

    def initial_state(self, sigma0: float) -> dict[str, torch.Tensor]:
        """Mean zero, step size ``sigma0``, identity covariance, zero evolution paths."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        zeros = torch.zeros(self.dim, dtype=torch.float64)
        return {"mean": zeros.clone(), "sigma": torch.tensor(float(sigma0), dtype=torch.float64), "cov": eye.clone(),
                "basis": eye.clone(), "scales": torch.ones(self.dim, dtype=torch.float64), "path_s": zeros.clone(),
                "path_c": zeros.clone()}

    def ask(self, s: dict[str, torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        """``popsize`` candidates mean + sigma B D z from standard normal draws ``z`` (popsize, dim)."""
        return s["mean"] + s["sigma"] * (z * s["scales"]) @ s["basis"].T

    def tell(self, s: dict[str, torch.Tensor], candidates: torch.Tensor, fitness: torch.Tensor, generation: int,
             refresh: bool) -> None:
        """Update ``s`` in place from ``candidates`` (k, dim) and their ``fitness`` (lower is better); the ``mu``
        best of all k are recombined. ``generation`` counts from 1; ``refresh`` recomputes the eigenbasis."""
        order = torch.argsort(fitness, stable=True)[: self.mu]
        old = s["mean"]
        sigma = s["sigma"]
        steps = (candidates[order] - old) / sigma
        y = self.weights @ steps
        mean = old + sigma * y
        inv_sqrt = s["basis"] @ torch.diag(1 / s["scales"]) @ s["basis"].T
        ps = (1 - self.cs) * s["path_s"] + math.sqrt(self.cs * (2 - self.cs) * self.mueff) * (inv_sqrt @ y)
        norm_ps = float(ps.norm())
        hsig = norm_ps / math.sqrt(1 - (1 - self.cs) ** (2 * generation)) / self.chi_n < 1.4 + 2 / (self.dim + 1)
        pc = (1 - self.cc) * s["path_c"] + float(hsig) * math.sqrt(self.cc * (2 - self.cc) * self.mueff) * y
        rank_mu = (steps.T * self.weights) @ steps
        cov = ((1 - self.c1 - self.cmu) * s["cov"] + self.c1 * (torch.outer(pc, pc) + (not hsig) * self.cc
               * (2 - self.cc) * s["cov"]) + self.cmu * rank_mu)
        s["mean"], s["path_s"], s["path_c"] = mean, ps, pc
        s["sigma"] = sigma * math.exp(self.cs / self.damps * (norm_ps / self.chi_n - 1))
        s["cov"] = (cov + cov.T) / 2
        if refresh:
            values, basis = torch.linalg.eigh(s["cov"])
            s["scales"], s["basis"] = values.clamp_min(1e-20).sqrt(), basis


@register("foa")
class FOA(AdaptedModel):
    """Forward-only: CMA-ES learns ViT input prompts from entropy + source-statistics discrepancy; weights unchanged."""

    Config = FOAConfig
    update = "none"
    requires = Requirements(source_data=True, min_batch=2)  # batch statistics need two images
    presets: ClassVar[dict[str, dict[str, Any]]] = {"imagenet": {}, "vit": {}}  # the official ViT-B settings

    def check_model(self, model: nn.Module) -> None:
        find_vit(model)

    def setup(self) -> None:
        cfg = self.config
        prefix, vit = find_vit(self.model)
        # Views into self.model (kept out of nn.Module's registry, so its weights are not state twice).
        self.__dict__["_prefix"], self.__dict__["_vit"] = prefix, vit
        self.width = int(vit.embed_dim)
        self.es = CMAES(cfg.num_prompts * self.width, cfg.popsize)
        g = torch.Generator().manual_seed(cfg.seed)
        patch = vit.patch_embed.patch_size
        bound = math.sqrt(6.0 / (3 * patch[0] * patch[1] + self.width))  # VPT's Xavier-uniform initialisation
        like = vit.cls_token
        best = (torch.rand(cfg.num_prompts * self.width, generator=g, dtype=torch.float64) * 2 - 1) * bound
        for name, value in self.es.initial_state(cfg.sigma0).items():
            self.add_state(f"cma_{name}", value.to(like.device))
        self.add_state("generation", 0)
        self.add_state("rng", g.get_state())
        self.add_state("best_prompts", best.to(like.device))
        self.add_state("test_mean", torch.zeros(0, device=like.device, dtype=like.dtype), dynamic=True)
        std, mean = self._source_statistics()
        # Constants of the run, not adaptation state: never reset, saved or restored.
        self.register_buffer("source_std", std.to(like), persistent=False)
        self.register_buffer("source_mean", mean.to(like), persistent=False)

    def _source_statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Std and mean over ``source_samples`` clean images of the class features of every block (no prompts)."""
        from tta.source import derived

        cfg = self.config
        assert self.source_data is not None  # required, checked before setup
        settings = f"samples={cfg.source_samples}|seed={cfg.source_seed}"

        def compute() -> list[torch.Tensor]:
            images, _ = self.source_data.sample(cfg.source_samples, seed=cfg.source_seed)
            like = self._vit.cls_token
            with torch.inference_mode(False), torch.no_grad():
                feats = torch.cat([self._features(b.to(like), None) for b in images.split(cfg.source_batch_size)])
            std, mean = torch.std_mean(feats, dim=0)
            return [std.cpu(), mean.cpu()]

        std, mean = derived("foa-stats", model_fingerprint(self.model), self.source_data, settings, compute,
                            valid=lambda v: all(bool(torch.isfinite(t).all()) for t in v))
        return std, mean

    def _features(self, x: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        """(N, blocks * width): the class token after every block, normalised as the next layer normalises it."""
        for module in self._prefix:
            x = module(x)
        vit = self._vit
        t = vit.patch_drop(vit._pos_embed(vit.patch_embed(x)))
        if prompts is not None:
            t = torch.cat([t[:, :1], prompts.view(1, -1, self.width).expand(t.shape[0], -1, -1), t[:, 1:]], dim=1)
        t = vit.norm_pre(t)
        feats = []
        for i, block in enumerate(vit.blocks):
            t = block(t)
            norm = vit.blocks[i + 1].norm1 if i + 1 < len(vit.blocks) else vit.norm
            feats.append(norm(t[:, 0]))
        return torch.cat(feats, dim=1)

    def _head(self, cls: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        """Logits of final class features, moved by ``shift`` (the back-to-source activation shift) when given."""
        vit = self._vit
        cls = vit.fc_norm(cls)
        return vit.head(vit.head_drop(cls if shift is None else cls + shift))

    def _shifted(self, cls: torch.Tensor, logits: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
        """``_head(cls, shift)`` from ``logits = _head(cls, None)``: for a linear head, logits + W shift, without a
        second pass through the head (the cost columns count head passes as forward passes)."""
        if shift is None:
            return logits
        if isinstance(self._vit.head, nn.Linear) and not self._vit.training:
            return logits + shift @ self._vit.head.weight.T
        return self._head(cls, shift)

    def _shift(self) -> torch.Tensor | None:
        if not self.config.shift or self.test_mean.numel() == 0:
            return None
        return self.source_mean[-self.width:] - self.test_mean

    def _fitness(self, feats: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The fitness of one candidate's features (lower is better) and its unshifted logits."""
        std, mean = torch.std_mean(feats, dim=0)
        discrepancy = ((std - self.source_std) ** 2).sum() + ((mean - self.source_mean) ** 2).sum()
        logits = self._head(feats[:, -self.width:], None)
        return self.config.fitness_lambda * discrepancy * n / 64 + entropy(logits).sum(), logits

    def loss(self, x: torch.Tensor, domain: torch.Tensor | None) -> StepOutput:
        shift = self._shift()
        g = torch.Generator()
        g.set_state(self.rng.cpu())
        z = torch.randn(self.es.popsize, self.es.dim, generator=g, dtype=torch.float64)
        self.rng.copy_(g.get_state())
        state = {name: getattr(self, f"cma_{name}") for name in ("mean", "sigma", "cov", "basis", "scales",
                                                                  "path_s", "path_c")}
        candidates = torch.cat([self.es.ask(state, z.to(state["mean"].device)), self.best_prompts[None]])
        fitness = torch.empty(len(candidates), dtype=torch.float64)
        best_cls: torch.Tensor | None = None
        best_logits: torch.Tensor | None = None
        means = []
        for j, prompts in enumerate(candidates):
            feats = self._features(x, prompts.to(x))
            value, logits = self._fitness(feats, x.shape[0])
            fitness[j] = value.item()
            means.append(feats[:, -self.width:].mean(0))
            if best_cls is None or fitness[j] < fitness[:j].min():
                best_cls, best_logits = feats[:, -self.width:], logits
        assert best_cls is not None and best_logits is not None
        best = int(torch.argmin(fitness))  # the first of equal minima, as the prediction above
        self.generation += 1
        refresh = self.generation % self.es.eigen_every == 0
        finite = bool(torch.isfinite(fitness).all())
        if finite:  # a non-finite fitness (a degenerate batch) teaches CMA-ES nothing
            self.es.tell(state, candidates, fitness.to(state["mean"].device), self.generation, refresh)
            for name, value in state.items():
                getattr(self, f"cma_{name}").copy_(value)
            self.best_prompts.copy_(candidates[best])
        batch_mean = torch.stack(means).mean(0)
        m = self.config.shift_momentum
        if self.test_mean.numel() == 0:
            self.test_mean = batch_mean
        else:
            self.test_mean.mul_(m).add_(batch_mean, alpha=1 - m)
        diagnostics = {"fitness": fitness[best].to(x.device), "sigma": self.cma_sigma.detach().clone()}
        return StepOutput(self._shifted(best_cls, best_logits, shift), diagnostics=diagnostics)

    def predict(self, x: torch.Tensor, domain: torch.Tensor | None) -> torch.Tensor:
        cls = self._features(x, self.best_prompts.to(x))[:, -self.width:]
        return self._shifted(cls, self._head(cls, None), self._shift())
