"""Train a ResNet on ImageNet (WebDataset shards), from one CPU to many GPUs and nodes.

Shards come from `make-shards` (see README, "Prepare ImageNet"). One command line serves every topology;
Accelerate decides the devices and processes:

    # CPU, one process (the README's demo does this on a small real dataset)
    accelerate launch --cpu train_imagenet.py --config launch/configs/digits_demo.yaml

    # CPU, two processes (gloo): accelerate's --cpu flag would route this to mpirun, so ask for its
    # multi-process launcher instead; without a GPU the trainer falls back to the CPU and gloo by itself
    accelerate launch --multi_gpu --num_processes 2 train_imagenet.py --config launch/configs/digits_demo.yaml

    # one GPU
    accelerate launch --config_file launch/accelerate/1gpu.yaml train_imagenet.py \
        --config launch/configs/resnet50_90ep.yaml --data-dir /data/imagenet-shards

    # one node, 8 GPUs
    accelerate launch --config_file launch/accelerate/1node_8gpu.yaml train_imagenet.py \
        --config launch/configs/resnet50_90ep.yaml --data-dir /data/imagenet-shards

    # SLURM, several nodes (edit the lines marked EDIT first)
    sbatch --nodes 4 launch/slurm/multi_node.sbatch --config launch/configs/resnet50_90ep.yaml \
        --data-dir /data/imagenet-shards

    # plain torchrun, or `srun python train_imagenet.py ...` with one task per GPU, work as well

Every option can come from a YAML recipe (`--config`); flags on the command line override it. The resolved
configuration, library versions, world size and git revision are written into `--output-dir`, beside the
checkpoints, TensorBoard events (`tensorboard --logdir <output-dir>`) and `metrics.jsonl`.

`--resume auto` continues from the newest complete checkpoint, mid-epoch included; one that fails its checksums
or cannot be loaded is named, renamed `step-N.unloadable` and the one before it used. SIGUSR1 or SIGTERM makes
every rank stop at the same step boundary, write one checkpoint and exit with code 75 (requeue me). A loss that
stays NaN/inf (`--max-nonfinite-steps`) or a full disk stops the run with exit code 1 and never costs the last
good checkpoint. What survives what, and the test that shows it: README, "Reliability".
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from checkpoints import (CheckpointError, Progress, any_rank, checkpoint_dirs, one_line, resume_from,
                         save_checkpoint)
from data import DataError, TrainAugment, build_train_loader, build_val_loader
from resnet import ARCH_NAMES, build_model

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped by a signal after writing a checkpoint; run again with --resume auto
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
STOP_CHECK_EVERY = 10  # steps between agreeing on a stop request: one tiny all-reduce, not one per step

# Fault injection for tests/test_faults.py, read here and nowhere else; never set it for a real run.
FAULT_NAN_AT_STEP = int(os.environ.get("RESNET_FAULT_NAN_AT_STEP", "-1"))  # this global step's loss becomes NaN


# ----------------------------------------------------------------------------------------------------------
# Configuration


class Parser(argparse.ArgumentParser):
    """argparse that answers a bad flag with one line, not the 30-line usage of every option first."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML recipe; its keys are these options (dashes or underscores)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help="directory written by make-shards (holds _info.json and classes.txt)")
    g.add_argument("--train-split", default="train")
    g.add_argument("--val-split", default="val")
    g.add_argument("--workers", type=int, default=8, help="loader worker processes per training process")
    g.add_argument("--image-size", type=int, default=224)
    g.add_argument("--crop-pct", type=float, default=0.875, help="evaluation: resize to size/crop-pct, centre crop")
    g.add_argument("--max-bad-fraction", type=float, default=0.001,
                   help="stop when more than this fraction of training samples cannot be decoded")
    g.add_argument("--synthetic", action="store_true",
                   help="random data made on the device: measures the model without the loader")
    g.add_argument("--synthetic-steps", type=int, default=100, help="steps per epoch with --synthetic")
    g.add_argument("--num-classes", type=int, default=1000, help="with --synthetic only; else from classes.txt")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet50", choices=ARCH_NAMES, metavar="ARCH",
                   help="one of: " + ", ".join(ARCH_NAMES))
    g.add_argument("--cifar-stem", action="store_true", help="3x3 stride-1 stem, no max-pool (32x32 images)")
    g.add_argument("--zero-init-residual", action="store_true")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    g.add_argument("--sync-bn", action="store_true", help="synchronise BatchNorm statistics across processes")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", type=int, default=128, help="images per process per step")
    g.add_argument("--grad-accum", type=int, default=1, help="batches accumulated into one optimizer step")
    g.add_argument("--lr", type=float, default=0.1, help="learning rate per 256 images of global batch")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--nesterov", action="store_true")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="not applied to norm weights and biases")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--max-nonfinite-steps", type=int, default=3,
                   help="stop after this many consecutive batches with a NaN/inf loss (checked every "
                        f"{STOP_CHECK_EVERY} steps); weights that are no longer finite are never saved")
    g.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm; 0 disables")
    g.add_argument("--precision", default="no", choices=("no", "bf16", "fp16"))
    g.add_argument("--ema-decay", type=float, default=0.0, help="timm ModelEmaV3 decay; 0 disables")
    g = p.add_argument_group("schedule")
    g.add_argument("--epochs", type=int, default=90)
    g.add_argument("--schedule", default="cosine", choices=("cosine", "linear", "step", "multistep", "constant"),
                   help="after warmup; linear decays to 0 (with warmup: FFCV's triangular schedule)")
    g.add_argument("--warmup-epochs", type=float, default=0.0)
    g.add_argument("--step-size", type=int, default=30, help="epochs between decays for --schedule step")
    g.add_argument("--milestones", type=int, nargs="+", default=[30, 60, 80], help="epochs, multistep")
    g.add_argument("--gamma", type=float, default=0.1, help="decay factor for step and multistep")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of the peak")
    g = p.add_argument_group("augmentation")
    g.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0], help="RandomResizedCrop area range")
    g.add_argument("--ratio", type=float, nargs=2, default=[3 / 4, 4 / 3])
    g.add_argument("--hflip", type=float, default=0.5)
    g.add_argument("--color-jitter", type=float, default=0.0)
    g.add_argument("--auto-augment", default=None, help="timm policy, e.g. rand-m9-mstd0.5-inc1 or original")
    g.add_argument("--interpolation", default="bilinear")
    g.add_argument("--re-prob", type=float, default=0.0, help="random erasing probability (on the device)")
    g.add_argument("--mixup", type=float, default=0.0, help="Mixup alpha; 0 disables")
    g.add_argument("--cutmix", type=float, default=0.0, help="CutMix alpha; 0 disables")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default="runs/default")
    g.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint, if any) or a path")
    g.add_argument("--evaluate", default=None, metavar="CHECKPOINT",
                   help="evaluate this model.pt or checkpoint directory and exit")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower)")
    g.add_argument("--max-steps", type=int, default=0, help="stop after this global step; 0 = run all epochs")
    g.add_argument("--log-every", type=int, default=50, help="steps between log lines and scalars")
    g.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints; 0 = per epoch")
    g.add_argument("--keep-checkpoints", type=int, default=3, help="newest checkpoints kept (the best is kept too)")
    g.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar")
    g = p.add_argument_group("distributed")
    g.add_argument("--cpu", action="store_true", help="train on the CPU even when a GPU is present")
    g.add_argument("--dist-timeout", type=int, default=1800,
                   help="seconds a collective may wait for the other ranks before the run fails")
    return p


