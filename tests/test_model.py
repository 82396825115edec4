"""resnet/model.py and build_model: equality with the installed torchvision, and every
architecture trains (forward, backward, channels_last) on the CPU."""

import copy
import subprocess
import sys

import pytest
import torch
import torchvision
from torch import nn

from resnet import ARCH_NAMES, build_model
from resnet.cifar import CIFAR_ARCHS
from resnet.model import IMAGENET_ARCHS, BasicBlock, Bottleneck

IMAGENET = tuple(IMAGENET_ARCHS)


def torchvision_model(arch: str) -> nn.Module:
    return getattr(torchvision.models, arch)(weights=None)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def randomise_batchnorm(model: nn.Module, seed: int) -> None:
    """Give every BN distinct affine and running statistics, so a swapped BN changes the output."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = torch.rand(c, generator=g) * 0.5 + 0.5
            m.bias.data = torch.randn(c, generator=g) * 0.1
            m.running_mean = torch.randn(c, generator=g) * 0.1
            m.running_var = torch.rand(c, generator=g) + 0.5


def test_arch_names_cover_both_tables():
    assert set(ARCH_NAMES) == set(IMAGENET) | set(CIFAR_ARCHS)
    assert len(ARCH_NAMES) == 14 and all(hasattr(torchvision.models, a) for a in IMAGENET)


@pytest.mark.parametrize("arch", IMAGENET)
def test_parameters_and_state_dict_match_torchvision(arch):
    ours, theirs = build_model(arch), torchvision_model(arch)
    assert n_params(ours) == n_params(theirs)
    shapes = lambda m: [(k, tuple(v.shape)) for k, v in m.state_dict().items()]  # noqa: E731
    assert shapes(ours) == shapes(theirs)  # same names, same order, same shapes


def test_resnet50_parameter_count():
    assert n_params(build_model("resnet50")) == 25_557_032


@pytest.mark.parametrize("arch", IMAGENET)
def test_weights_move_both_ways(arch):
    ours, theirs = build_model(arch).eval(), torchvision_model(arch).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    randomise_batchnorm(theirs, seed=1)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with torch.no_grad():
        expected, got = theirs(x), ours(x)
    assert expected.std() > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())

    randomise_batchnorm(ours, seed=2)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        expected, got = ours(x), theirs(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def input_for(arch: str, cifar_stem: bool) -> torch.Tensor:
    size = 32 if cifar_stem or arch in CIFAR_ARCHS else 64  # tiny inputs keep the big networks fast
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))  # batch 2: BN in train mode


def aten_ops(model: nn.Module, x: torch.Tensor) -> list:
    """Every aten op, with its input shapes, run by one forward + backward, in order."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        nn.functional.cross_entropy(model(x), torch.tensor([1, 7])).backward()
    return [(e.name, e.input_shapes) for e in prof.events() if e.name.startswith("aten::")]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_same_aten_ops_as_torchvision(arch):
    # Same kernels on the same shapes in the same order: then the speed is the same too, which
    # the timing in bench/bench_model.py can only confirm within the noise of the machine.
    x = input_for(arch, cifar_stem=True)
    ours, theirs = aten_ops(build_model(arch), x), aten_ops(torchvision_model(arch), x)
    assert len(ours) > 100 and ours == theirs


@pytest.mark.parametrize("arch,cifar_stem", [(a, False) for a in ARCH_NAMES] + [("resnet18", True), ("resnet50", True)])
def test_forward_backward(arch, cifar_stem):
    model = build_model(arch, num_classes=10, cifar_stem=cifar_stem).train()
    x = input_for(arch, cifar_stem)
    out = model(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([1, 7])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_cifar_stem_keeps_resolution():
    model = build_model("resnet18", cifar_stem=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    seen = []
    model.layer4.register_forward_hook(lambda m, i, o: seen.append(o.shape[-2:]))
    model(torch.randn(2, 3, 32, 32))
    assert seen == [(4, 4)]  # three stride-2 stages after a stride-1 stem: 32 / 8
    assert build_model("resnet20", cifar_stem=True).conv1.stride == (1, 1)  # accepted, nothing to change


def max_relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


# Two checks, because float32 gradients are not a stable thing to compare: wherever a
# pre-activation lies within rounding of zero, ReLU (or max-pool) decides differently in the
# two layouts and single gradients move by percents — in torchvision's model as in ours — and
# in train mode, batch statistics over a few 2×2 maps make a 1e-7 change of the input move
# resnet50's float32 gradients by ~20 %. So: float32 forward with the channels_last kernels we
# train with, and the whole training step (forward, every gradient) in float64, where the two
# layouts agree to ~1e-12.
@pytest.mark.parametrize("train,dtype,tol", [pytest.param(False, torch.float32, 1e-4, id="eval-float32"),
                                             pytest.param(True, torch.float64, 1e-9, id="train-float64")])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnext50_32x4d", "resnet20"])
def test_channels_last_matches_nchw(arch, train, dtype, tol):
    torch.manual_seed(0)
    nchw = build_model(arch, num_classes=10)
    randomise_batchnorm(nchw, seed=1)
    nchw = nchw.to(dtype).train(train)
    nhwc = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    x = input_for(arch, cifar_stem=False).to(dtype)
    formats = []
    nhwc.layer3.register_forward_hook(
        lambda m, i, o: formats.append(o.is_contiguous(memory_format=torch.channels_last)))

    outs = []
    for model, inp in ((nchw, x), (nhwc, x.to(memory_format=torch.channels_last))):
        out = model(inp)
        nn.functional.cross_entropy(out, torch.tensor([1, 7])).backward()
        outs.append(out.detach())
    assert formats == [True]  # the activations really ran in channels_last
    assert max_relative_error(outs[1], outs[0]) < tol
    if dtype == torch.float64:
        for (name, p), q in zip(nchw.named_parameters(), nhwc.parameters()):
            assert max_relative_error(q.grad, p.grad) < tol, name


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "resnet20"])
def test_zero_init_residual(arch):
    def last_bns(model):
        blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
        return [b.bn3 if isinstance(b, Bottleneck) else b.bn2 for b in blocks]

    zeroed, default = build_model(arch, zero_init_residual=True), build_model(arch)
    assert len(last_bns(zeroed)) > 0
    assert all((bn.weight == 0).all() for bn in last_bns(zeroed))
    assert all((bn.weight == 1).all() for bn in last_bns(default))
    assert (zeroed.bn1.weight == 1).all() and (zeroed.layer1[0].bn1.weight == 1).all()  # only the last BN


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError) as excinfo:
        build_model("resnet5O")
    message = str(excinfo.value)
    assert "'resnet5O'" in message and "\n" not in message
    assert all(name in message for name in ARCH_NAMES)


def test_resnet_imports_only_torch():
    code = ("import sys, resnet; "
            "print([m for m in sys.modules if m.split('.')[0] in ('torchvision', 'timm')])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
