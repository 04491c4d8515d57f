"""The common interface of every adaptation method.

An ``AdaptedModel`` wraps a copy of a pretrained model. The framework owns ``forward`` (input checks, gradient
context), ``reset`` (restore the snapshot taken after ``configure``) and ``state_dict`` (model plus optimizer
state). A method implements the hooks:

- ``check_model(model)``: raise ``ModelError`` if the method cannot adapt this model;
- ``configure(model)``: set modes, swap layers, choose what requires grad; returns the model to use;
- ``params()``: the parameters the optimizer updates (empty for statistics-only methods);
- ``adapt(x, domain)``: predict a batch, adapting on the way; returns the logits of the prediction.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import nn

from tta.errors import InputError, ModelError


class AdaptedModel(nn.Module):
    """A model wrapped by a test-time adaptation method: call it on batches, ``reset()`` to return to the source."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]

    def __init__(self, model: nn.Module, config: Any | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}; pass the model object itself")
        self.config = config if config is not None else self.Config()
        model = copy.deepcopy(model)  # never modify the caller's model
        self.check_model(model)
        self.model = self.configure(model)
        self.in_channels = _input_channels(self.model)
        self.optimizer = self.make_optimizer()
        self._snapshot = copy.deepcopy(self.model.state_dict())

    # ----------------------------------------------------------------------------------------------- hooks
    def check_model(self, model: nn.Module) -> None:
        """Raise ``ModelError`` when this method cannot adapt ``model``."""

    def configure(self, model: nn.Module) -> nn.Module:
        """Prepare ``model`` for adaptation; the default puts it in eval mode with every parameter frozen."""
        model.eval()
        model.requires_grad_(False)
        return model

    def params(self) -> list[nn.Parameter]:
        """Parameters updated at test time; none by default."""
        return []

    def make_optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer over ``params()``, or ``None`` for methods that only update statistics."""
        return None

    def adapt(self, x: torch.Tensor, domain: torch.Tensor | None) -> torch.Tensor:
        """Return the logits for ``x``, updating the model as the method prescribes."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- framework
    def forward(self, x: torch.Tensor, domain: torch.Tensor | int | None = None) -> torch.Tensor:
        """Predict ``x`` (N, C, H, W) in [0, 1] and adapt; ``domain`` gives per-sample domain ids when known."""
        domain = self.check_input(x, domain)
        with torch.enable_grad() if self.optimizer is not None else torch.no_grad():
            return self.adapt(x, domain)

    def check_input(self, x: torch.Tensor, domain: torch.Tensor | int | None = None) -> torch.Tensor | None:
        """Validate a batch before anything changes; returns ``domain`` as a (N,) long tensor or ``None``."""
        if not isinstance(x, torch.Tensor):
            raise InputError(f"expected a torch.Tensor batch, got {type(x).__name__}; convert it with torch.as_tensor")
        if x.ndim != 4:
            raise InputError(
                f"expected a batch of shape (N, C, H, W), got shape {tuple(x.shape)}; "
                "add a batch dimension with x.unsqueeze(0) or reshape the input"
            )
        if not x.is_floating_point():
            raise InputError(f"expected float images in [0, 1], got dtype {x.dtype}; use x.float() / 255")
        if self.in_channels is not None and x.shape[1] != self.in_channels:
            raise InputError(
                f"the model expects {self.in_channels} input channels but the batch has {x.shape[1]}; "
                "pass images as (N, C, H, W) with channels second"
            )
        if x.shape[0] == 0:
            raise InputError("the batch is empty; pass at least one image")
        if not bool(torch.isfinite(x).all()):
            raise InputError("the batch contains NaN or inf values; clean or drop those images before adapting")
        if domain is None:
            return None
        domain = torch.as_tensor(domain, dtype=torch.long, device=x.device)
        if domain.ndim == 0:
            domain = domain.expand(x.shape[0])
        if domain.shape != (x.shape[0],):
            raise InputError(
                f"domain must be one id or one id per image ({x.shape[0]}), got shape {tuple(domain.shape)}"
            )
        if bool((domain < 0).any()):
            raise InputError("domain ids must be non-negative integers")
        return domain

    def reset(self) -> None:
        """Return to the source model: restore the snapshot and clear the optimizer state."""
        for module in self.model.modules():
            reset_structure = getattr(module, "reset_structure", None)
            if module is not self.model and callable(reset_structure):
                reset_structure()  # layers that grow at test time (per-domain branches) drop what they grew
        self.model.load_state_dict(self._snapshot, strict=True)
        self.optimizer = self.make_optimizer()

    def get_extra_state(self) -> dict[str, Any]:
        """Optimizer state travels with ``state_dict()`` so that a saved adapted model resumes exactly.

        A deep copy: optimizers load state by reference, and two models must never share Adam moments.
        """
        return {"optimizer": None if self.optimizer is None else copy.deepcopy(self.optimizer.state_dict())}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Counterpart of ``get_extra_state``."""
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])

    def extra_repr(self) -> str:
        return f"method={self.name!r}, config={self.config}"


def _input_channels(model: nn.Module) -> int | None:
    """Channels of the first convolution, used to reject batches laid out the wrong way."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return None


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample softmax entropy H = -sum_c p_c log p_c."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
