"""Proxy Normalization (Labatie et al., NeurIPS 2021): batch-independent layers that replace BN -> activation.

A BatchNorm network normalises every channel with statistics of a batch (or of the training set), so its output for
one image depends on the others, and test-time adaptation needs batches. Proxy Normalization replaces each
``BN -> activation`` pair by ``norm -> PN-Act``: a per-image normalisation (GroupNorm, or LayerNorm over the
channels and pixels of each image) followed by a proxy-normalised activation. With ``y`` the normalised input,
``gamma``/``beta`` the affine parameters and ``phi`` the activation, PN-Act computes

    z = phi(gamma y + beta),   out = (z - E[phi(gamma Y + beta)]) / sqrt(Var[phi(gamma Y + beta)] + eps)

per channel, where the proxy ``Y ~ N(beta~, (1 + gamma~)^2)`` has trainable ``beta~``, ``gamma~`` (initialised at
0). The proxy moments are constants of the parameters, never of the data, so every image is processed on its own.
For ReLU they have a closed form; any other activation uses quadrature on standard-normal quantiles.

``convert_to_proxy_norm`` rewrites any torch.fx-traceable BN network (CIFAR ResNets, torchvision ResNets, ...):
``BN -> activation`` becomes ``norm -> PN-Act`` with BN's gamma/beta moved into PN-Act, and ``BN -> residual
addition -> activation`` becomes ``norm (with BN's affine) -> addition -> PN-Act`` (the PN-Act then starts from
the identity affine). The normalisation is no longer BN's, so a converted network must be fine-tuned
(``tta warmup --method proxy-norm``); ``calibrate_proxy_norm`` first sets its affine and proxy parameters from a
few hundred source images so that it starts close to the BN original.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from tta.errors import ModelError

NormKind = Literal["group", "layer"]
NORM_KINDS: tuple[str, ...] = ("group", "layer")
QUADRATURE_POINTS = 256

# Activations PN-Act supports, by name: the function applied elementwise.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "relu6": F.relu6, "silu": F.silu, "gelu": F.gelu, "hardswish": F.hardswish,
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "elu": F.elu, "mish": F.mish,
}
# How each appears in a traced graph: modules (only with default settings), functions and tensor methods.
_ACT_MODULES: dict[type, str] = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.GELU: "gelu",
                                 nn.Hardswish: "hardswish", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.ELU: "elu",
                                 nn.Mish: "mish"}
_ACT_FUNCTIONS: dict[object, str] = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
                                     F.relu6: "relu6", F.silu: "silu", F.gelu: "gelu", F.hardswish: "hardswish",
                                     torch.sigmoid: "sigmoid", torch.tanh: "tanh", F.elu: "elu", F.mish: "mish"}
_ACT_METHODS: dict[str, str] = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_ADDS = (operator.add, operator.iadd, torch.add)


def _normal_cdf(t: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(t / math.sqrt(2.0)))


def _normal_pdf(t: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)


def relu_moments(m: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of ReLU(X) for X ~ N(m, s^2), elementwise (s >= 0; s = 0 gives max(m, 0) and 0)."""
    t = m / s.clamp_min(torch.finfo(s.dtype).tiny)
    cdf, pdf = _normal_cdf(t), _normal_pdf(t)
    mean = m * cdf + s * pdf
    second = (m * m + s * s) * cdf + m * s * pdf
    return mean, (second - mean * mean).clamp_min(0.0)


def normal_quantiles(n: int = QUADRATURE_POINTS) -> torch.Tensor:
    """``n`` standard-normal quantiles Phi^-1((j + 0.5) / n), rescaled to have mean 0 and variance 1 exactly."""
    u = torch.special.ndtri((torch.arange(n, dtype=torch.float64) + 0.5) / n)
    return u / u.pow(2).mean().sqrt()


