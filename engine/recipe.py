"""What is trained and how: the network, the optimizer, the LR schedule, the EMA copy and the loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from resnet import build_model
from resnet.model import IMAGENET_ARCHS

from .options import ModelConfig, OptimConfig, ScheduleConfig


class ScheduleClock:
    """Where the run is in its LR schedule, in optimizer steps of this run's epochs: the trainer sets it from
    the share of each epoch's images used so far (Trainer.schedule_step), the scheduler reads it. A step
    counter would change its meaning with the global batch; the share of an epoch does not, so LR, warmup
    and the epoch's end stay right when a run resumes on another world size or --batch-size."""

    step: float = 0.0


@dataclass
class Learner:
    """The objects training updates, as Accelerate prepared them."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: object  # timm's ModelEmaV3, or None
    criterion: nn.Module
    card: dict  # what the exported model.json says about the network (network_card)
    clock: ScheduleClock  # what the scheduler reads


def build_network(model: ModelConfig, num_classes: int, world_size: int) -> nn.Module:
    net = build_model(model.arch, num_classes=num_classes, cifar_stem=model.cifar_stem,
                      zero_init_residual=model.zero_init_residual, blurpool=model.blurpool)
    if model.sync_bn and world_size > 1:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    if model.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def network_card(model: ModelConfig, num_classes: int) -> dict:
    """How to rebuild the network the exported weights belong to, and whether torchvision's is it."""
    options = f"num_classes={num_classes}" + "".join(f", {k}=True" for k in ("cifar_stem", "blurpool")
                                                      if getattr(model, k))
    return {"arch": model.arch, "num_classes": num_classes, "cifar_stem": model.cifar_stem,
            "blurpool": model.blurpool,
            "torchvision_equivalent": model.arch in IMAGENET_ARCHS and not (model.cifar_stem or model.blurpool),
            "load": f"from resnet import build_model; model = build_model({model.arch!r}, {options}); "
                    "model.load_state_dict(torch.load('model.pt', weights_only=True))"}


# --opt -> timm's optimizer names, without and with --nesterov
TIMM_OPTIMIZERS = {"sgd": ("momentum", "nesterov"), "lars": ("lars", "nlars"), "lamb": ("lamb", None),
                   "adamw": ("adamw", None)}


def peak_lr(optim: OptimConfig, world_size: int) -> float:
    """--lr is per 256 images; the global batch scales it linearly (Goyal et al. 2017) or by its square root
    (LAMB's usual rule, You et al. 2019)."""
    scale = optim.batch_size * world_size * optim.grad_accum / 256
    return optim.lr * (scale if optim.lr_scaling == "linear" else math.sqrt(scale))


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """timm's groups: no weight decay on 1-D parameters (norm weights, biases), chosen by shape, not by name
    (a name test like `'bn' in name` silently misses `downsample.1`). Decayed group first, as this trainer
    always ordered them, so checkpoints written before timm made the groups still load."""
    from timm.optim import param_groups_weight_decay

    return sorted(param_groups_weight_decay(model, weight_decay), key=lambda g: g["weight_decay"] == 0)


def build_optimizer(optim: OptimConfig, model: nn.Module, world_size: int) -> torch.optim.Optimizer:
    """timm's optimizer factory: SGD (with momentum), LARS, LAMB or AdamW."""
    from timm.optim import create_optimizer_v2

    plain, nesterov = TIMM_OPTIMIZERS[optim.opt]
    return create_optimizer_v2(model, opt=nesterov if optim.nesterov else plain, lr=peak_lr(optim, world_size),
                               weight_decay=optim.weight_decay, momentum=optim.momentum,
                               param_group_fn=lambda m: weight_decay_groups(m, optim.weight_decay))


def lr_factor(step: int, schedule: ScheduleConfig, steps_per_epoch: int) -> float:
    """Multiplier of the peak LR at a global optimizer step; warmup is linear from ~0."""
    total = schedule.epochs * steps_per_epoch
    warmup = int(schedule.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    epoch = step / steps_per_epoch
    if schedule.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        floor = schedule.min_lr_ratio
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule.schedule == "linear":
        return max(0.0, 1 - (step - warmup) / max(1, total - warmup))
    if schedule.schedule == "step":
        return schedule.gamma ** int(epoch // schedule.step_size)
    if schedule.schedule == "multistep":
        return schedule.gamma ** sum(epoch >= m for m in schedule.milestones)
    return 1.0


def build_scheduler(schedule: ScheduleConfig, optimizer, steps_per_epoch: int, clock: ScheduleClock):
    # Stepped per optimizer step (not per epoch) so warmup is smooth at any batch size.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: lr_factor(clock.step, schedule, steps_per_epoch))


def set_schedule(optimizer, scheduler, peak: float) -> None:
    """After a resume: this run's peak LR (its --lr and global batch) at the clock's point of the schedule, in
    place of the checkpoint's; the same values where neither changed."""
    inner = getattr(scheduler, "scheduler", scheduler)  # Accelerate's wrapper holds the LambdaLR
    factor = inner.lr_lambdas[0](None)
    inner.base_lrs = [peak for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["initial_lr"], group["lr"] = peak, peak * factor
    inner._last_lr = [group["lr"] for group in optimizer.param_groups]


def build_ema(decay: float, model: nn.Module):
    if decay <= 0:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay)


def build_criterion(label_smoothing: float, *, mixes: bool) -> nn.Module:
    if mixes:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()  # Mixup's soft targets already carry the label smoothing
    return nn.CrossEntropyLoss(label_smoothing=label_smoothing)
