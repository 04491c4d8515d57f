"""The original CIFAR ResNet family (He et al. 2016, section 4.2): ResNet-20/32/44/56/110.

conv3x3(3->16)-BN-ReLU, three stages of n BasicBlocks (16, 32, 64 channels; stride 2 at the first block of stages
2 and 3), global average pool, linear. Down-sampling shortcuts are "option A": the identity on x[:, :, ::2, ::2]
zero-padded with planes//4 channels on each side, without parameters. Module names match the public
akamaster/pytorch_resnet_cifar10 checkpoints (conv1, bn1, layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}, linear).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEPTHS: dict[str, int] = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an option-A shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if (stride != 1 or in_planes != planes) else 0

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if not self.pad:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs with ``n`` blocks per stage (depth 6n + 2)."""

    def __init__(self, n: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes, layers = 16, []
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(planes, width, stride if i == 0 else 1))
                planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(arch: str, num_classes: int = 10) -> CifarResNet:
    """Build ``resnet20`` ... ``resnet110`` (randomly initialised)."""
    from tta.errors import ConfigError

    if arch not in DEPTHS:
        raise ConfigError(f"unknown architecture {arch!r}; choose one of: {', '.join(DEPTHS)}")
    return CifarResNet(DEPTHS[arch], num_classes)
