"""Splitting a classifier into features and a linear head, without knowing its architecture.

The head is the model's last ``nn.Linear`` (in module order); the features are that layer's input, captured by a
forward hook during one ordinary forward pass, so a split costs nothing beyond the forward itself and works for any
model whose output is that layer's output: the CIFAR ResNets, torchvision and timm ResNets, ViTs, ``nn.Sequential``
stacks. A model with no linear layer, or whose output is not its last linear layer's output (a softmax or a scale
after the head), raises ``ModelError``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tta.errors import ModelError


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last ``nn.Linear`` in module order (the classifier of a standard network)."""
    head = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            head = module
    if head is None:
        raise ModelError("this model has no nn.Linear layer to use as its classifier; use a model that ends in a "
                         "linear classifier over features (e.g. a ResNet's fc), or a method that needs none")
    return head


class FeatureSplit:
    """``split(x) -> (features, logits)``: the input and the output of the model's last linear layer.

    The model runs once, as usual; a forward hook on the head records its input. ``split.classifier`` is the head,
    so ``split.classifier(features)`` gives the logits again.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.classifier = last_linear(model)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}

        def hook(_: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            captured["features"], captured["logits"] = inputs[0], output

        handle = self.classifier.register_forward_hook(hook)
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        if "logits" not in captured:
            raise ModelError("the model's last nn.Linear layer was not called in its forward pass; use a model whose "
                             "output is computed by its final linear classifier")
        if logits is not captured["logits"]:
            raise ModelError("the model's output is not the output of its last nn.Linear layer (something follows "
                             "the classifier, e.g. a softmax); pass the model up to and including its linear head")
        features = captured["features"]
        if features.ndim != 2:
            raise ModelError(f"the features entering the classifier have shape {tuple(features.shape)}, not "
                             "(N, D); use a model whose head is a linear layer over pooled features")
        return features, logits


__all__ = ["FeatureSplit", "last_linear"]