def quadrature_moments(
    phi: Callable[[torch.Tensor], torch.Tensor], m: torch.Tensor, s: torch.Tensor, nodes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of phi(X) for X ~ N(m, s^2), by equal-weight quadrature on the quantile ``nodes``."""
    z = phi(m[:, None] + s[:, None] * nodes.to(m.dtype)[None, :])
    mean = z.mean(dim=1)
    return mean, (z - mean[:, None]).pow(2).mean(dim=1)


class PNAct(nn.Module):
    """Proxy-normalised activation for (N, C, ...) inputs that a per-image norm has already standardised.

    Parameters: ``weight`` (gamma) and ``bias`` (beta), the affine that BN applied before the activation, and the
    proxy's ``proxy_beta`` (beta~) and ``proxy_gamma`` (gamma~), initialised at 0. ReLU uses the closed form of
    the proxy moments; every other activation in ``ACTIVATIONS`` uses ``QUADRATURE_POINTS``-point quadrature.
    """

    def __init__(self, num_features: int, activation: str = "relu", eps: float = 1e-5) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        self.num_features, self.activation, self.eps = num_features, activation, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.proxy_beta = nn.Parameter(torch.zeros(num_features))
        self.proxy_gamma = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("nodes", normal_quantiles(), persistent=False)

    def proxy_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and variance of phi(gamma Y + beta) under the proxy Y ~ N(beta~, (1 + gamma~)^2)."""
        m = self.weight * self.proxy_beta + self.bias
        s = (self.weight * (1.0 + self.proxy_gamma)).abs()
        if self.activation == "relu":
            return relu_moments(m, s)
        return quadrature_moments(ACTIVATIONS[self.activation], m, s, self.nodes)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """phi(gamma y + beta), standardised with the proxy's moments; channels on axis 1."""
        if y.ndim < 2 or y.shape[1] != self.num_features:
            raise ValueError(f"PNAct({self.num_features}) expects (N, {self.num_features}, ...) inputs, "
                             f"got shape {tuple(y.shape)}")
        shape = (1, -1) + (1,) * (y.ndim - 2)
        z = ACTIVATIONS[self.activation](torch.addcmul(self.bias.view(shape), y, self.weight.view(shape)))
        mean, var = self.proxy_moments()
        inv = torch.rsqrt(var + self.eps)
        return torch.addcmul((-mean * inv).view(shape), z, inv.view(shape))

    def affine_parameters(self) -> list[nn.Parameter]:
        """What test-time adaptation trains here: the affine (weight, bias) and the proxy parameters."""
        return [self.weight, self.bias, self.proxy_beta, self.proxy_gamma]

    def extra_repr(self) -> str:
        return f"{self.num_features}, activation={self.activation}, eps={self.eps}"


def make_norm(num_features: int, norm: NormKind = "layer", groups: int = 8, affine: bool = True) -> nn.GroupNorm:
    """A per-image norm: GroupNorm with gcd(C, ``groups``) groups, or ``layer`` = one group (LayerNorm over C, H, W)."""
    if norm not in NORM_KINDS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORM_KINDS)}")
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    return nn.GroupNorm(math.gcd(num_features, groups) if norm == "group" else 1, num_features, affine=affine)


