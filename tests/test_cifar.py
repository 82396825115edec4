"""resnet/cifar.py: the He et al. 2016 §4.2 networks have the paper's shape and size."""

import pytest
import torch
from torch import nn

from resnet import build_model
from resnet.cifar import CIFAR_ARCHS, ZeroPadShortcut

# Table 6 of He et al. 2016, 10 classes, with the paper's precision.
PAPER_PARAMS = {"resnet20": "0.27M", "resnet32": "0.46M", "resnet44": "0.66M", "resnet56": "0.85M", "resnet110": "1.7M"}


@pytest.mark.parametrize("arch", CIFAR_ARCHS)
def test_parameter_count_matches_paper(arch):
    n = sum(p.numel() for p in build_model(arch, num_classes=10).parameters())
    decimals = len(PAPER_PARAMS[arch].split(".")[1]) - 1
    assert f"{n / 1e6:.{decimals}f}M" == PAPER_PARAMS[arch]


@pytest.mark.parametrize("arch", CIFAR_ARCHS)
def test_depth_and_stages(arch):
    model = build_model(arch, num_classes=10)
    n = CIFAR_ARCHS[arch]
    weighted = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == 6 * n + 2 == int(arch.removeprefix("resnet"))
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [n, n, n]
    sizes = []
    for stage in (model.layer1, model.layer2, model.layer3):
        stage.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:])))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sizes == [(16, 32, 32), (32, 16, 16), (64, 8, 8)]


def test_shortcuts_are_option_a():
    model = build_model("resnet20", num_classes=10)
    shortcuts = [b.downsample for b in model.modules() if hasattr(b, "downsample") and b.downsample is not None]
    assert len(shortcuts) == 2  # entering stage 2 and stage 3
    assert all(isinstance(s, ZeroPadShortcut) and not list(s.parameters()) for s in shortcuts)


def test_zero_pad_shortcut_subsamples_and_pads():
    x = torch.randn(2, 16, 8, 8)
    y = ZeroPadShortcut(32, stride=2)(x)
    assert y.shape == (2, 32, 4, 4)
    torch.testing.assert_close(y[:, :16], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert (y[:, 16:] == 0).all()
