"""ResNet, ResNeXt and Wide ResNet for ImageNet, written with torch.nn only.

Module names follow torchvision's ``models/resnet.py`` exactly (``conv1``, ``bn1``,
``layer1.0.downsample.0``, ``fc`` ...), so state_dicts move between the two without
renaming; tests/test_model.py checks this against the installed torchvision.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def conv3x3(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3×3 convolution that keeps the size at stride 1; no bias because a BatchNorm follows."""
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1×1 convolution without bias (a BatchNorm follows)."""
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions plus a shortcut; ``downsample`` maps the input to the output shape."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock takes no groups or width_per_group; ResNeXt and Wide ResNet use Bottleneck")
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Shortcut after the branch, so a projection's output is not held through it; the add
        # is in place to save one activation-sized allocation per block.
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3 (grouped for ResNeXt), 1×1 expand by ``expansion``, plus a shortcut.

    ResNet v1.5: the stride sits on the 3×3 conv, not on the first 1×1 as in He et al. 2015.
    A strided 1×1 reads only a quarter of its input positions; moving the stride to the 3×3
    lets every input position contribute, for about +0.5 % top-1 at ~5 % more compute
    (NVIDIA's ResNet-50 v1.5 recipe). torchvision's ImageNet weights are v1.5 too.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, base_width: int = 64) -> None:
        super().__init__()
        # base_width/64 scales the inner width (Wide ResNet), groups splits it (ResNeXt).
        width = planes * base_width // 64 * groups
        self.conv1 = conv1x1(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


def init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    """Initialise every conv and BatchNorm of ``model`` in place (the fc keeps PyTorch's default)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            # He et al. 2015: variance 2/fan_out keeps the gradient scale constant through ReLU convs.
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            # Unit scale, zero shift: every BN starts by passing normalised activations through unchanged.
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        # Each residual branch starts at zero, so every block is the identity and the deep net
        # starts as a shallow one: +0.2–0.3 % top-1 (Goyal et al. 2017, arXiv:1706.02677).
        for m in model.modules():
            if isinstance(m, (BasicBlock, Bottleneck)):
                m.zero_init_last()


class ResNet(nn.Module):
    """ImageNet ResNet: stem, four stages of ``layers[i]`` blocks (64-128-256-512 planes), pool, fc.

    ``cifar_stem`` replaces the 7×7 stride-2 conv and max-pool (4× downsampling) by one 3×3
    stride-1 conv, so 32×32 inputs still reach layer4 at 4×4.
    """

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: tuple[int, int, int, int],
                 num_classes: int = 1000, *, groups: int = 1, width_per_group: int = 64,
                 cifar_stem: bool = False, zero_init_residual: bool = False) -> None:
        super().__init__()
        self.groups = groups
        self.base_width = width_per_group
        self.in_channels = 64
        if cifar_stem:
            self.conv1 = conv3x3(3, 64)
        else:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_weights(self, zero_init_residual)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int,
                    stride: int = 1) -> nn.Sequential:
        """One stage; only its first block changes resolution or width, through a projection shortcut."""
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or self.in_channels != out_channels:
            downsample = nn.Sequential(conv1x1(self.in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))
        stage = [block(self.in_channels, planes, stride, downsample, self.groups, self.base_width)]
        self.in_channels = out_channels
        stage += [block(out_channels, planes, groups=self.groups, base_width=self.base_width) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# name -> (block, blocks per stage, ResNet options). ResNeXt "32x4d": 32 groups of width 4;
# Wide ResNet "_2": inner 3×3 twice as wide (width_per_group 128 instead of 64).
IMAGENET_ARCHS: dict[str, tuple[type[BasicBlock | Bottleneck], tuple[int, int, int, int], dict]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2), {}),
    "resnet34": (BasicBlock, (3, 4, 6, 3), {}),
    "resnet50": (Bottleneck, (3, 4, 6, 3), {}),
    "resnet101": (Bottleneck, (3, 4, 23, 3), {}),
    "resnet152": (Bottleneck, (3, 8, 36, 3), {}),
    "resnext50_32x4d": (Bottleneck, (3, 4, 6, 3), dict(groups=32, width_per_group=4)),
    "resnext101_32x8d": (Bottleneck, (3, 4, 23, 3), dict(groups=32, width_per_group=8)),
    "wide_resnet50_2": (Bottleneck, (3, 4, 6, 3), dict(width_per_group=128)),
    "wide_resnet101_2": (Bottleneck, (3, 4, 23, 3), dict(width_per_group=128)),
}