def _activation_name(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The PN-Act activation name of a graph node that applies a supported activation to its input, else None."""
    if node.op == "call_module":
        module = modules[str(node.target)]
        name = _ACT_MODULES.get(type(module))
        if name == "gelu" and module.approximate != "none":  # type: ignore[union-attr]
            return None
        if name == "elu" and module.alpha != 1.0:  # type: ignore[union-attr]
            return None
        return name
    if node.op == "call_function" and len(node.args) == 1 and not node.kwargs.keys() - {"inplace"}:
        return _ACT_FUNCTIONS.get(node.target)
    if node.op == "call_method" and len(node.args) == 1 and not node.kwargs:
        return _ACT_METHODS.get(str(node.target))
    return None


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def convert_to_proxy_norm(
    model: nn.Module, norm: NormKind = "layer", groups: int = 8, eps: float = 1e-5
) -> torch.fx.GraphModule:
    """A copy of ``model`` with every BatchNorm2d -> activation turned into norm -> PN-Act (``model`` is untouched).

    ``model`` must be traceable by ``torch.fx``. Every BatchNorm2d must be followed either by a supported activation
    (``BN -> act`` becomes ``norm -> PNAct``, the norm's affine at identity and BN's weight and bias in the PNAct)
    or by a residual addition whose result goes through one (every BN feeding the addition becomes a norm with BN's
    weight and bias, and the activation a PNAct starting from weight 1, bias 0). Norms are ``make_norm(C, norm,
    groups)``. The result is a ``GraphModule`` with the same module names: each BN's slot holds its norm and the
    PNAct sits beside it as ``<bn name>_act``; convolutions and every other layer are copies of ``model``'s.
    ``ModelError`` for any other layout. Run ``calibrate_proxy_norm`` next when source images are at hand.
    """
    if norm not in NORM_KINDS:
        raise ModelError(f"unknown norm {norm!r} for proxy-norm; choose one of {', '.join(NORM_KINDS)}")
    if groups < 1:
        raise ModelError(f"groups must be >= 1 for proxy-norm, got {groups}")
    model = copy.deepcopy(model)
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise ModelError("proxy-norm converts BatchNorm2d layers and this model has none; pass a BN network")
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as err:  # tracing fails in many ways (control flow on values, untraceable calls)
        raise ModelError(f"proxy-norm needs a model torch.fx can trace and this one cannot be ({type(err).__name__}: "
                         f"{str(err)[:200]}); convert a traceable BN network such as a CIFAR or torchvision "
                         "ResNet") from None
    modules = dict(gm.named_modules())
    graph = gm.graph
    created: set[torch.fx.Node] = set()  # PNAct nodes already put after a residual addition
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules[str(node.target)], _BatchNorm):
            continue
        target, bn = str(node.target), modules[str(node.target)]
        if not isinstance(bn, nn.BatchNorm2d):
            raise ModelError(f"layer {target!r} is a {type(bn).__name__}; proxy-norm converts BatchNorm2d layers "
                             "only (convolutional feature maps), so use a model without other BatchNorm types")
        user = _only_user(node)
        act = None if user is None else _activation_name(user, modules)
        after_add = None
        if user is not None and act is None and user.op in ("call_function", "call_method") and (
                user.target in _ADDS or user.target in ("add", "add_")):
            after_add = _only_user(user)
            act = None if after_add is None else "" if after_add in created else _activation_name(after_add, modules)
        if user is None or act is None:
            what = "several layers" if user is None else f"{user.op} {getattr(user.target, '__name__', user.target)}"
            raise ModelError(f"layer {target!r} (BatchNorm2d) is followed by {what}, not by an activation or a "
                             "residual addition then an activation; proxy-norm converts only those patterns")
        c = bn.num_features
        if after_add is None:  # BN -> act: the norm standardises, the PNAct applies BN's affine
            pn = PNAct(c, act, eps)
            act_node = user
        else:  # BN -> add -> act: the norm keeps BN's affine, the PNAct after the addition starts at identity
            pn = PNAct(c, act, eps) if act else None  # one PNAct per addition, even when two BNs feed it
            act_node = after_add
        new_norm = make_norm(c, norm, groups)
        with torch.no_grad():
            affine_to = pn if after_add is None else new_norm
            if bn.affine:
                affine_to.weight.copy_(bn.weight)
                affine_to.bias.copy_(bn.bias)
        ref = bn.weight if bn.affine else bn.running_mean
        gm.add_submodule(target, new_norm if ref is None else new_norm.to(device=ref.device, dtype=ref.dtype))
        if pn is not None:
            gm.add_submodule(f"{target}_act", pn if ref is None else pn.to(device=ref.device, dtype=ref.dtype))
            with graph.inserting_after(act_node):
                pn_node = graph.call_module(f"{target}_act", (act_node.args[0],))
            act_node.replace_all_uses_with(pn_node)
            graph.erase_node(act_node)
            created.add(pn_node)
    graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm.train(model.training)


def pn_layers(model: nn.Module) -> list[PNAct]:
    """Every PNAct of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, PNAct)]


