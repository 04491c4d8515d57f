"""AFN, Adaptive Fusion Normalization (Zhou & Chen 2023; docs/methods/afn.md), and a BN-to-AFN converter.

AFN normalises with the batch statistics fused with an encoder-decoder estimate of them, then rescales with the
pretrained affine parameters plus a learned, statistics-dependent correction. It keeps no running statistics:
train and eval mode both use the current batch (eval only switches off the dropout on the statistic vectors).

Per channel, over (N, H, W): mu_B and sigma_B = sqrt(unbiased var) + 1e-6 (gradients flow through both).
Standardisation (shared encoder f_enc):
    mu_hat = dec_mu(ReLU(f_enc(drop(mu_B))));  sigma_hat = ReLU(dec_sigma(ReLU(f_enc(drop(sigma_B)))))
    mu' = l_mu mu_hat + (1 - l_mu) mu_B;        sigma' = l_sigma sigma_hat + (1 - l_sigma) sigma_B
Rescaling (shared encoder g_enc):
    beta = l_beta tanh(dec_beta(ReLU(g_enc(mu_B)))) + beta_bias
    gamma = l_gamma sigmoid(dec_gamma(ReLU(g_enc(sigma_B)))) + gamma_bias
y = gamma (x - mu') / sigma' + beta, with l_mu = sigmoid(w_mu), l_sigma = sigmoid(w_sigma) and l_beta, l_gamma raw.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tta.norm.adaptive_bn import blend_prior
from tta.norm.convert import replace_batchnorms

LambdaInit = Literal["paper", "official"]
LAMBDA_INITS: tuple[str, ...] = ("paper", "official")
IDENTITY_SIGMA_HAT = 1e-3


class AFN(nn.Module):
    """Adaptive Fusion Normalization for (N, C, H, W) feature maps; build from a pretrained BN with ``from_bn``.

    ``lambda_init``: ``paper`` starts l_mu = l_sigma = sigmoid(-3) ~ 0.047 as the paper intends; ``official``
    reproduces the official code, which stores sigmoid(-3) in the parameter and applies sigmoid again in the
    forward pass (l ~ 0.512 at initialisation). ``identity_init`` zero-initialises the last layer of every decoder,
    so the estimates start at mu_hat = beta_hat = 0, gamma_hat = 0.5 and sigma_hat = 1e-3 (the sigma decoder's
    bias is not 0 exactly, or its final ReLU would block every gradient to it). ``source_prior_n`` (N) blends
    the batch statistics with the source statistics (the source prior of docs/methods/statistics.md) before
    anything else; None uses the batch only.
    """

    def __init__(
        self,
        num_features: int,
        lambda_init: LambdaInit = "paper",
        identity_init: bool = False,
        source_prior_n: float | None = None,
        p_drop: float = 0.3,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if lambda_init not in LAMBDA_INITS:
            raise ValueError(f"unknown lambda_init {lambda_init!r}; choose one of {', '.join(LAMBDA_INITS)}")
        if source_prior_n is not None and source_prior_n < 0:
            raise ValueError(f"source_prior_n must be >= 0 or None, got {source_prior_n}")
        c = num_features
        self.num_features, self.lambda_init, self.eps = c, lambda_init, eps
        self.source_prior_n = None if source_prior_n is None else float(source_prior_n)
        self.f_enc = nn.Linear(c, max(1, c // 2))
        self.dec_mu = nn.Linear(max(1, c // 2), c)
        self.dec_sigma = nn.Linear(max(1, c // 2), c)
        self.g_enc = nn.Linear(c, max(1, c // 16))
        self.dec_beta = nn.Linear(max(1, c // 16), c)
        self.dec_gamma = nn.Linear(max(1, c // 16), c)
        self.drop = nn.Dropout(p_drop)
        # Both modes apply sigmoid once in forward; "official" stores an already-squashed value, as that code does.
        w0 = -3.0 if lambda_init == "paper" else 1.0 / (1.0 + math.exp(3.0))
        self.w_mu = nn.Parameter(torch.tensor(w0))
        self.w_sigma = nn.Parameter(torch.tensor(w0))
        self.l_beta = nn.Parameter(torch.tensor(1.0 / (1.0 + math.exp(5.0))))
        self.l_gamma = nn.Parameter(torch.tensor(1.0 / (1.0 + math.exp(5.0))))
        self.gamma_bias = nn.Parameter(torch.ones(c))
        self.beta_bias = nn.Parameter(torch.zeros(c))
        # The pretrained BN's running statistics, used only by the optional source prior.
        self.register_buffer("source_mean", torch.zeros(c))
        self.register_buffer("source_var", torch.ones(c))
        if identity_init:
            for layer in (self.dec_mu, self.dec_sigma, self.dec_beta, self.dec_gamma):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
            # sigma_hat = ReLU(dec_sigma(...)): at exactly 0 the ReLU passes no gradient and that decoder could
            # never train, so its bias starts just above 0 (sigma_hat = 1e-3, weighted by l_sigma ~ 0.047).
            nn.init.constant_(self.dec_sigma.bias, IDENTITY_SIGMA_HAT)

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, **kwargs: object) -> AFN:
        """An AFN layer with gamma_bias, beta_bias (and the source statistics) copied from a pretrained BN."""
        layer = cls(bn.num_features, **kwargs)  # type: ignore[arg-type]
        if layer.source_prior_n is not None and bn.running_mean is None:
            raise ValueError(f"{bn} has no running statistics, which source_prior_n needs; it was built with "
                             "track_running_stats=False")
        with torch.no_grad():
            if bn.affine:
                layer.gamma_bias.copy_(bn.weight)
                layer.beta_bias.copy_(bn.bias)
            if bn.running_mean is not None and bn.running_var is not None:
                layer.source_mean.copy_(bn.running_mean)
                layer.source_var.copy_(bn.running_var)
        ref = bn.weight if bn.affine else bn.running_mean
        return layer if ref is None else layer.to(device=ref.device, dtype=ref.dtype)

    def lambdas(self) -> dict[str, torch.Tensor]:
        """The four fusion weights as used in the forward pass (l_mu, l_sigma after the sigmoid)."""
        return {"mu": torch.sigmoid(self.w_mu), "sigma": torch.sigmoid(self.w_sigma),
                "beta": self.l_beta, "gamma": self.l_gamma}

    def statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (mu_B, sigma_B) of ``x``, blended with the source statistics when ``source_prior_n`` is set."""
        per_channel = x.numel() // x.shape[1]
        if per_channel < 2:
            # One value per channel has no variance: fall back to the source statistics.
            mean, var = self.source_mean.to(x.dtype), self.source_var.to(x.dtype)
        else:
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=1)
            if self.source_prior_n is not None:
                mean, var = blend_prior(self.source_mean.to(x.dtype), self.source_var.to(x.dtype), mean, var,
                                        x.shape[0], self.source_prior_n)
        return mean, var.sqrt() + self.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (N, C, H, W) with fused batch statistics and rescale it."""
        if x.ndim != 4:
            raise ValueError(f"AFN expects (N, C, H, W) feature maps, got shape {tuple(x.shape)}")
        mu_b, sigma_b = self.statistics(x)
        mu_hat = self.dec_mu(F.relu(self.f_enc(self.drop(mu_b))))
        sigma_hat = F.relu(self.dec_sigma(F.relu(self.f_enc(self.drop(sigma_b)))))
        l_mu, l_sigma = torch.sigmoid(self.w_mu), torch.sigmoid(self.w_sigma)
        mu = l_mu * mu_hat + (1 - l_mu) * mu_b
        sigma = l_sigma * sigma_hat + (1 - l_sigma) * sigma_b
        beta = self.l_beta * torch.tanh(self.dec_beta(F.relu(self.g_enc(mu_b)))) + self.beta_bias
        gamma = self.l_gamma * torch.sigmoid(self.dec_gamma(F.relu(self.g_enc(sigma_b)))) + self.gamma_bias
        scale = gamma / sigma
        # One fused multiply-add over the feature map: y = x * gamma/sigma' + (beta - mu' gamma/sigma').
        return torch.addcmul((beta - mu * scale)[None, :, None, None], x, scale[None, :, None, None])

    def affine_parameters(self) -> list[nn.Parameter]:
        """The ``affine`` trainable set: gamma_bias, beta_bias and the four lambdas."""
        return [self.gamma_bias, self.beta_bias, self.w_mu, self.w_sigma, self.l_beta, self.l_gamma]

    def extra_repr(self) -> str:
        return (f"{self.num_features}, lambda_init={self.lambda_init}, source_prior_n={self.source_prior_n}, "
                f"p_drop={self.drop.p}")


def convert_to_afn(
    model: nn.Module,
    lambda_init: LambdaInit = "paper",
    identity_init: bool = True,
    source_prior_n: float | None = None,
    p_drop: float = 0.3,
) -> int:
    """Replace every BatchNorm2d of ``model`` by an AFN layer built from it, in place; returns how many.

    Other BatchNorm types (1d, 3d) are left as they are. ``identity_init`` defaults to True here because a converted
    pretrained network should start close to its train-mode BN behaviour rather than from random decoders.
    """
    return replace_batchnorms(
        model,
        lambda bn: AFN.from_bn(bn, lambda_init=lambda_init, identity_init=identity_init,  # type: ignore[arg-type]
                               source_prior_n=source_prior_n, p_drop=p_drop),
        types=(nn.BatchNorm2d,),
    )


def afn_layers(model: nn.Module) -> list[AFN]:
    """Every AFN layer of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, AFN)]


def afn_parameters(model: nn.Module, trainable: Literal["affine", "all"] = "all") -> list[nn.Parameter]:
    """Parameters of the AFN layers: ``affine`` (biases and lambdas) or ``all`` (also encoders and decoders)."""
    if trainable not in ("affine", "all"):
        raise ValueError(f"trainable must be 'affine' or 'all', got {trainable!r}")
    layers = afn_layers(model)
    if trainable == "affine":
        return [p for layer in layers for p in layer.affine_parameters()]
    return [p for layer in layers for p in layer.parameters()]
