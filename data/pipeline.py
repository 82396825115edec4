"""The training loader over our WebDataset shards, and what it shares with the validation loader
(data/validation.py): reading shards, decoding a batch, counting corrupt samples.

Both yield ``(images, labels)``: ``images`` a ``torch.uint8`` tensor ``[B, 3, H, W]`` in channels_last
memory (normalise on the device), ``labels`` ``torch.int64 [B]``. Rank and world size are passed in;
nothing here needs ``torch.distributed``. The loaders are plain iterables: do not pass them through
``accelerator.prepare``. With ``decode_on`` (a device) the workers ship undecoded JPEGs and the images
arrive decoded on that device (data/device_decode.py); everything below holds either way.

Training (``build_train_loader``)
    Every rank yields exactly ``len(loader) = num_samples // (batch_size * world_size)`` full batches
    per epoch, so no rank ever waits on another. Each epoch the shard list is shuffled from
    (seed, epoch) and read end to end as one sequence of samples; it is cut, by the per-shard counts
    in ``_info.json``, into one run per reader slot (``world_size * max(1, num_workers)`` slots),
    each exactly as long as the slot's batches need. So any number of shards works with any number
    of ranks and workers, no sample is used twice in an epoch, and fewer than one global batch is
    dropped (different samples each epoch). We do not use wds.split_by_node/split_by_worker: they
    deal whole shards, which cannot give equal step counts without resampling or padding.
    A slot streams its run through a shuffle buffer of undecoded samples and cuts it into batches.
    The DataLoader takes batch ``i`` of a rank from worker ``i % num_workers``, so slot ``v`` owns the
    rank's batches ``v, v + W, v + 2W, ...``: the batches are a function of (seed, epoch, rank,
    world size, worker count, image size) only; ``set_epoch`` may change the size from epoch to epoch.
    Random augmentation is seeded per batch, which makes ``set_epoch(e, start_batch=k)`` exact; the
    samples of the skipped batches are known from the shuffle buffer's order alone and are sought over,
    not read (data/positions.py, data/shard_reader.py). After a resume under another layout (world size,
    workers, batch size), ``set_epoch(e, segment=...)`` deals only the samples the epoch has not used.

Corrupt samples (undecodable image, missing or bad ``cls``) are skipped with one warning naming the
shard and key and counted in ``loader.bad_samples`` (shared memory, so it sums over all worker
processes). In a training batch the hole is filled with another sample of the same batch, which
keeps the batch full and resume exact. Once at least ``MIN_SAMPLES_FOR_BAD_RATE`` samples have been
decoded, a bad fraction above ``max_bad_fraction`` raises DataError naming the shard; so does a
batch in which every sample is bad.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
from contextlib import contextmanager
from itertools import islice

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .batch_buffers import BatchBuffers, BufferedBatch, nchw
from .device_decode import DeviceDecoder, EncodedBatch, decode_ahead
from .errors import DataError
from .remote import ShardReads
from .positions import Layout, Segment, next_segment, owned, pack, shard_order, unpack
from .shard_reader import in_order, read_positions
from .shards import IMAGE_KEY, LABEL_KEY, describe
from .sources import ShardSet, resolve_shards
from .transforms import PlanCrop, TrainAugment, train_transform
from .workers import context, start_options, worker_slot

log = logging.getLogger(__name__)

MIN_SAMPLES_FOR_BAD_RATE = 1000  # one bad image among the first few must not stop a run
SHUFFLE_BUFFER = 2000  # undecoded samples per worker: ~220 MB at ImageNet's ~110 KB per JPEG


# ---------------------------------------------------------------- reading and decoding

@contextmanager
def _seeded(seed: int):
    """Seed python, numpy and torch RNGs (timm and torchvision draw from all three), then restore them,
    so that with num_workers=0 the caller's own random streams are left untouched."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # CPU only: torch.manual_seed also queues CUDA/XPU/MTIA seeding, far dearer, once per batch
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class BadSampleCounter:
    """(bad, seen) counts and the latest bad sample's shard in shared memory: summed over worker
    processes, readable in the main one, so any worker can name the shard when it stops the run."""

    def __init__(self, max_bad_fraction: float):
        self.max_bad_fraction = max_bad_fraction
        self._counts = context().Array("q", 2)
        self._last_url = multiprocessing.Array("c", 1024, lock=False)  # guarded by _counts' lock

    @property
    def bad(self) -> int:
        return self._counts[0]

    @property
    def seen(self) -> int:
        return self._counts[1]

    def add(self, bad: int, seen: int, bad_url: str | None) -> None:
        """Count a decoded batch; raise once the bad fraction is over the limit (after enough samples)."""
        with self._counts.get_lock():
            self._counts[0] += bad
            self._counts[1] += seen
            if bad_url:
                self._last_url.value = bad_url.encode()[:1023]
            total_bad, total_seen, url = self._counts[0], self._counts[1], self._last_url.value.decode()
        if total_seen >= MIN_SAMPLES_FOR_BAD_RATE and total_bad > self.max_bad_fraction * total_seen:
            raise DataError(f"too many corrupt samples: {total_bad} of {total_seen} "
                            f"(more than {self.max_bad_fraction:.3%}), the latest in shard {url}")


