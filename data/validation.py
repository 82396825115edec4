"""The validation loader: every validation sample exactly once over all ranks and workers.

Shard ``s`` goes to slot ``s % (world_size * W)``: every sample is read by exactly one rank and
worker, nothing is padded or repeated, the last batch of each worker may be short, and ranks or
workers without a shard yield nothing.

Corrupt samples are skipped and counted as in training (data/pipeline.py); a batch is then shorter.
"""

from __future__ import annotations

import math
from itertools import islice

import torch
from torch.utils.data import DataLoader, IterableDataset

from .device_decode import DeviceDecoder, EncodedBatch
from .pipeline import (BadSampleCounter, SampleAccounting, check_rank, decode_batch, ignore_stop_signals,
                       stack_images, worker_slot)
from .shard_reader import read_shard
from .sources import ShardSet, resolve_shards
from .transforms import PlanResize, val_transform


class _ValStream(IterableDataset):
    """The samples of this rank's shards, once: shard s belongs to slot s % (world_size * workers)."""

    def __init__(self, shards: ShardSet, loader: "ValLoader", transform):
        self.shards, self.transform, self.counter = shards, transform, loader._counter
        self.rank, self.world_size, self.batch_size = loader.rank, loader.world_size, loader.batch_size
        self.encoded = isinstance(transform, PlanResize)

    def __iter__(self):
        worker, workers = worker_slot()
        slots = self.world_size * workers
        mine = self.shards.urls[self.rank * workers + worker::slots]
        samples = (s for url in mine for s in read_shard(url))
        while raw := list(islice(samples, self.batch_size)):
            images, labels, kept = decode_batch(raw, self.transform, self.shards.num_classes, self.counter)
            if images and self.encoded:
                yield EncodedBatch.pack(images, labels, kept, size=self.transform.size, resize=self.transform.resize)
            elif images:
                yield stack_images(images), torch.tensor(labels, dtype=torch.int64)


class ValLoader(SampleAccounting):
    """Every validation sample exactly once over all ranks and workers; finite; last batches may be short."""

    def __init__(self, shards: ShardSet, *, batch_size: int, num_workers: int, rank: int, world_size: int,
                 transform, max_bad_fraction: float = 0.001, decode_on=None):
        self.num_classes, self.num_samples = shards.num_classes, shards.num_samples
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        workers, slots = max(1, num_workers), world_size * max(1, num_workers)
        self._len = sum(math.ceil(sum(shards.lengths[rank * workers + w::slots]) / batch_size)
                        for w in range(workers))
        self._counter = BadSampleCounter(max_bad_fraction)
        self._decoder = None if decode_on is None else DeviceDecoder(decode_on, self._counter, train=False)
        transform = transform if decode_on is None else PlanResize(transform)
        self._loader = DataLoader(_ValStream(shards, self, transform), batch_size=None, num_workers=num_workers,
                                  persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                                  worker_init_fn=ignore_stop_signals)

    def __len__(self) -> int:
        """Batches this rank yields (exact unless every sample of a batch is corrupt)."""
        return self._len

    def __iter__(self):
        return self._batches()


def build_val_loader(source, *, split: str = "val", batch_size: int, num_workers: int, rank: int = 0,
                     world_size: int = 1, image_size: int = 224, crop_pct: float = 0.875,
                     resize: int | None = None, info: str | None = None, decode_on=None) -> ValLoader:
    """Validation loader over ``source``: resize the shorter side to ``resize`` (default image_size /
    crop_pct), centre crop image_size; on ``decode_on`` as build_train_loader says."""
    check_rank(rank, world_size)
    shards = resolve_shards(source, split, info)
    return ValLoader(shards, batch_size=batch_size, num_workers=num_workers, rank=rank, world_size=world_size,
                     transform=val_transform(image_size, crop_pct, resize), decode_on=decode_on)
