"""The ResNet family by name: ``build_model("resnet50")``; imports only torch.

build_model lives here rather than in model.py because it dispatches over both tables,
and cifar.py already imports its blocks from model.py.
"""

from __future__ import annotations

from torch import nn

from .blurpool import BlurConv2d, add_blurpool
from .cifar import CIFAR_ARCHS, CifarResNet
from .model import IMAGENET_ARCHS, BasicBlock, Bottleneck, ResNet

ARCH_NAMES: tuple[str, ...] = (*IMAGENET_ARCHS, *CIFAR_ARCHS)


def build_model(arch: str, num_classes: int = 1000, *, cifar_stem: bool = False,
                zero_init_residual: bool = False, blurpool: bool = False) -> nn.Module:
    """A freshly initialised network named in ``ARCH_NAMES``.

    ``cifar_stem`` gives the ImageNet networks a 3×3 stride-1 stem without max-pool for
    32×32 inputs; resnet20..110 always have that stem, so they ignore it. ``blurpool`` blurs the
    input of each strided convolution (resnet/blurpool.py): same parameters, same initial weights,
    same state_dict keys.
    Raises ValueError, naming the valid choices, for an unknown ``arch``.
    """
    if arch in IMAGENET_ARCHS:
        block, layers, options = IMAGENET_ARCHS[arch]
        model = ResNet(block, layers, num_classes, cifar_stem=cifar_stem,
                       zero_init_residual=zero_init_residual, **options)
    elif arch in CIFAR_ARCHS:
        model = CifarResNet(CIFAR_ARCHS[arch], num_classes, zero_init_residual=zero_init_residual)
    else:
        raise ValueError(f"unknown architecture {arch!r}; valid names: {', '.join(ARCH_NAMES)}")
    return add_blurpool(model) if blurpool else model


__all__ = ["ARCH_NAMES", "build_model", "BasicBlock", "Bottleneck", "ResNet", "CifarResNet", "BlurConv2d",
           "add_blurpool"]