def parse_config(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags override the YAML recipe, which overrides the defaults; unknown recipe keys are an error."""
    parser = build_parser()
    args, _ = parser.parse_known_args(argv)
    if args.config:
        parser.set_defaults(**read_recipe(args.config, parser))
    args = parser.parse_args(argv)
    if not args.synthetic and not args.data_dir and not args.evaluate:
        parser.error("--data-dir is required (or --synthetic)")
    check_ranges(parser, args)
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        parser.error(f"--mixup/--cutmix need an even --batch-size (timm mixes pairs), got {args.batch_size}")
    return args


# Lower bounds checked after parsing, so values from a recipe (which argparse does not type-check) are caught too.
AT_LEAST = {"batch_size": 1, "grad_accum": 1, "epochs": 1, "image_size": 8, "log_every": 1, "eval_every": 1,
            "keep_checkpoints": 1, "synthetic_steps": 1, "num_classes": 2, "step_size": 1, "workers": 0,
            "checkpoint_every": 0, "max_steps": 0, "max_nonfinite_steps": 1, "dist_timeout": 1, "lr": 0.0,
            "weight_decay": 0.0, "warmup_epochs": 0.0, "ema_decay": 0.0, "mixup": 0.0, "cutmix": 0.0,
            "re_prob": 0.0, "label_smoothing": 0.0, "clip_grad": 0.0, "crop_pct": 0.01}


def check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for dest, low in AT_LEAST.items():
        value = getattr(args, dest)
        kind = int if isinstance(low, int) else (int, float)
        if isinstance(value, bool) or not isinstance(value, kind) or value < low:
            flag = "--" + dest.replace("_", "-")
            parser.error(f"{flag} must be {'an integer' if kind is int else 'a number'} >= {low}, got {value!r}")


def read_recipe(path: str, parser: argparse.ArgumentParser) -> dict:
    try:
        recipe = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        sys.exit(f"error: cannot read recipe {path}: {e}")
    valid = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values = {}
    for key, value in recipe.items():
        dest = str(key).replace("-", "_")
        if dest not in valid:
            sys.exit(f"error: {path}: unknown key '{key}'; valid keys: {', '.join(sorted(valid))}")
        choices = valid[dest].choices
        if choices and value not in choices:
            sys.exit(f"error: {path}: {key}: '{value}' is not one of {', '.join(map(str, choices))}")
        values[dest] = value
    return values


# ----------------------------------------------------------------------------------------------------------
# Processes and devices


def adopt_slurm_ranks() -> None:
    """Under `srun python train_imagenet.py` (one task per GPU, no launcher) take the ranks from SLURM."""
    env = os.environ
    if "RANK" in env or "SLURM_STEP_ID" not in env or int(env.get("SLURM_NTASKS", "1")) < 2:
        return
    if "MASTER_ADDR" not in env:
        sys.exit("error: under srun, export MASTER_ADDR first, e.g. "
                 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)')
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env["SLURM_LOCALID"])
    env.setdefault("MASTER_PORT", "29500")


def make_accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    on_cpu = args.cpu or not torch.cuda.is_available()
    if on_cpu and args.precision == "fp16":
        sys.exit("error: --precision fp16 needs a GPU; use bf16 or no on the CPU")
    accelerator = Accelerator(
        cpu=on_cpu,  # without it a CPU-only process under torchrun would not join the gloo group
        mixed_precision=args.precision,
        gradient_accumulation_steps=args.grad_accum,
        dynamo_backend="inductor" if args.compile else "no",
        step_scheduler_with_optimizer=False,  # our schedule counts global steps; we step it ourselves
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=args.dist_timeout))],
    )
    # The same seed on every rank gives identical initial weights; the loader seeds itself per rank.
    set_seed(args.seed, deterministic=args.deterministic)
    if not on_cpu:
        torch.backends.cudnn.benchmark = not args.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
    print_line(f"rank {accelerator.process_index}/{accelerator.num_processes} "
               f"local_rank {accelerator.local_process_index} host {socket.gethostname()} "
               f"device {accelerator.device} backend {backend}")
    return accelerator


def print_line(text: str) -> None:
    """A line from every rank in one write: print() writes the newline separately, so lines of ranks sharing
    a pipe could splice ("...e+05rank 0 ...")."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------------------------------------
# Data


class SyntheticLoader:
    """Random uint8 batches made once on the device: the model's speed with the loader taken out."""

    def __init__(self, args, device):
        g = torch.Generator(device="cpu").manual_seed(args.seed)
        size = (args.batch_size, 3, args.image_size, args.image_size)
        self.images = torch.randint(0, 256, size, dtype=torch.uint8, generator=g).to(device)
        self.labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)
        self.steps, self.start = args.synthetic_steps, 0
        self.num_classes, self.num_samples, self.batch_size = args.num_classes, 0, args.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start = start_batch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.start, self.steps):
            yield self.images, self.labels


