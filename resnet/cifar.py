"""The CIFAR-10 ResNets of He et al. 2016 §4.2 (arXiv:1512.03385): resnet20, 32, 44, 56, 110.

Depth 6n+2: a 3×3 conv with 16 filters, three stages of n BasicBlocks with 16, 32 and 64
filters on 32×32, 16×16 and 8×8 maps, global average pooling, fc.

Shortcuts are option A, as in the paper's CIFAR experiments: identity everywhere, and where
a stage halves the resolution and doubles the width, subsample by 2 and pad the new
channels with zeros. Option A has no parameters, which is what gives the paper's counts
(0.27M / 0.46M / 0.66M / 0.85M / 1.7M with 10 classes); option B's projections would make
resnet32 0.47M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import BasicBlock, conv3x3, init_weights


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: keep every ``stride``-th position and zero-pad up to ``out_channels``."""

    def __init__(self, out_channels: int, stride: int) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_channels - x.shape[1]))  # pad order: W, H, then C

    def extra_repr(self) -> str:
        return f"out_channels={self.out_channels}, stride={self.stride}"


class CifarResNet(nn.Module):
    """He et al. 2016 §4.2 network with ``n`` blocks per stage (depth 6n+2)."""

    def __init__(self, n: int, num_classes: int = 10, *, zero_init_residual: bool = False) -> None:
        super().__init__()
        self.in_channels = 16
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        init_weights(self, zero_init_residual)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.in_channels != planes:
            downsample = ZeroPadShortcut(planes, stride)
        stage = [BasicBlock(self.in_channels, planes, stride, downsample)]
        self.in_channels = planes
        stage += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# name -> n, the number of BasicBlocks per stage (depth 6n+2).
CIFAR_ARCHS: dict[str, int] = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}
