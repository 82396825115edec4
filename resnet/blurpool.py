"""BlurPool (Zhang 2019, "Making convolutional networks shift-invariant again", arXiv:1904.11486).

A strided convolution samples its input every other pixel, so a one-pixel shift of the image can change
its output a lot (aliasing). Low-pass filtering the input first removes the frequencies that alias.
We apply it as FFCV's ResNet recipes do (their ``BlurPoolConv2d``): every convolution with a stride
above 1 and at least 16 input channels (so not the 3-channel stem) first blurs its input with a fixed 3×3
binomial filter [1 2 1]ᵀ[1 2 1] / 16, one per channel, at stride 1 with zero padding of 1, then runs
unchanged at its own stride. Zhang reports around +0.5 to +1 % top-1 on ImageNet across networks.

``BlurConv2d`` is an ``nn.Conv2d`` and its filter a non-persistent buffer, so a network with BlurPool
has the same parameters and the same state_dict keys and tensors as without it: its weights load
into torchvision's resnet (which would then compute without the blur; build it with
``build_model(arch, blurpool=True)`` to get the network they were trained in).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIN_CHANNELS = 16  # FFCV's rule: the stem (3 input channels) keeps its plain strided convolution


class BlurConv2d(nn.Conv2d):
    """A Conv2d whose input is first low-pass filtered, per channel, at stride 1."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        binomial = torch.tensor([1.0, 2.0, 1.0])
        kernel = torch.outer(binomial, binomial) / 16
        self.register_buffer("blur_filter", kernel.expand(self.in_channels, 1, 3, 3).clone(), persistent=False)

    @classmethod
    def like(cls, conv: nn.Conv2d) -> "BlurConv2d":
        """The same convolution (hyper-parameters, weights) with the blur in front."""
        blur = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                   dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                   padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        blur.load_state_dict(conv.state_dict())
        return blur

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv2d(x, self.blur_filter.to(x.dtype), padding=1, groups=self.in_channels)
        return super().forward(x)


def add_blurpool(model: nn.Module) -> nn.Module:
    """Put the blur in front of every strided convolution with at least MIN_CHANNELS inputs, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d and max(child.stride) > 1 and child.in_channels >= MIN_CHANNELS:
                setattr(parent, name, BlurConv2d.like(child))
    return model