def build_loaders(args, accelerator):
    if args.synthetic:
        return SyntheticLoader(args, accelerator.device), None
    local = not re.search(r"[{:]", args.data_dir)  # not a brace pattern or a URL
    if local and not Path(args.data_dir).is_dir():
        sys.exit(f"error: --data-dir {args.data_dir}: no such directory (expected the output of make-shards)")
    rank, world = accelerator.process_index, accelerator.num_processes
    augment = TrainAugment(scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
                           color_jitter=args.color_jitter, auto_augment=args.auto_augment,
                           interpolation=args.interpolation)
    try:
        train = build_train_loader(args.data_dir, split=args.train_split, batch_size=args.batch_size,
                                   num_workers=args.workers, rank=rank, world_size=world, seed=args.seed,
                                   image_size=args.image_size, augment=augment,
                                   max_bad_fraction=args.max_bad_fraction)
        val = build_val_loader(args.data_dir, split=args.val_split, batch_size=args.batch_size,
                               num_workers=args.workers, rank=rank, world_size=world,
                               image_size=args.image_size, crop_pct=args.crop_pct)
    except DataError as e:
        sys.exit(f"error: {e}")
    if len(train) < args.grad_accum:
        sys.exit(f"error: {train.num_samples} training images give {len(train)} batches per rank at "
                 f"--batch-size {args.batch_size} x {world} processes; need at least --grad-accum "
                 f"{args.grad_accum}. Use a smaller batch or fewer processes.")
    return train, val


class DeviceBatch:
    """uint8 batch → normalised float on the device; erasing and mixup there too.

    Normalising on the device keeps that arithmetic off the CPU workers, which decode JPEGs and are the
    bottleneck of an ImageNet run; the transfer is also 4x smaller as uint8.
    """

    def __init__(self, args, device, num_classes: int):
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing

        self.device = device
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        self.erase = (RandomErasing(args.re_prob, mode="pixel", device=str(device))
                      if args.re_prob > 0 else None)
        self.mixup = (Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
                            label_smoothing=args.label_smoothing, num_classes=num_classes)
                      if args.mixup > 0 or args.cutmix > 0 else None)

    def __call__(self, images, labels, train: bool = True):
        images = images.to(self.device, non_blocking=True).float()
        images = images.sub_(self.mean).div_(self.std).contiguous(memory_format=self.memory_format)
        labels = labels.to(self.device, non_blocking=True)
        if train and self.erase is not None:
            images = self.erase(images)
        targets = labels
        if train and self.mixup is not None:
            images, targets = self.mixup(images, labels)
        return images, labels, targets

    def for_display(self, images: torch.Tensor) -> torch.Tensor:
        """The first 32 normalised images back in [0, 1], for TensorBoard."""
        return ((images[:32].float() * self.std + self.mean) / 255).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------
