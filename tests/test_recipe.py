"""engine.recipe: the optimizer comes from timm's factory, and SGD is bit for bit the one the trainer had."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from data import build_train_loader
from engine.batches import DeviceBatch
from engine.config import parse_config
from engine.recipe import build_optimizer, peak_lr
from resnet import build_model


def config(*argv):
    return parse_config(["--synthetic", *argv])


def hand_written_sgd(model, lr, weight_decay, momentum, nesterov):
    """The trainer's optimizer before timm's factory made it, for the comparison."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)


@pytest.mark.parametrize("nesterov", [False, True])
def test_opt_sgd_gives_bit_identical_weights_to_the_hand_written_sgd(nesterov):
    cfg = config("--lr", "0.4", "--weight-decay", "5e-4", "--batch-size", "16", *(["--nesterov"] * nesterov))
    torch.manual_seed(0)
    ours = build_model("resnet20", num_classes=10)
    theirs = copy.deepcopy(ours)
    runs = [(ours, build_optimizer(cfg.optim, ours, world_size=1)),
            (theirs, hand_written_sgd(theirs, 0.4 * 16 / 256, 5e-4, 0.9, nesterov))]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = torch.randn(16, 3, 32, 32, generator=g), torch.randint(0, 10, (16,), generator=g)
        for model, opt in runs:
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name
    assert [len(g["params"]) for g in runs[0][1].param_groups] == [len(g["params"]) for g in runs[1][1].param_groups]


@pytest.mark.parametrize("arch", ["resnet50", "resnext50_32x4d", "resnet20"])
def test_weight_decay_is_off_for_exactly_the_one_dimensional_parameters(arch):
    model = build_model(arch, num_classes=10)
    opt = build_optimizer(config("--weight-decay", "1e-4").optim, model, world_size=1)
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert set(by_decay) == {1e-4, 0.0} and opt.param_groups[0]["weight_decay"] == 1e-4  # decayed group first
    assert by_decay[0.0] == {id(p) for p in model.parameters() if p.ndim <= 1}
    assert by_decay[1e-4] == {id(p) for p in model.parameters() if p.ndim > 1}


def test_lr_is_per_256_images_scaled_linearly_or_by_the_square_root():
    linear = config("--lr", "0.1", "--batch-size", "256", "--grad-accum", "2")
    assert peak_lr(linear.optim, world_size=8) == pytest.approx(0.1 * 16)
    sqrt = config("--opt", "lamb", "--lr", "0.1", "--batch-size", "256", "--lr-scaling", "sqrt")
    assert peak_lr(sqrt.optim, world_size=16) == pytest.approx(0.1 * 4)


def test_nesterov_with_an_optimizer_without_momentum_is_refused(capsys):
    with pytest.raises(SystemExit):
        config("--opt", "adamw", "--nesterov")
    assert "--nesterov applies to --opt sgd or lars, not adamw" in capsys.readouterr().err


@pytest.mark.parametrize("opt, lr", [("lars", 10.0), ("lamb", 0.01), ("adamw", 0.004)])
def test_each_optimizer_lowers_the_loss_on_the_digits(digits_shards, opt, lr):
    cfg = config("--opt", opt, "--lr", str(lr), "--batch-size", "64", "--weight-decay", "5e-4")
    images, labels = next(iter(build_train_loader(digits_shards, batch_size=64, num_workers=0, image_size=32)))
    images, labels, _ = DeviceBatch(cfg.augment, torch.device("cpu"), 10, channels_last=False,
                                    label_smoothing=0.0)(images, labels, train=False)
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10)
    optimizer = build_optimizer(cfg.optim, model, world_size=1)
    assert type(optimizer).__name__.lower() == opt
    losses = []
    for _ in range(12):
        loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
