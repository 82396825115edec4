"""The validation loader: every validation sample exactly once over all ranks and workers, in equal shares.

The split's samples, its shards in manifest order end to end, are cut into one contiguous run per rank and
then per worker, of sizes that differ by at most one sample (``data.positions.even_share``): shards are
split by sample, as training splits them, so every rank evaluates as many images as any other whatever the
shard count. (Dealing whole shards left most ranks idle: 50 shards for 8 GPUs x 12 workers gave 3 ranks
nothing and the evaluation the time of the busiest; docs/benchmarks.md, "Validation balance".) A run that
starts inside a shard seeks to its first sample (data/shard_reader.py). Nothing is padded or repeated; the
last batch of each worker may be short.

Corrupt samples are skipped and counted as in training (data/pipeline.py); a batch is then shorter.
"""

from __future__ import annotations

import math
from itertools import islice

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from .device_decode import DeviceDecoder, EncodedBatch
from .pipeline import BadSampleCounter, SampleAccounting, check_rank, decode_batch, stack_images
from .positions import even_share
from .remote import ShardReads
from .shard_reader import read_positions
from .sources import ShardSet, resolve_shards
from .transforms import PlanResize, val_transform
from .workers import start_options, worker_slot


def worker_run(num_samples: int, rank: int, world_size: int, worker: int, workers: int) -> tuple[int, int]:
    """Positions [lo, hi) of the split that (rank, worker) evaluates: an even share of the rank's even share."""
    lo, hi = even_share(num_samples, rank, world_size)
    a, b = even_share(hi - lo, worker, workers)
    return lo + a, lo + b


class _ValStream(IterableDataset):
    """The samples of this rank's and worker's run of the split, once (see the module docstring)."""

    def __init__(self, shards: ShardSet, loader: "ValLoader", transform):
        self.shards, self.transform, self.counter = shards, transform, loader._counter
        self.rank, self.world_size, self.batch_size = loader.rank, loader.world_size, loader.batch_size
        self.encoded, self.reads = isinstance(transform, PlanResize), loader._reads

    def __iter__(self):
        worker, workers = worker_slot()
        lo, hi = worker_run(self.shards.num_samples, self.rank, self.world_size, worker, workers)
        in_manifest_order = list(range(len(self.shards.urls)))
        samples = (s for _, s in read_positions(self.shards.urls, self.shards.lengths, in_manifest_order,
                                                np.arange(lo, hi, dtype=np.int64), self.reads))
        while raw := list(islice(samples, self.batch_size)):
            images, labels, kept = decode_batch(raw, self.transform, self.shards.num_classes, self.counter)
            if images and self.encoded:
                yield EncodedBatch.pack(images, labels, kept, size=self.transform.size, resize=self.transform.resize)
            elif images:
                yield stack_images(images), torch.tensor(labels, dtype=torch.int64)


class ValLoader(SampleAccounting):
    """Every validation sample exactly once over all ranks and workers; finite; last batches may be short."""

    def __init__(self, shards: ShardSet, *, batch_size: int, num_workers: int, rank: int, world_size: int,
                 transform, max_bad_fraction: float = 0.001, decode_on=None, reads: ShardReads | None = None):
        self._reads = reads or ShardReads()
        self.num_classes, self.num_samples = shards.num_classes, shards.num_samples
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        workers = max(1, num_workers)
        runs = [worker_run(self.num_samples, rank, world_size, w, workers) for w in range(workers)]
        self._len = sum(math.ceil((hi - lo) / batch_size) for lo, hi in runs)
        self._counter = BadSampleCounter(max_bad_fraction)
        self._decoder = None if decode_on is None else DeviceDecoder(decode_on, self._counter, train=False)
        transform = transform if decode_on is None else PlanResize(transform)
        self._loader = DataLoader(_ValStream(shards, self, transform), batch_size=None, num_workers=num_workers,
                                  persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available(),
                                  **start_options(num_workers))

    def __len__(self) -> int:
        """Batches this rank yields (exact unless every sample of a batch is corrupt)."""
        return self._len

    def __iter__(self):
        return self._batches()


def build_val_loader(source, *, split: str = "val", batch_size: int, num_workers: int, rank: int = 0,
                     world_size: int = 1, image_size: int = 224, crop_pct: float = 0.875,
                     resize: int | None = None, info: str | None = None, decode_on=None,
                     interpolation: str = "bilinear", reads: ShardReads | None = None) -> ValLoader:
    """Validation loader over ``source``: resize the shorter side to ``resize`` (default image_size /
    crop_pct) with ``interpolation``, centre crop image_size; on ``decode_on`` and with ``reads`` as
    build_train_loader says."""
    check_rank(rank, world_size)
    shards = source if isinstance(source, ShardSet) else resolve_shards(source, split, info, reads)
    return ValLoader(shards, batch_size=batch_size, num_workers=num_workers, rank=rank, world_size=world_size,
                     transform=val_transform(image_size, crop_pct, resize, interpolation), decode_on=decode_on,
                     reads=reads)