# Model, optimizer, schedule


def build_network(args, num_classes: int, accelerator) -> nn.Module:
    model = build_model(args.arch, num_classes=num_classes, cifar_stem=args.cifar_stem,
                        zero_init_residual=args.zero_init_residual)
    if args.sync_bn and accelerator.num_processes > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(args, model: nn.Module, world_size: int) -> torch.optim.Optimizer:
    """SGD whose LR is given per 256 images; no weight decay on 1-D parameters (norm weights, biases).

    Chosen by shape, not by name: a name test like `'bn' in name` silently misses `downsample.1`.
    """
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    global_batch = args.batch_size * world_size * args.grad_accum
    lr = args.lr * global_batch / 256
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=args.momentum, nesterov=args.nesterov)


def lr_factor(step: int, *, args, steps_per_epoch: int) -> float:
    """Multiplier of the peak LR at a global optimizer step; warmup is linear from ~0."""
    total = args.epochs * steps_per_epoch
    warmup = int(args.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    epoch = step / steps_per_epoch
    if args.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        floor = args.min_lr_ratio
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if args.schedule == "linear":
        return max(0.0, 1 - (step - warmup) / max(1, total - warmup))
    if args.schedule == "step":
        return args.gamma ** int(epoch // args.step_size)
    if args.schedule == "multistep":
        return args.gamma ** sum(epoch >= m for m in args.milestones)
    return 1.0


def build_scheduler(args, optimizer, steps_per_epoch: int):
    # Stepped per optimizer step (not per epoch) so warmup is smooth at any batch size.
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, args=args, steps_per_epoch=steps_per_epoch))


def build_ema(args, model: nn.Module):
    if args.ema_decay <= 0:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=args.ema_decay)


# ----------------------------------------------------------------------------------------------------------
# Run directory: config, metrics, TensorBoard


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_run_info(args, accelerator, out: Path) -> None:
    """The resolved configuration and what produced it, next to the run's outputs."""
    import accelerate
    import timm
    import torchvision
    import webdataset

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(vars(args), sort_keys=True))
    info = {
        "argv": sys.argv, "git_revision": git_revision(), "world_size": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device),
        "host": socket.gethostname(), "python": platform.python_version(),
        "versions": {m.__name__: m.__version__ for m in (torch, torchvision, timm, accelerate, webdataset)},
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")


class Monitor:
    """TensorBoard, metrics.jsonl and console lines, from the main process only."""

    def __init__(self, out: Path, enabled: bool, resume_step: int):
        self.enabled, self.writer = enabled, None
        self.jsonl = out / "metrics.jsonl"
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        if resume_step:
            self._truncate_jsonl(resume_step)
        # purge_step drops events a killed run wrote after the checkpoint we resume from: no step twice.
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def _truncate_jsonl(self, step: int) -> None:
        if self.jsonl.exists():
            keep = [ln for ln in self.jsonl.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            self.jsonl.write_text("".join(ln + "\n" for ln in keep))

    def log(self, step: int, scalars: dict, kind: str) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(f"{kind}/{name}", value, step)
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **scalars}) + "\n")

    def image_grid(self, images: torch.Tensor, step: int) -> None:
        if self.enabled:
            from torchvision.utils import make_grid

            self.writer.add_image("train/augmented_batch", make_grid(images[:32].cpu(), nrow=8), step)

    def close(self, hparams: dict | None = None, metrics: dict | None = None) -> None:
        if self.enabled:
            if hparams is not None:
                clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hparams.items()}
                self.writer.add_hparams(clean, {f"hparam/{k}": v for k, v in (metrics or {}).items()},
                                        run_name="hparams")
            self.writer.close()


def sync_buffers(accelerator, module: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics.

    DDP broadcasts buffers before each forward, but the last training forward then updates each rank's
    running statistics with its own batch, so the replicas' BN buffers differ slightly. Evaluating or
    exporting without this would mix models: each rank would score its share of the validation set
    with different statistics from the model that is saved.
    """
    if accelerator.num_processes > 1:
        for buf in module.buffers():
            torch.distributed.broadcast(buf.data, src=0)


def check_replicas(accelerator, model) -> None:
    """Every rank prints a fingerprint of its weights; the main process says whether they all agree.

    DDP keeps replicas identical by construction; this makes it visible, so a user can trust it.
    """
    net = accelerator.unwrap_model(model)
    tensors = [*net.parameters(), *(b for b in net.buffers() if b.is_floating_point())]
    local = sum((p.detach().double() * (i + 1)).sum() for i, p in enumerate(tensors)).reshape(1)
    print_line(f"rank {accelerator.process_index} weights checksum {local.item():.12e}")
    every = accelerator.gather(local.to(accelerator.device)).cpu()
    if accelerator.num_processes > 1:
        same = bool((every == every[0]).all())
        accelerator.print("weights identical on all ranks" if same else
                          f"warning: weights differ between ranks: {every.tolist()}")


def plain_keys(state: dict) -> dict:
    """Drop the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes: torchvision's names."""
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}


