"""Backbones of the continual-learning literature, one head over all classes seen.

- :func:`reduced_resnet18`: ResNet-18 with ``nf = 20`` (~1.1 M parameters), the GEM lineage
  (Lopez-Paz & Ranzato 2017; used by ER, MIR, GDumb, SCR, CarM on CIFAR).
- :func:`resnet18`: ``nf = 64``, 3x3 stem and no max-pool: the DER / Mammoth one (~11 M).
- :class:`MLP`: two hidden layers of 100 units for MNIST-like inputs (Mammoth's ``MNISTMLP``).

Every model has ``features(x)`` (penultimate features) and ``classifier`` (the last linear layer),
which coreset selection (GCR) and saliency maps need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stem, no max-pool, four stages of two blocks."""

    def __init__(self, num_classes: int, nf: int = 20, in_channels: int = 3) -> None:
        super().__init__()
        self.in_planes = nf
        self.conv1 = nn.Conv2d(in_channels, nf, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        self.layer1 = self._stage(nf, 2, 1)
        self.layer2 = self._stage(2 * nf, 2, 2)
        self.layer3 = self._stage(4 * nf, 2, 2)
        self.layer4 = self._stage(8 * nf, 2, 2)
        self.classifier = nn.Linear(8 * nf, num_classes)
        # NHWC: oneDNN's convolutions run faster on it than on NCHW on CPU (a reduced ResNet-18 step
        # of 32 + 32 Fashion-MNIST images: ~1.3-1.5x at one thread, measured); GPUs take it as well.
        # ``.to(device)`` keeps the format; ``features`` converts its input.
        self.to(memory_format=torch.channels_last)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def reduced_resnet18(num_classes: int, in_channels: int = 3) -> ResNet:
    """The GEM-lineage reduced ResNet-18 (nf = 20, ~1.1 M parameters)."""
    return ResNet(num_classes, nf=20, in_channels=in_channels)


def resnet18(num_classes: int, in_channels: int = 3) -> ResNet:
    """The DER / Mammoth ResNet-18 (nf = 64, ~11 M parameters)."""
    return ResNet(num_classes, nf=64, in_channels=in_channels)


class MLP(nn.Module):
    """``in_features -> 100 -> 100 -> num_classes`` with ReLU (Mammoth's MNISTMLP)."""

    def __init__(self, num_classes: int, in_features: int = 784, hidden: int = 100) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(),
                                  nn.Linear(hidden, hidden), nn.ReLU())
        self.classifier = nn.Linear(hidden, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