class _Recorder(torch.fx.Interpreter):
    """Runs a traced graph and keeps the values of the named nodes."""

    def __init__(self, gm: torch.fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names, self.values = names, {}

    def run_node(self, n: torch.fx.Node) -> object:
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out
        return out


def _record(gm: torch.fx.GraphModule, names: set[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    rec = _Recorder(gm, names)
    rec.run(x)
    return rec.values


def _axes(t: torch.Tensor) -> list[int]:
    """Every axis but the channel axis 1."""
    return [0, *range(2, t.ndim)]


def _moments(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation."""
    std, mean = torch.std_mean(t, dim=_axes(t), correction=0)
    return mean, std


def _regress(new: torch.Tensor, old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel least squares ``new ~ scale * old + shift`` (scale 1 where ``old`` is constant, at least 1e-3)."""
    m_new, m_old = new.mean(dim=_axes(new)), old.mean(dim=_axes(old))
    shape = (1, -1) + (1,) * (new.ndim - 2)
    cov = ((new - m_new.view(shape)) * (old - m_old.view(shape))).mean(dim=_axes(new))
    var = (old - m_old.view(shape)).pow(2).mean(dim=_axes(old))
    scale = torch.where(var < 1e-12, torch.ones_like(cov), cov / var.clamp_min(1e-12)).clamp_min(1e-3)
    return scale, m_new - scale * m_old


def _is_norm(node: object, gm: torch.fx.GraphModule) -> bool:
    return (isinstance(node, torch.fx.Node) and node.op == "call_module"
            and isinstance(gm.get_submodule(str(node.target)), nn.GroupNorm))


@torch.no_grad()
def calibrate_proxy_norm(model: torch.fx.GraphModule, base: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    """Data-dependent initialisation of ``model`` = ``convert_to_proxy_norm(base)`` on clean images ``x`` (in place).

    Site by site (every PNAct, in execution order, on the activations the already calibrated sites produce), the
    affine parameters are set so that the converted network reproduces, channel by channel over ``x``, the
    pre-activations of its BN original up to the per-image normalisation: each norm's affine maps its output to the
    mean and standard deviation BN's normalised output has; at a residual addition, the other input (the shortcut,
    which PN-Act has standardised) is regressed on its BN counterpart, ``s' ~ A s + B``, the norms feeding the
    addition are scaled by ``A`` and the PNAct's affine undoes ``A``, ``B``. Every PNAct's proxy
    ``N(beta~, (1 + gamma~)^2)`` then gets the mean and standard deviation of its input. Without this, a converted
    network starts near chance accuracy and the fine-tuning has to relearn most of what BN gave it.
    """
    base_gm = torch.fx.symbolic_trace(base)
    base_nodes = {n.name: n for n in base_gm.graph.nodes}
    sites = [n for n in model.graph.nodes
             if n.op == "call_module" and isinstance(model.get_submodule(str(n.target)), PNAct)]
    wanted = {a.name for s in sites if isinstance(s.args[0], torch.fx.Node) and s.args[0].name in base_nodes
              for a in [base_nodes[s.args[0].name], *base_nodes[s.args[0].name].args] if isinstance(a, torch.fx.Node)}
    ref = _record(base_gm, wanted, x)
    for site in sites:
        pn = model.get_submodule(str(site.target))
        u = site.args[0]
        if not isinstance(u, torch.fx.Node) or u.name not in base_nodes:
            raise ModelError(f"cannot calibrate {site.target!r}: its input has no counterpart in the base model; pass "
                             "the model that was converted")
        inputs = [u] if _is_norm(u, model) else [a for a in u.args if isinstance(a, torch.fx.Node)]
        base_args = [base_nodes[u.name]] if _is_norm(u, model) else [
            a for a in base_nodes[u.name].args if isinstance(a, torch.fx.Node)]
        norms = [a for a in inputs if _is_norm(a, model)]
        cur = _record(model, {a.name for a in inputs} | {a.args[0].name for a in norms}, x)  # type: ignore[union-attr]
        scale, shift = None, None
        for a, b in zip(inputs, base_args, strict=True):
            if a not in norms and scale is None:  # the shortcut: s' ~ scale * s + shift per channel
                scale, shift = _regress(cur[a.name], ref[b.name])
        scale = torch.ones(pn.num_features) if scale is None else scale
        shift = torch.zeros(pn.num_features) if shift is None else shift
        y = sum(cur[a.name] for a in inputs if a not in norms) if len(norms) < len(inputs) else 0.0
        for a, b in zip(inputs, base_args, strict=True):
            if a not in norms:
                continue
            norm = model.get_submodule(str(a.target))
            bn = base_gm.get_submodule(str(b.target))
            raw = F.group_norm(cur[a.args[0].name], norm.num_groups, eps=norm.eps)  # type: ignore[union-attr]
            m_raw, sd_raw = _moments(raw)
            m_bn, sd_bn = _moments(ref[b.name])
            if len(inputs) == 1 and bn.affine:  # BN -> act: BN's affine is in the PNAct; match BN's normalised output
                ok = bn.weight.abs() > 1e-4
                m_bn = torch.where(ok, (m_bn - bn.bias) / torch.where(ok, bn.weight, 1.0), 0.0)
                sd_bn = torch.where(ok, sd_bn / bn.weight.abs().clamp_min(1e-4), 1.0)
            weight = scale * sd_bn / sd_raw.clamp_min(1e-6)
            norm.weight.copy_(weight)
            norm.bias.copy_(scale * m_bn - weight * m_raw)
            y = y + norm(cur[a.args[0].name])  # type: ignore[union-attr]
        if len(inputs) > 1:  # after an addition: undo the shortcut's affine map
            pn.weight.copy_(1.0 / scale)
            pn.bias.copy_(-shift / scale)
        m_y, sd_y = _moments(y)  # type: ignore[arg-type]
        pn.proxy_beta.copy_(m_y)
        pn.proxy_gamma.copy_(sd_y - 1.0)
    return model


def adaptable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """What a Tent-style method adapts in one layer (not its children): a PNAct's affine and proxy parameters, the
    affine weight and bias of a BatchNorm, LayerNorm, GroupNorm or UnMix-TNS layer, nothing for any other layer."""
    from tta.norm.convert import NORM_TYPES
    from tta.norm.unmix_tns import UnMixTNS

    if isinstance(module, PNAct):
        return module.affine_parameters()
    if isinstance(module, (*NORM_TYPES, UnMixTNS)):
        return [p for p in (getattr(module, "weight", None), getattr(module, "bias", None)) if p is not None]
    return []