def decode_batch(raw: list[dict], transform, num_classes: int, counter: BadSampleCounter):
    """Decode and transform ``raw`` samples (with decode='device': plan them); returns the lists of images,
    labels and samples kept."""
    images, labels, kept, bad_url = [], [], [], None
    for s in raw:
        try:
            label = int(s[LABEL_KEY])
            if not 0 <= label < num_classes:
                raise ValueError(f"class index {label} outside [0, {num_classes})")
            images.append(transform(s[IMAGE_KEY]))
            labels.append(label)
            kept.append(s)
        # RuntimeError: torchvision's JPEG decoder; the others: PIL and a missing or bad 'cls'
        except (KeyError, ValueError, OSError, SyntaxError, RuntimeError, Image.DecompressionBombError) as e:
            log.warning("skipping corrupt sample %s: %s: %s", describe(s), type(e).__name__, e)
            bad_url = s.get("__url__")
    counter.add(len(raw) - len(images), len(raw), bad_url)
    return images, labels, kept


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    """[3, H, W] images -> one [B, 3, H, W] batch in channels_last memory, in shared memory in a worker."""
    (c, h, w), n = images[0].shape, len(images)
    if get_worker_info() is None:
        out = torch.empty((n, h, w, c), dtype=images[0].dtype)
    else:
        # As torch's default_collate does in workers: build the batch in shared memory, which saves
        # the copy into shared memory when the batch is sent to the main process.
        storage = images[0].untyped_storage()._new_shared(n * images[0].nbytes)
        out = torch.empty(0, dtype=images[0].dtype).set_(storage).view(n, h, w, c)
    return torch.stack(images, out=nchw(out))


def main_line(e: Exception) -> str:
    """A worker's DataError reaches the main process with its traceback: keep the message only."""
    last = str(e).strip().splitlines()[-1]
    return last.split("DataError: ", 1)[-1]


class SampleAccounting:
    """What both loaders share: their counts (corrupt samples skipped; with ``decode_on``, images decoded on
    the CPU instead) and the way batches leave them."""

    _counter: BadSampleCounter
    _decoder: DeviceDecoder | None
    _loader: DataLoader
    _reads: ShardReads

    @property
    def shard_retries(self) -> int:
        """Remote shard reads retried so far (data/remote.py), over all workers of every loader sharing the
        ShardReads."""
        return self._reads.retries

    @property
    def bad_samples(self) -> int:
        """Corrupt samples skipped so far, over all workers of this rank."""
        return self._counter.bad

    @property
    def device_decoder(self) -> str | None:
        """decode_on: the name of the decoder the device uses (device_decode.device_jpeg_decoder); else None."""
        return self._decoder.backend if self._decoder else None

    @property
    def cpu_fallbacks(self) -> int:
        """decode_on: images decoded on the CPU so far instead (see data/device_decode.py)."""
        return self._decoder.cpu_fallbacks if self._decoder else 0

    def _batches(self):
        """The DataLoader's batches, decoded on the device first with ``decode_on``; a worker's DataError as
        one line."""
        try:
            yield from decode_ahead(self._loader, self._decoder) if self._decoder else self._loader
        except DataError as e:  # DataOutage stays one, for the trainer to requeue on
            raise type(e)(main_line(e)) from None


# ---------------------------------------------------------------- training