def export_model(accelerator, model, out: Path) -> None:
    """A plain state_dict (no `module.` / `_orig_mod.` prefixes) that torchvision's resnet loads strictly."""
    if not accelerator.is_main_process:
        return
    state = accelerator.unwrap_model(model).state_dict()
    state = {k: v.detach().cpu() for k, v in plain_keys(state).items()}
    tmp = out / ".model.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / "model.pt")


# ----------------------------------------------------------------------------------------------------------
# Stop requests


class StopRequest:
    """SIGUSR1/SIGTERM set a flag; ranks agree on it at a step boundary, so all stop at the same step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True  # only a flag: the step in flight finishes undisturbed


class NonFiniteGuard:
    """Counts consecutive batches whose loss is NaN or inf, on the device, so watching costs no sync per step.

    The count is read only where the trainer syncs anyway: the stop check every STOP_CHECK_EVERY steps,
    and before each checkpoint, which also refuses weights that are no longer finite (SGD never trains
    them back), so a NaN never replaces a good checkpoint. In fp16 the loss scaler skips an overflowing
    step by itself; only a loss that stays non-finite for --max-nonfinite-steps batches stops the run.
    """

    def __init__(self, device, limit: int):
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.limit = limit

    def add(self, loss: torch.Tensor) -> None:
        self.streak = torch.where(torch.isfinite(loss.detach()), 0, self.streak + 1)

    def over_limit(self) -> bool:
        return bool(self.streak >= self.limit)  # a sync: call only at the points above

    def weights_finite(self, model: nn.Module) -> bool:
        return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


# ----------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, loader, prep: DeviceBatch, accelerator) -> dict:
    """Top-1/top-5 over the whole split, each image counted once across all ranks.

    Ranks may hold different numbers of batches, so nothing is exchanged per batch: the counts are summed
    locally and reduced once at the end (a per-batch collective would hang on uneven ranks).
    """
    net = accelerator.unwrap_model(model)  # no DDP: its forward could sync buffers
    sync_buffers(accelerator, net)
    was_training = net.training
    net.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # top1, top5, images
    for images, labels in loader:
        images, labels, _ = prep(images, labels, train=False)
        with accelerator.autocast():
            logits = net(images)
        top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
        hit = top5.eq(labels[:, None])
        counts[0] += hit[:, 0].sum()
        counts[1] += hit.any(dim=1).sum()
        counts[2] += labels.numel()
    counts = accelerator.reduce(counts, reduction="sum").cpu()
    net.train(was_training)
    n = int(counts[2])
    return {"top1": 100 * counts[0].item() / max(n, 1), "top5": 100 * counts[1].item() / max(n, 1), "images": n}


def check_eval_count(result: dict, loader, accelerator) -> None:
    expected = getattr(loader, "num_samples", 0)
    if expected and result["images"] != expected:
        accelerator.print(f"warning: evaluated {result['images']} validation images but the manifest lists "
                          f"{expected}; unreadable images were skipped or the shards are incomplete")


# ----------------------------------------------------------------------------------------------------------
# Training


@dataclass
class Trainer:
    args: argparse.Namespace
    accelerator: object
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    ema: object
    train_loader: object
    val_loader: object
    prep: DeviceBatch
    criterion: nn.Module
    monitor: Monitor
    progress: Progress
    out: Path
    steps_per_epoch: int
    stop: StopRequest
    guard: NonFiniteGuard
    warned_data_wait: bool = False
    slow_data_intervals: int = 0  # consecutive logging intervals with over 10 % of the time waiting for data
    bad_samples: int = 0  # corrupt training samples skipped by all ranks, as last reported


def train_epoch(t: Trainer, epoch: int) -> str | None:
    """One epoch from `progress.batch_in_epoch`; returns why it stopped early ('signal', 'max-steps')."""
    a, args, p = t.accelerator, t.args, t.progress
    batches = t.steps_per_epoch * args.grad_accum  # whole optimizer steps only
    t.train_loader.set_epoch(epoch, start_batch=p.batch_in_epoch)
    t.model.train()
    bar = progress_bar(t, epoch, total=batches, initial=p.batch_in_epoch)
    meter = StepMeter(a.device)
    it = iter(t.train_loader)
    while p.batch_in_epoch < batches:
        meter.start_wait()
        images, labels = next(it)
        meter.end_wait()
        images, labels, targets = t.prep(images, labels)
        if p.global_step == 0 and p.batch_in_epoch == 0:
            t.monitor.image_grid(t.prep.for_display(images), 0)
        with a.accumulate(t.model):
            loss = t.criterion(t.model(images), targets)
            if p.global_step == FAULT_NAN_AT_STEP:
                loss = loss * float("nan")
            a.backward(loss)
            if a.sync_gradients and args.clip_grad > 0:
                a.clip_grad_norm_(t.model.parameters(), args.clip_grad)
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)
        p.batch_in_epoch += 1
        t.guard.add(loss)
        meter.add(loss.detach(), labels.numel())
        bar.update(1) if bar else None
        if not a.sync_gradients:
            continue
        reason = after_optimizer_step(t, meter)
        if reason:
            close_bar(bar)
            return reason
    close_bar(bar)
    return None


def after_optimizer_step(t: Trainer, meter: "StepMeter") -> str | None:
    a, args, p = t.accelerator, t.args, t.progress
    if a.optimizer_step_was_skipped:
        p.skipped_steps += 1  # fp16 overflow: the scaler skipped it, so the schedule must not advance
        a.print(f"step {p.global_step}: fp16 overflow, step skipped (loss scale now {loss_scale(a)})")
    else:
        t.scheduler.step()
    p.global_step += 1
    if t.ema is not None:
        t.ema.update(a.unwrap_model(t.model), step=p.global_step)
    if p.global_step % args.log_every == 0:
        log_train(t, meter)
    epoch_end = p.batch_in_epoch == t.steps_per_epoch * args.grad_accum  # fit() saves after evaluating
    if args.checkpoint_every and p.global_step % args.checkpoint_every == 0 and not epoch_end:
        if save(t):
            return "nonfinite"
    if args.max_steps and p.global_step >= args.max_steps:
        return "max-steps"
    if p.global_step % STOP_CHECK_EVERY == 0:
        return agree_to_stop(t)
    return None


def agree_to_stop(t: Trainer) -> str | None:
    """One tiny all-reduce: a stop signal on any rank, or a run of non-finite losses on any rank."""
    nonfinite, signalled = any_rank(t.accelerator, t.guard.over_limit(), t.stop.requested)
    return "nonfinite" if nonfinite else "signal" if signalled else None


class StepMeter:
    """Loss, images/s and the share of wall time spent waiting for the loader, per logging interval."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.loss_sum = torch.zeros((), device=self.device)  # summed on the device: no sync per step
        self.batches, self.images, self.wait = 0, 0, 0.0
        self.t0 = time.perf_counter()

    def start_wait(self):
        self._w = time.perf_counter()

    def end_wait(self):
        self.wait += time.perf_counter() - self._w

    def add(self, loss, n: int):
        self.loss_sum += loss.float()
        self.batches += 1
        self.images += n

    def read(self, world_size: int) -> dict:
        loss = self.loss_sum.item()  # waits for the device: the interval's queued GPU work is inside the timing
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        stats = {"loss": loss / max(self.batches, 1),
                 "images_per_s": self.images * world_size / elapsed, "data_wait_fraction": self.wait / elapsed}
        self.reset()
        return stats


