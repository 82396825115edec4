"""Where batches come from and how they reach the device: the shard loaders of this rank (or random
batches made on the device), and uint8 batch -> normalised float tensors with erasing and mixup."""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass

import torch

from data import TrainAugment, build_train_loader, build_val_loader, resolve_shards
from data.remote import RetryPolicy, ShardReads
from data.shard_cache import ShardCache

from . import console
from .options import MAX_DEFAULT_WORKERS, AugmentConfig, Config, DataConfig, EvalConfig, ResolutionConfig
from .runtime import from_main, local_world_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ResolutionSchedule:
    """The training image size of each epoch: --image-size, FFCV's ramp, or an explicit list."""

    res: ResolutionConfig
    image_size: int
    epochs: int

    def at(self, epoch: int) -> int:
        r = self.res
        if r.res_schedule:
            return r.res_schedule[min(epoch, len(r.res_schedule) - 1)]
        if not r.min_res:
            return self.image_size
        high = r.max_res or self.image_size
        if epoch <= r.ramp_start_epoch:
            return r.min_res
        if epoch >= r.ramp_end_epoch:
            return high
        t = (epoch - r.ramp_start_epoch) / (r.ramp_end_epoch - r.ramp_start_epoch)
        return round((r.min_res + t * (high - r.min_res)) / 32) * 32  # half to even, as FFCV's np.round

    def sizes(self) -> set[int]:
        return {self.at(e) for e in range(self.epochs)}

    def largest(self) -> int:
        return max(self.sizes())


@dataclass
class Batches:
    """What the loop reads: this rank's loaders, the device-side preparation, whole optimizer steps per epoch,
    the training size of each epoch."""

    train: object  # data.TrainLoader or SyntheticLoader
    val: object  # data.ValLoader, or None with --synthetic
    prep: "DeviceBatch"
    steps_per_epoch: int
    resolution: ResolutionSchedule


def shard_reads(data: DataConfig) -> ShardReads:
    """How both loaders read remote shards (--read-retries, --read-timeout, --read-retry-wait, --shard-cache), and
    the count of their retries, one for the rank."""
    policy = RetryPolicy(retries=data.read_retries, timeout=data.read_timeout, max_wait=data.read_retry_wait)
    cache = ShardCache(data.shard_cache, int(data.shard_cache_gb * 1e9)) if data.shard_cache else None
    return ShardReads(policy, cache)


def cores_per_process() -> int:
    """The cores this process may use, shared with the other training processes of its node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // local_world_size())


def settle_workers(cfg: Config) -> Config:
    """``cfg`` with --workers decided: by default what this process's share of the cores allows; a larger
    number asked for is said once, in our words, and torch's multi-line warning (once per loader) silenced."""
    warnings.filterwarnings("ignore", message="This DataLoader will create", category=UserWarning)
    share = cores_per_process()
    if cfg.data.workers is None:
        workers = min(MAX_DEFAULT_WORKERS, share)
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, workers=workers))
    if cfg.data.workers > share:
        console.warn(f"--workers {cfg.data.workers} is more than the {share} core(s) of this process "
                     f"({local_world_size()} training process(es) on this node); the loaders may compete with "
                     f"training for them (by default --workers follows the cores)")
    return cfg


def open_train_loader(data: DataConfig, augment: AugmentConfig, resolution: ResolutionSchedule, *,
                      batch_size: int, seed: int, accelerator, reads: ShardReads | None = None):
    """This rank's training batches: exactly len(loader) per epoch on every rank (see data/pipeline.py),
    of the size the trainer sets for each epoch."""
    if data.synthetic:
        return SyntheticLoader(data, batch_size=batch_size, seed=seed, device=accelerator.device)
    timm_augment = TrainAugment(scale=tuple(augment.scale), ratio=tuple(augment.ratio), hflip=augment.hflip,
                                color_jitter=augment.color_jitter, auto_augment=augment.auto_augment,
                                interpolation=augment.interpolation)
    shards = from_main(accelerator, lambda: resolve_shards(data.data_dir, data.train_split, reads=reads))
    return build_train_loader(shards, batch_size=batch_size,
                              num_workers=data.workers, rank=accelerator.process_index,
                              world_size=accelerator.num_processes, seed=seed, image_size=resolution.at(0),
                              max_image_size=resolution.largest(), augment=timm_augment,
                              max_bad_fraction=data.max_bad_fraction, decode_on=decode_on(data, accelerator),
                              local_ranks=local_world_size(), reads=reads)


