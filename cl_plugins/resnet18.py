"""The reduced-stem ResNet-18 that continual-learning papers use on CIFAR (Mammoth's ``resnet18``).

He et al.'s ResNet-18 (four stages of two basic blocks, widths ``nf, 2nf, 4nf, 8nf``) with the CIFAR
stem: one 3x3 convolution of stride 1 and no max-pooling, global average pooling, a linear head.
Projection shortcuts (1x1 conv + BatchNorm) where the shape changes. ``nf=64`` is the network of the
DER and k-FPF papers' Seq-CIFAR-10 tables (11.2M parameters); a smaller ``nf`` gives the reduced-width
variant used for CPU runs.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual connection (projected when the shape changes)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem; ``forward_features`` gives the pooled ``8 * nf`` features."""

    def __init__(self, num_classes: int = 10, nf: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        if nf < 1:
            raise ValueError(f"nf (the first stage's width) must be >= 1, got {nf}")
        self.conv1 = nn.Conv2d(in_channels, nf, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        planes, stages = nf, []
        in_planes = nf
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = nf * 2**i
            blocks = [BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)]
            in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = in_planes
        self.linear = nn.Linear(in_planes, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.forward_features(x))