def log_train(t: Trainer, meter: StepMeter) -> None:
    a, p = t.accelerator, t.progress
    stats = meter.read(a.num_processes)
    stats["lr"] = t.optimizer.param_groups[0]["lr"]
    if a.scaler is not None:
        stats["loss_scale"] = loss_scale(a)
        stats["skipped_steps"] = p.skipped_steps
    if a.device.type == "cuda":
        stats["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    t.monitor.log(p.global_step, stats, "train")
    say(t, f"step {p.global_step} epoch {p.epoch}: loss {stats['loss']:.4f}  lr {stats['lr']:.4g}  "
           f"{stats['images_per_s']:.0f} img/s  data wait {100 * stats['data_wait_fraction']:.0f}%")
    # Sustained, not one noisy interval: a busy neighbour or an epoch boundary is no reason to re-shard.
    t.slow_data_intervals = t.slow_data_intervals + 1 if stats["data_wait_fraction"] > 0.10 else 0
    if t.slow_data_intervals == 3 and not t.warned_data_wait:
        t.warned_data_wait = True  # once per run
        a.print(f"warning: over 10% of step time has been spent waiting for data for {3 * t.args.log_every} "
                f"steps; raise --workers (now {t.args.workers}) or write pre-resized shards "
                "(make-shards --max-side 320) so JPEG decoding is cheaper")


def loss_scale(accelerator) -> float:
    return float(accelerator.scaler.get_scale()) if accelerator.scaler is not None else 1.0


def progress_bar(t: Trainer, epoch: int, total: int, initial: int):
    if not (t.args.progress and t.accelerator.is_main_process):
        return None
    from tqdm.auto import tqdm

    # disable=None: no bar when stdout is not a terminal (SLURM logs, CI), where the log lines suffice
    return tqdm(total=total, initial=initial, desc=f"epoch {epoch}", unit="batch", leave=False,
                dynamic_ncols=True, disable=None)


def say(t: Trainer, message: str) -> None:
    """A console line from the main process that does not tear the progress bar."""
    if t.accelerator.is_main_process:
        from tqdm.auto import tqdm

        tqdm.write(message)


def close_bar(bar) -> None:
    if bar is not None:
        bar.close()


def save(t: Trainer) -> str | None:
    """A checkpoint, unless the loss or the weights went non-finite: then 'nonfinite', and nothing is written."""
    a = t.accelerator
    too_many, bad_weights = any_rank(a, t.guard.over_limit(), not t.guard.weights_finite(a.unwrap_model(t.model)))
    if too_many or bad_weights:
        return "nonfinite"
    root = t.out / "checkpoints"
    try:
        save_checkpoint(a, root, t.progress, t.ema, t.args.keep_checkpoints)
    except CheckpointError as e:
        sys.exit(checkpoint_failed(t, root, str(e)) if a.is_main_process else 1)
    return None


def checkpoint_failed(t: Trainer, root: Path, error: str) -> str:
    """One line: which checkpoint, why (the disk is full, most often), what is left, what to do."""
    need, free = checkpoint_bytes(t), shutil.disk_usage(root).free
    why = f"no space left on the device ({error})" if free < need else error
    newest = checkpoint_dirs(root)
    return (f"error: cannot write checkpoint {root / f'step-{t.progress.global_step:08d}'}: {why}; it needs "
            f"about {need / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free there. Nothing of it is left "
            f"behind; {newest[-1] if newest else 'no earlier checkpoint'} is intact. Free some space and run "
            "again with --resume auto")


def checkpoint_bytes(t: Trainer) -> int:
    """About what a checkpoint takes: the tensors of the model, optimizer and EMA states."""
    def size(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(map(size, x.values()))
        return sum(map(size, x)) if isinstance(x, (list, tuple)) else 0

    states = [t.accelerator.unwrap_model(t.model).state_dict(), t.optimizer.state_dict()]
    return size(states) + (size(t.ema.module.state_dict()) if t.ema is not None else 0)


def stop_nonfinite(t: Trainer) -> int:
    """The run's loss or weights went NaN/inf: say so and where to resume from; nothing was saved since."""
    a, p = t.accelerator, t.progress
    newest = checkpoint_dirs(t.out / "checkpoints")
    finite = t.guard.weights_finite(a.unwrap_model(t.model))
    a.print(f"error: stopped at step {p.global_step}: the loss was NaN or inf for the last {int(t.guard.streak)} "
            f"batches (limit --max-nonfinite-steps {t.args.max_nonfinite_steps}) and the weights are "
            f"{'finite' if finite else 'no longer finite'}; nothing was saved from them, the newest checkpoint "
            f"is {newest[-1] if newest else 'none'}. Lower --lr, add --warmup-epochs or --clip-grad, or check "
            "the data, then run again with --resume auto", file=sys.stderr)
    return 1


def run_evaluation(t: Trainer) -> dict:
    a, p = t.accelerator, t.progress
    result = evaluate(t.model, t.val_loader, t.prep, a)
    check_eval_count(result, t.val_loader, a)
    scalars = {"top1": result["top1"], "top5": result["top5"], "images": result["images"]}
    if t.ema is not None:
        ema = evaluate(t.ema.module, t.val_loader, t.prep, a)
        scalars.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
    t.monitor.log(p.global_step, scalars, "val")
    p.last_eval_step, p.last_eval = p.global_step, result
    p.history.append({"step": p.global_step, "epoch": p.epoch, "top1": result["top1"]})
    ema_text = f"  ema top1 {scalars['ema_top1']:.2f}" if t.ema is not None else ""
    a.print(f"epoch {p.epoch} step {p.global_step}: val top1 {result['top1']:.2f}  top5 {result['top5']:.2f}  "
            f"({result['images']} images){ema_text}")
    return result


def fit(t: Trainer) -> str | None:
    """Epochs from where the progress says, with evaluation and checkpoints; returns an early-stop reason."""
    args, p = t.args, t.progress
    while p.epoch < args.epochs:
        reason = train_epoch(t, p.epoch)
        if reason:
            return reason
        report_bad_samples(t)
        p.epoch, p.batch_in_epoch = p.epoch + 1, 0
        if t.val_loader is not None and (p.epoch % args.eval_every == 0 or p.epoch == args.epochs):
            result = run_evaluation(t)
            if result["top1"] > p.best_top1:
                p.best_top1, p.best_checkpoint = result["top1"], f"step-{p.global_step:08d}"
        if save(t):
            return "nonfinite"
    return None


def report_bad_samples(t: Trainer) -> None:
    """Corrupt training samples skipped this epoch by all ranks (the loader warns about each by name)."""
    a = t.accelerator
    mine = torch.tensor([float(getattr(t.train_loader, "bad_samples", 0))], device=a.device)
    total = int((a.reduce(mine, reduction="sum") if a.num_processes > 1 else mine).item())
    new, t.bad_samples = total - t.bad_samples, total
    t.monitor.log(t.progress.global_step, {"bad_samples": new}, "data")
    if new:
        a.print(f"epoch {t.progress.epoch}: skipped {new} corrupt training samples (named in the warnings above)")


def finish(t: Trainer, reason: str | None) -> int:
    """Final evaluation and export, or a checkpoint and the requeue code when a signal stopped the run."""
    a, p = t.accelerator, t.progress
    if reason in ("signal", "max-steps"):
        reason = save(t) or reason
    if reason == "nonfinite":
        return stop_nonfinite(t)
    if reason == "signal":
        a.print(f"stopped by signal at step {p.global_step}; checkpoint written; resume with --resume auto")
        # The checkpoint is safe; from here a stop request has nothing left to do. torchrun SIGTERMs the ranks
        # still shutting down once one has exited 75, and Python restores the default (fatal) SIGTERM action
        # during interpreter shutdown: ignoring it keeps every rank's exit code 75 instead of "killed".
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        return EXIT_REQUEUE
    final = {}
    if t.val_loader is not None:
        final = p.last_eval if p.last_eval_step == p.global_step else run_evaluation(t)
        a.print(f"final top1={final['top1']:.2f} top5={final['top5']:.2f} images={final['images']} "
                f"step={p.global_step}")
    sync_buffers(a, a.unwrap_model(t.model))
    check_replicas(a, t.model)
    export_model(a, t.model, t.out)
    if t.ema is not None and a.is_main_process:
        torch.save(t.ema.module.state_dict(), t.out / "model_ema.pt")
    t.monitor.close(vars(t.args), {k: v for k, v in final.items() if k in ("top1", "top5")})
    a.print(f"model written to {t.out / 'model.pt'}; view curves with: tensorboard --logdir {t.out}")
    return 0


def evaluate_only(args, accelerator) -> int:
    """--evaluate: a model.pt or a checkpoint directory, on the validation split."""
    _, val = build_loaders(args, accelerator)
    model = build_network(args, val.num_classes, accelerator).to(accelerator.device)
    path = Path(args.evaluate)
    weights = path / "model.safetensors" if path.is_dir() else path
    if not weights.exists():
        sys.exit(f"error: --evaluate {path}: no such model file")
    try:
        state = load_weights(weights, accelerator.device)
    except Exception as e:  # noqa: BLE001 -- a damaged or crafted file: one line, no traceback
        sys.exit(f"error: --evaluate {weights}: cannot load it ({one_line(e)}); only tensors are accepted")
    model.load_state_dict(plain_keys(state))
    result = evaluate(model, val, DeviceBatch(args, accelerator.device, val.num_classes), accelerator)
    check_eval_count(result, val, accelerator)
    accelerator.print(f"final top1={result['top1']:.2f} top5={result['top5']:.2f} images={result['images']}")
    return 0


def load_weights(path: Path, device) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(device))
    return torch.load(path, map_location=device, weights_only=True)  # never runs pickled code


def build_trainer(args, accelerator, stop: StopRequest) -> Trainer:
    out = Path(args.output_dir)
    train_loader, val_loader = build_loaders(args, accelerator)
    num_classes = train_loader.num_classes
    model = build_network(args, num_classes, accelerator)
    optimizer = build_optimizer(args, model, accelerator.num_processes)
    steps_per_epoch = len(train_loader) // args.grad_accum
    scheduler = build_scheduler(args, optimizer, steps_per_epoch)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    ema = build_ema(args, accelerator.unwrap_model(model))
    progress = resume_from(accelerator, args.resume, out, ema) if args.resume else Progress()
    criterion = build_criterion(args)
    prep = DeviceBatch(args, accelerator.device, num_classes)
    monitor = Monitor(out, accelerator.is_main_process, progress.global_step)
    guard = NonFiniteGuard(accelerator.device, args.max_nonfinite_steps)
    return Trainer(args, accelerator, model, optimizer, scheduler, ema, train_loader, val_loader, prep,
                   criterion, monitor, progress, out, steps_per_epoch, stop, guard)


def build_criterion(args) -> nn.Module:
    if args.mixup > 0 or args.cutmix > 0:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()  # Mixup's soft targets already carry the label smoothing
    return nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)


def main(argv: list[str] | None = None) -> int:
    args = parse_config(argv)
    adopt_slurm_ranks()
    # First thing: a SIGTERM during start-up would otherwise kill the process, and a SIGUSR1 be lost.
    # Loader workers forked later inherit the flag handler too.
    stop = StopRequest()
    accelerator = make_accelerator(args)
    if args.evaluate:
        return evaluate_only(args, accelerator)
    if accelerator.is_main_process:
        write_run_info(args, accelerator, Path(args.output_dir))
    trainer = build_trainer(args, accelerator, stop)
    accelerator.print(f"{args.arch}: {trainer.steps_per_epoch} steps/epoch x {args.epochs} epochs, global batch "
                      f"{args.batch_size * accelerator.num_processes * args.grad_accum}, "
                      f"{accelerator.num_processes} process(es) on {accelerator.device.type}")
    try:
        reason = fit(trainer)
        code = finish(trainer, reason)
    except DataError as e:  # too many corrupt samples, an unreadable shard: one line naming it
        sys.exit(f"error: {e}")
    accelerator.end_training()
    return code


if __name__ == "__main__":
    sys.exit(main())