def open_val_loader(data: DataConfig, evaluation: EvalConfig, *, batch_size: int, interpolation: str, accelerator,
                    reads: ShardReads | None = None):
    """This rank's share of the validation split (every image once over all ranks), resized with the training's
    --interpolation as timm's evaluation is; None with --synthetic."""
    if data.synthetic:
        return None
    shards = from_main(accelerator, lambda: resolve_shards(data.data_dir, data.val_split, reads=reads))
    return build_val_loader(shards, batch_size=batch_size, num_workers=data.workers,
                            rank=accelerator.process_index, world_size=accelerator.num_processes,
                            image_size=evaluation.crop(data.image_size), crop_pct=evaluation.crop_pct,
                            resize=evaluation.val_resize or None, decode_on=decode_on(data, accelerator),
                            interpolation=interpolation, reads=reads)


def decode_on(data: DataConfig, accelerator):
    """Where the loaders decode JPEGs: None, in the workers; or this process's device (--decode device)."""
    return accelerator.device if data.decode == "device" else None


def steps_per_epoch(loader, *, grad_accum: int, world_size: int) -> int:
    """Whole optimizer steps per epoch; at least one, or the run stops before it starts."""
    if len(loader) < grad_accum:
        console.fatal(f"{loader.num_samples} training images give {len(loader)} batches per rank at "
                      f"--batch-size {loader.batch_size} x {world_size} processes; need at least --grad-accum "
                      f"{grad_accum}. Use a smaller batch or fewer processes.")
    return len(loader) // grad_accum


class SyntheticLoader:
    """Random uint8 batches made once on the device: the model's speed with the loader taken out."""

    def __init__(self, data: DataConfig, *, batch_size: int, seed: int, device):
        self.seed, self.device = seed, device
        self.steps, self.start = data.synthetic_steps, 0
        self.num_classes, self.num_samples, self.batch_size = data.num_classes, 0, batch_size
        self.make(data.image_size)

    def make(self, image_size: int) -> None:
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        size = (self.batch_size, 3, image_size, image_size)
        self.images = torch.randint(0, 256, size, dtype=torch.uint8, generator=g).to(self.device)
        self.labels = torch.randint(0, self.num_classes, (self.batch_size,), generator=g).to(self.device)

    layout = None  # no samples, so no positions to carry to another world size (engine/continuation.py)

    def batches_in(self, segment=None) -> int:
        return self.steps

    def set_epoch(self, epoch: int, start_batch: int = 0, image_size: int | None = None, segment=None) -> None:
        self.start = start_batch
        if image_size and image_size != self.images.shape[-1]:
            self.make(image_size)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.start, self.steps):
            yield self.images, self.labels


class DeviceBatch:
    """uint8 batch -> normalised float on the device; erasing and mixup there too.

    Normalising on the device keeps that arithmetic off the CPU workers, which decode JPEGs and are the
    bottleneck of an ImageNet run; the transfer is also 4x smaller as uint8.
    """

    def __init__(self, augment: AugmentConfig, device, num_classes: int, *, channels_last: bool,
                 label_smoothing: float):
        from timm.data import Mixup
        from timm.data.random_erasing import RandomErasing

        self.device = device
        self.mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.erase = (RandomErasing(augment.re_prob, mode="pixel", device=str(device))
                      if augment.re_prob > 0 else None)
        self.mixup = (Mixup(mixup_alpha=augment.mixup, cutmix_alpha=augment.cutmix,
                            label_smoothing=label_smoothing, num_classes=num_classes)
                      if augment.mixes else None)

    def __call__(self, images, labels, train: bool = True):
        """(images, labels, targets): targets are the labels, or Mixup's soft targets."""
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
