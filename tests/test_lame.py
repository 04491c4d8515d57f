"""LAME: nothing in the model changes, the prediction is a fixed point of its iteration, the feature split is exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tta
from tta.methods.lame import affinity_matrix
from tta.models import cifar_resnet
from tta.models.surgery import FeatureSplit


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_lame_never_changes_parameters_or_statistics(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "lame")
    before = _state(adapted.model)
    for _ in range(3):
        adapted(torch.rand(16, 3, 16, 16))
    after = _state(adapted.model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(v, after[k]) for k, v in bn_model.state_dict().items())  # still the source model
    assert not adapted.model.training


@pytest.mark.parametrize("affinity", ["knn", "rbf", "linear"])
def test_prediction_is_a_fixed_point_of_the_laplacian_iteration(bn_model: nn.Module, affinity: str) -> None:
    adapted = tta.adapt(bn_model, "lame", affinity=affinity, max_steps=1000)
    x = torch.rand(24, 3, 16, 16)
    y = adapted(x).exp()
    torch.testing.assert_close(y.sum(1), torch.ones(24))
    features, logits = FeatureSplit(bn_model)(x)
    features = features / features.norm(dim=1, keepdim=True)
    if affinity == "knn":  # brute force: 1 for the 5 nearest other images
        dist = torch.cdist(features, features) + torch.eye(24) * 1e9
        kernel = torch.zeros(24, 24)
        for i in range(24):
            kernel[i, dist[i].argsort()[:5]] = 1.0
    elif affinity == "linear":
        kernel = features @ features.T
    else:  # sigma: mean distance to the 5th nearest, the image itself first
        dist = torch.cdist(features, features)
        sigma = dist.sort(1).values[:, 4].mean()
        kernel = torch.exp(-dist**2 / (2 * sigma**2))
    update = (torch.log(logits.softmax(1) + 1e-10) + kernel @ y).softmax(1)
    torch.testing.assert_close(update, y, atol=1e-4, rtol=0)


def test_an_ambiguous_image_takes_the_label_of_its_neighbours() -> None:
    identity = nn.Linear(2, 2)  # logits = features = the two input values
    with torch.no_grad():
        identity.weight.copy_(torch.eye(2))
        identity.bias.zero_()
    model = nn.Sequential(nn.Flatten(), identity)
    cluster_a = [[0.6 + 0.01 * i, 0.4] for i in range(6)]  # class 0
    cluster_b = [[0.1, 0.9 - 0.01 * i] for i in range(6)]  # class 1
    ambiguous = [[0.49, 0.51]]  # slightly class 1, but its nearest features are cluster a's
    x = torch.tensor(cluster_a + cluster_b + ambiguous).view(-1, 2, 1, 1)
    assert model(x).argmax(1)[-1] == 1
    labels = tta.adapt(model, "lame", affinity="knn")(x).argmax(1)
    assert labels.tolist() == [0] * 6 + [1] * 6 + [0]


def test_single_and_identical_images_give_finite_predictions(bn_model: nn.Module) -> None:
    adapted = tta.adapt(bn_model, "lame")
    assert torch.isfinite(adapted(torch.rand(1, 3, 16, 16))).all()
    assert torch.isfinite(adapted(torch.rand(1, 3, 16, 16).expand(6, -1, -1, -1))).all()
    assert torch.isfinite(affinity_matrix(torch.ones(4, 8), "rbf", 5)).all()


@pytest.mark.parametrize("make", [
    lambda: cifar_resnet("resnet20"),
    lambda: __import__("torchvision").models.resnet18(num_classes=10),
    lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)),
], ids=["cifar-resnet20", "torchvision-resnet18", "sequential"])
def test_feature_split_gives_the_model_logits(make: object) -> None:
    model = make().eval()  # type: ignore[operator]
    x = torch.rand(4, 3, 32, 32)
    split = FeatureSplit(model)
    with torch.no_grad():
        features, logits = split(x)
        torch.testing.assert_close(logits, model(x), atol=0, rtol=0)
        torch.testing.assert_close(split.classifier(features), logits, atol=0, rtol=0)
    assert features.shape == (4, split.classifier.in_features)


def test_lame_on_a_model_without_a_linear_classifier_is_a_model_error() -> None:
    conv_only = nn.Sequential(nn.Conv2d(3, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(tta.ModelError, match="linear classifier"):
        tta.adapt(conv_only, "lame")
    with pytest.raises(tta.ModelError, match=r"no nn\.Linear"):
        FeatureSplit(conv_only)


def test_a_model_whose_output_is_not_its_last_linear_layer_is_a_model_error() -> None:
    softmaxed = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 10), nn.Softmax(1))
    adapted = tta.adapt(softmaxed, "lame")
    with pytest.raises(tta.ModelError, match=r"not the output of its last nn\.Linear"):
        adapted(torch.rand(4, 3, 4, 4))


def test_bad_settings_are_rejected() -> None:
    for bad in ({"affinity": "cosine"}, {"knn": 0}, {"max_steps": 1.5}, {"bound_lambda": float("nan")}):
        with pytest.raises(tta.ConfigError):
            tta.adapt(nn.Sequential(nn.Flatten(), nn.Linear(3, 2)), "lame", **bad)
