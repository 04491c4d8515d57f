"""Model loading: robustbench's zoo, torchvision, timm, and the classic CIFAR ResNets."""

from tta.models.resnet_cifar import DEPTHS, CifarResNet, cifar_resnet
from tta.models.zoo import Normalize, load_model

__all__ = ["DEPTHS", "CifarResNet", "Normalize", "cifar_resnet", "load_model"]