class _TrainStream(IterableDataset):
    """The batches of one rank; each DataLoader worker produces those of its slot (see module doc)."""

    def __init__(self, shards: ShardSet, loader: "TrainLoader", augment: TrainAugment):
        self.shards, self.augment, self.decode, self._transforms = shards, augment, loader.decode, {}
        self.rank, self.seed, self.layout = loader.rank, loader.seed, loader.layout
        self.batch_size, self.shuffle_buffer = loader.batch_size, loader.shuffle_buffer
        self.state, self.done_bits, self.counter = loader._state, loader._done_bits, loader._counter
        self.buffers, self.reads = loader._buffers, loader._reads

    def __iter__(self):
        # Read (epoch, start_batch, image size, segment) when the iterator is made, which a DataLoader does in
        # every worker at the start of every epoch, persistent workers included.
        epoch, start, size, index = (int(x) for x in self.state[:4])
        done = unpack(np.frombuffer(self.done_bits, dtype=np.uint8), self.shards.num_samples) if index else None
        worker, workers = worker_slot()
        # The DataLoader hands iteration batch j to worker j % workers; after skipping `start` batches
        # that is epoch batch start + j, owned by slot (worker + start) % workers.
        return self._batches(Segment(epoch, index, done), start, (worker + start) % workers, self.transform(size))

    def transform(self, size: int):
        """timm's training transform at ``size`` px (with decode='device': its planner), made once per size in
        each worker."""
        if size not in self._transforms:
            tf = train_transform(size, self.augment)
            self._transforms[size] = PlanCrop(tf) if self.decode == "device" else tf
        return self._transforms[size]

    def _batches(self, segment: Segment, start: int, v: int, transform):
        """Slot v's batches of ``segment`` from batch ``start`` of this rank on (see the module docstring)."""
        B, layout, workers = self.batch_size, self.layout, self.layout.slots_per_rank
        positions = segment.positions(self.shards.num_samples)
        num_batches, slot = layout.batches(len(positions)), self.rank * workers + v
        lo, hi = layout.run(self.rank, v, num_batches)
        order = segment.order(hi - lo, self.shuffle_buffer, self.seed, slot)
        first, count = owned(v, start, workers), owned(v, num_batches, workers)
        stream = self._samples(segment.epoch, positions[lo:hi], order[first * B:])
        for m in range(first, count):
            raw = list(islice(stream, B))
            with _seeded(segment.rng("augment", self.seed, slot, m).getrandbits(63)):
                images, labels, kept = decode_batch(raw, transform, self.shards.num_classes, self.counter)
            if not images:
                raise DataError(f"every sample of a batch is corrupt (shard {raw[-1]['__url__']})")
            if len(images) < B:  # refill from the good samples of this batch: batch stays full, resume stays exact
                images, labels, kept = ([x[i % len(x)] for i in range(B)] for x in (images, labels, kept))
            if self.decode == "device":
                yield EncodedBatch.pack(images, labels, kept, size=transform.size, resize=0)
                continue
            batch = self.buffers.fill(worker_slot()[0], images, labels) if self.buffers else None
            yield batch or (stack_images(images), torch.tensor(labels, dtype=torch.int64))

    def _samples(self, epoch: int, run: np.ndarray, order: list[int]):
        """The samples at ``run[k]`` for k in ``order`` (the slot's shuffle buffer order, with what a resume
        skips already left out), read from the shards in the epoch's order, what is skipped sought over.

        Cutting the sequence by sample counts from the manifest, not by whole shards, is what lets any
        number of shards feed any ranks x workers with equal steps and no sample twice in an epoch; a shard
        on a boundary is opened by both neighbouring slots, each reading only its own samples' data.
        """
        needed = np.sort(np.asarray(order, dtype=np.int64))
        shards = shard_order(self.seed, epoch, len(self.shards.urls))
        found = read_positions(self.shards.urls, self.shards.lengths, shards, run[needed], self.reads)
        return in_order(order, ((int(needed[k]), sample) for k, sample in found))


