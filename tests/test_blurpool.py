"""resnet/blurpool.py: a fixed low-pass filter in front of every strided convolution, FFCV's way, that leaves
the parameters and the state_dict as they were."""

import copy

import pytest
import torch
import torchvision
from torch import nn

from resnet import ARCH_NAMES, BlurConv2d, build_model
from resnet.blurpool import MIN_CHANNELS
from test_model import input_for, max_relative_error, randomise_batchnorm


def strided_convs(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and max(m.stride) > 1 and m.in_channels >= MIN_CHANNELS]


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_same_parameters_and_initial_weights_with_the_blur_in_front_of_every_strided_conv(arch):
    torch.manual_seed(0)
    plain = build_model(arch, num_classes=10)
    torch.manual_seed(0)
    blurred = build_model(arch, num_classes=10, blurpool=True)
    assert [n for n, m in blurred.named_modules() if isinstance(m, BlurConv2d)] == strided_convs(plain) != []
    assert not isinstance(blurred.conv1, BlurConv2d), "the 3-channel stem keeps its plain convolution"
    a, b = plain.state_dict(), blurred.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sum(p.numel() for p in blurred.parameters()) == sum(p.numel() for p in plain.parameters())
    assert all(not buf.requires_grad for name, buf in blurred.named_buffers() if name.endswith("blur_filter"))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_forward_backward_with_blurpool(arch):
    model = build_model(arch, num_classes=10, blurpool=True).train()
    out = model(input_for(arch, cifar_stem=True))  # 32 px: every strided conv still sees a 2x2 map or more
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([1, 7])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_the_filter_is_a_fixed_binomial_low_pass():
    conv = BlurConv2d(16, 8, 3, stride=2, padding=1, bias=False)
    k = conv.blur_filter
    assert k.shape == (16, 1, 3, 3) and torch.allclose(k.sum(dim=(1, 2, 3)), torch.ones(16))
    assert torch.equal(k[0, 0] * 16, torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]))
    nn.init.dirac_(conv.weight[:, :8])  # a conv that passes its first 8 channels through, subsampled
    nn.init.zeros_(conv.weight[:, 8:])
    stripes = torch.zeros(1, 16, 8, 8)
    stripes[..., ::2] = 1.0  # the highest frequency there is: exactly what a stride-2 sample aliases
    out = conv(stripes)[:, :, 1:-1, 1:-1]  # away from the zero padding
    assert torch.allclose(out, torch.full_like(out, 0.5)), "the blur averages the stripes to their mean"


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet20"])
def test_a_shifted_input_moves_the_output_less_with_blurpool(arch):
    torch.manual_seed(0)
    plain = build_model(arch, num_classes=10).eval()
    blurred = copy.deepcopy(plain)
    for name in strided_convs(plain):  # the same weights, only the blur added
        parent, _, child = name.rpartition(".")
        setattr(blurred.get_submodule(parent), child, BlurConv2d.like(plain.get_submodule(name)))
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    shifted = torch.roll(x, 1, dims=3)
    with torch.no_grad():
        moved = [((net(x) - net(shifted)).norm() / net(x).norm()).item() for net in (plain, blurred)]
    assert moved[1] < moved[0], moved


def test_channels_last_gives_the_same_result():
    torch.manual_seed(0)
    nchw = build_model("resnet50", num_classes=10, blurpool=True)
    randomise_batchnorm(nchw, seed=1)
    nchw.eval()
    nhwc = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    x = input_for("resnet50", cifar_stem=False)
    with torch.no_grad():
        assert max_relative_error(nhwc(x.to(memory_format=torch.channels_last)), nchw(x)) < 1e-4


def test_blurpool_weights_load_into_torchvision_strictly():
    model = build_model("resnet18", num_classes=10, blurpool=True)
    torchvision.models.resnet18(num_classes=10).load_state_dict(model.state_dict(), strict=True)
