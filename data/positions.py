"""Where the readers are in an epoch, in terms that do not depend on how many processes read it.

An epoch is one sequence of the split's samples: the shards in an order drawn from (seed, epoch), read end
to end, so position ``p`` of the sequence names one sample whatever the world size. A ``Layout`` (ranks,
reader slots per rank, batch size, shuffle buffer) cuts the sequence into one run per slot, each exactly as
long as the slot's batches need (data/pipeline.py says why). A slot reads its run in order through a
seeded shuffle buffer; the buffer's output order depends only on the run's length and its seed, so which
positions a slot has used after ``k`` batches is computed from integers alone, without reading a byte.

A ``Segment`` is the part of an epoch read under one layout. A fresh epoch is one segment over every
position. When a run resumes mid-epoch under another layout (another world size, ``--workers`` or
``--batch-size``), the positions the earlier segments used are recorded (``Segment.done``, one bit per
sample) and a new segment cuts the unused ones, in sequence order, into runs for the new slots: every
sample is still used at most once in the epoch, and fewer than one new global batch is left out. The same
layout continues its segment, batch for batch, exactly as an uninterrupted run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import islice

import numpy as np


def seeded_rng(*parts) -> random.Random:
    # str seeds are hashed with SHA-512 by random.seed, so this is stable across processes and runs
    return random.Random("/".join(map(str, parts)))


def shard_order(seed: int, epoch: int, num_shards: int) -> list[int]:
    """The order the epoch reads the shards in: the same on every rank and worker."""
    order = list(range(num_shards))
    seeded_rng("shards", seed, epoch).shuffle(order)
    return order


def shuffled(items, bufsize: int, rng: random.Random):
    """Reservoir-style shuffle buffer: fill to ``bufsize``, then emit a random element per new one.

    Its output order depends only on the number of items and the rng, which is what lets ``used`` replay it
    on integers."""
    buf = []
    for s in items:
        if len(buf) < bufsize:
            buf.append(s)
            continue
        k = rng.randrange(bufsize)
        yield buf[k]
        buf[k] = s
    rng.shuffle(buf)
    yield from buf


def even_share(n: int, i: int, k: int) -> tuple[int, int]:
    """Positions [lo, hi) of part ``i`` of ``n`` cut into ``k`` consecutive parts whose sizes differ by at most
    one: how validation deals its samples, every one exactly once."""
    return n * i // k, n * (i + 1) // k


def owned(v: int, n: int, slots: int) -> int:
    """How many of the batch indices 0..n-1 fall to slot ``v`` under round-robin over ``slots``."""
    return max(0, (n - v + slots - 1) // slots)


@dataclass(frozen=True)
class Layout:
    """How a segment's positions are dealt: to ``world_size`` ranks of ``slots_per_rank`` reader slots (the
    DataLoader's workers, or one), in batches of ``batch_size`` drawn through a shuffle buffer."""

    world_size: int
    slots_per_rank: int
    batch_size: int
    shuffle_buffer: int

    def batches(self, num_positions: int) -> int:
        """Full batches per rank from ``num_positions`` positions: equal on every rank."""
        return num_positions // (self.batch_size * self.world_size)

    def run(self, rank: int, v: int, num_batches: int) -> tuple[int, int]:
        """Indices [lo, hi) into the segment's positions of slot (rank, v): consecutive slots get consecutive
        runs, each exactly as long as that slot's batches need."""
        B, W = self.batch_size, self.slots_per_rank
        lo = rank * num_batches * B + B * sum(owned(u, num_batches, W) for u in range(v))
        return lo, lo + B * owned(v, num_batches, W)

    def to_dict(self) -> dict:
        return dict(vars(self))

    def describe(self) -> str:
        return (f"{self.world_size} process(es) x {self.slots_per_rank} reader(s) x batch {self.batch_size}")


@dataclass(frozen=True)
class Segment:
    """The part of ``epoch`` read under one layout: ``index`` 0 is the epoch's start, ``index`` k follows k
    changes of layout; ``done`` marks the positions earlier segments used (None: none)."""

    epoch: int
    index: int = 0
    done: np.ndarray | None = None  # bool, one per sample of the epoch's sequence

    def positions(self, num_samples: int) -> np.ndarray:
        """The positions this segment deals, in sequence order."""
        if self.done is None:
            return np.arange(num_samples, dtype=np.int64)
        return np.flatnonzero(~self.done)

    def num_positions(self, num_samples: int) -> int:
        return num_samples if self.done is None else num_samples - int(self.done.sum())

    def rng(self, kind: str, seed: int, slot: int, *more) -> random.Random:
        """The seeded stream of one slot; segment 0 keeps the names runs have always used."""
        tail = () if self.index == 0 else ("segment", self.index)
        return seeded_rng(kind, seed, self.epoch, slot, *more, *tail)

    def order(self, n: int, bufsize: int, seed: int, slot: int) -> list[int]:
        """The order in which slot ``slot`` emits the ``n`` items of its run (indices into the run)."""
        return list(shuffled(range(n), bufsize, self.rng("buffer", seed, slot)))


def used(segment: Segment, layout: Layout, num_samples: int, seed: int, batches: int) -> np.ndarray:
    """Positions used once every rank has consumed ``batches`` batches of ``segment`` (and those earlier
    segments used): the shuffle buffer of each slot replayed on integers."""
    positions = segment.positions(num_samples)
    out = np.zeros(num_samples, dtype=bool) if segment.done is None else segment.done.copy()
    num_batches, W = layout.batches(len(positions)), layout.slots_per_rank
    for rank in range(layout.world_size):
        for v in range(W):
            lo, hi = layout.run(rank, v, num_batches)
            taken = owned(v, batches, W) * layout.batch_size
            rng = segment.rng("buffer", seed, rank * W + v)
            first = np.fromiter(islice(shuffled(range(hi - lo), layout.shuffle_buffer, rng), taken), np.int64)
            out[positions[lo + first]] = True
    return out


def next_segment(segment: Segment, layout: Layout, num_samples: int, seed: int, batches: int) -> Segment:
    """The segment that continues ``segment`` after ``batches`` of it under ``layout``, for another layout."""
    if batches == 0:
        return segment  # nothing of it was used: the new layout deals the same positions afresh
    return Segment(segment.epoch, segment.index + 1, used(segment, layout, num_samples, seed, batches))


def pack(done: np.ndarray) -> np.ndarray:
    """One bit per sample, for a checkpoint: 160 KB for ImageNet's 1.28 M training images."""
    return np.packbits(done)


def unpack(bits: np.ndarray, num_samples: int) -> np.ndarray:
    return np.unpackbits(bits, count=num_samples).astype(bool)