class TrainLoader(SampleAccounting):
    """``len(self)`` full batches per epoch on every rank; see the module docstring for the guarantees."""

    def __init__(self, shards: ShardSet, *, batch_size: int, num_workers: int, rank: int, world_size: int,
                 seed: int, augment: TrainAugment, image_size: int, max_bad_fraction: float,
                 max_image_size: int | None = None, shuffle_buffer: int = SHUFFLE_BUFFER, decode_on=None,
                 local_ranks: int = 1, reads: ShardReads | None = None):
        self.num_classes, self.num_samples = shards.num_classes, shards.num_samples
        self._reads = reads or ShardReads()
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.shuffle_buffer, self.decode = shuffle_buffer, "cpu" if decode_on is None else "device"
        self.layout = Layout(world_size, max(1, num_workers), batch_size, shuffle_buffer)
        self.num_batches = self.layout.batches(self.num_samples)
        _check_train_plan(shards, batch_size, world_size, max(1, num_workers))
        # (epoch, start_batch, image size, segment index) and the segment's used positions, read by the workers
        self._state = multiprocessing.Array("q", 4, lock=False)
        self._done_bits = multiprocessing.Array("B", (self.num_samples + 7) // 8, lock=False)
        self._counter = BadSampleCounter(max_bad_fraction)
        self._epoch, self._start, self._segment, self.image_size = 0, 0, None, image_size
        # The transforms make 3 x size x size uint8 images, at most max_image_size; a worker that gets
        # anything larger sends it the DataLoader's way (BatchBuffers.fill)
        big = max(image_size, max_image_size or 0)
        pixels = num_workers > 0 and decode_on is None  # with decode_on the workers ship bytes
        shape = (batch_size, 3, big, big)
        self._buffers = BatchBuffers.create(num_workers, shape, local_ranks) if pixels else None
        self._decoder = None if decode_on is None else DeviceDecoder(decode_on, self._counter, train=True)
        stream = _TrainStream(shards, self, augment)
        stream.transform(image_size)  # here, so a bad augmentation option fails before any worker starts
        self._loader = DataLoader(stream, batch_size=None,
                                  num_workers=num_workers, persistent_workers=num_workers > 0,
                                  pin_memory=torch.cuda.is_available(), **start_options(num_workers))

    def __len__(self) -> int:
        """Batches per rank in a whole epoch."""
        return self.num_batches

    def batches_in(self, segment: Segment | None) -> int:
        """Batches per rank in ``segment`` of an epoch (None: the whole epoch)."""
        return self.num_batches if segment is None else self.layout.batches(segment.num_positions(self.num_samples))

    def set_epoch(self, epoch: int, start_batch: int = 0, image_size: int | None = None,
                  segment: Segment | None = None) -> None:
        """The next iteration yields batches start_batch.. of ``epoch`` (of ``segment`` of it, after a resume
        under another layout), as a full one would, of images ``image_size`` px square (progressive resizing;
        default: the size last set)."""
        segment = segment if segment is not None and segment.done is not None else None
        if not 0 <= start_batch <= self.batches_in(segment):
            raise ValueError(f"start_batch {start_batch} outside [0, {self.batches_in(segment)}]")
        self._epoch, self._start, self._segment = epoch, start_batch, segment
        self.image_size = image_size or self.image_size

    def continued(self, epoch: int, segment: Segment | None, layout: Layout, batches: int) -> Segment:
        """The segment that continues ``epoch`` on this loader's layout after every rank consumed ``batches``
        batches of ``segment`` (None: the epoch's first) under ``layout`` (data/positions.py)."""
        return next_segment(segment or Segment(epoch), layout, self.num_samples, self.seed, batches)

    def __iter__(self):
        epoch, start, segment = self._epoch, self._start, self._segment
        self._epoch, self._start, self._segment = epoch + 1, 0, None  # without set_epoch, the next epoch
        index = 0 if segment is None else segment.index
        if index:
            np.frombuffer(self._done_bits, dtype=np.uint8)[:] = pack(segment.done)
        self._state[0], self._state[1], self._state[2], self._state[3] = epoch, start, self.image_size, index
        n, expected = 0, self.batches_in(segment) - start
        for batch in self._batches():
            n += 1
            yield batch.batch() if isinstance(batch, BufferedBatch) else batch
        if n != expected:  # cannot happen by construction; a hang in DDP would be worse
            raise DataError(f"rank {self.rank} produced {n} batches instead of {expected}")


def _check_train_plan(shards: ShardSet, batch_size: int, world_size: int, workers: int) -> None:
    if shards.num_samples < batch_size * world_size:
        raise DataError(f"{shards.split}: {shards.num_samples} samples are fewer than one global batch "
                        f"({batch_size} x {world_size} ranks)")
    if len(shards.urls) < world_size * workers:
        log.warning("%s: %d shards for %d ranks x %d workers: workers share shards and read past each "
                    "other's samples; more shards (a smaller --shard-size) read less", shards.split,
                    len(shards.urls), world_size, workers)


# ---------------------------------------------------------------- the API the trainer uses

def build_train_loader(source, *, split: str = "train", batch_size: int, num_workers: int, rank: int = 0,
                       world_size: int = 1, seed: int = 0, image_size: int = 224,
                       augment: TrainAugment = TrainAugment(), max_bad_fraction: float = 0.001,
                       max_image_size: int | None = None, info: str | None = None,
                       shuffle_buffer: int = SHUFFLE_BUFFER, decode_on=None, local_ranks: int = 1,
                       reads: ShardReads | None = None) -> TrainLoader:
    """Training loader over ``source`` (a shard folder, pattern or URL list, see data.sources; or the ShardSet
    that resolve_shards made of one, so that many processes need not each read the manifest), of
    ``image_size`` px images until ``set_epoch`` sets another size (up to ``max_image_size``, which
    sizes the shared-memory batch buffers, of which the ``local_ranks`` training processes on this node make
    one set each). ``decode_on`` None: the workers decode; a device: the JPEGs of each batch are decoded there
    in one call (data/device_decode.py). ``reads``: how remote shards are read and their retries counted
    (data/remote.py; default: the default RetryPolicy)."""
    check_rank(rank, world_size)
    shards = source if isinstance(source, ShardSet) else resolve_shards(source, split, info, reads)
    return TrainLoader(shards, batch_size=batch_size, num_workers=num_workers, rank=rank, world_size=world_size,
                       seed=seed, augment=augment, image_size=image_size, max_image_size=max_image_size,
                       max_bad_fraction=max_bad_fraction, shuffle_buffer=shuffle_buffer, decode_on=decode_on,
                       local_ranks=local_ranks, reads=reads)


def check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, world_size={world_size})")
