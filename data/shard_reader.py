"""Samples out of tar shards: a whole shard, or chosen positions of an epoch's sequence (data/positions.py),
the others sought over rather than read.

Seeking is what makes a reader's start anywhere in a shard cost about what a start at its beginning does: a
slot whose run begins mid-shard, or a resume late in an epoch, reads the tar headers of the samples it
passes (512 bytes each) and not their images. Remote shards (data/remote.py) seek too: a short gap is read
and dropped, a long one skipped with a new ranged request. ``pipe:`` streams read past them.
"""

from __future__ import annotations

import tarfile
from typing import Iterable, Iterator

import numpy as np
from webdataset.tariterators import base_plus_ext, group_by_keys

from .errors import DataError
from .remote import ShardReads, redact
from .tarstream import tar_members

_default_reads = None


def default_reads() -> ShardReads:
    """The ShardReads of callers that pass none: the default retry policy, retries counted nowhere in particular."""
    global _default_reads
    if _default_reads is None:
        _default_reads = ShardReads()
    return _default_reads


def read_shard(url: str, reads: ShardReads | None = None):
    """The samples of one tar shard, as dicts of undecoded bytes plus ``__key__`` and ``__url__`` (credentials
    hidden)."""
    name = redact(url)
    try:
        with (reads or default_reads()).open(url) as stream:
            yield from group_by_keys(tar_members(stream, name))
    except (OSError, EOFError, tarfile.TarError, ValueError) as e:
        raise DataError(f"cannot read shard {name}: {e}") from None


class _SampleCounter:
    """``tar_members``' ``wanted``: numbers the samples as ``group_by_keys`` groups them (a new key, a new
    sample) and wants the members of the chosen ones only."""

    def __init__(self, chosen: set[int]):
        self.chosen, self.index, self.key = chosen, -1, None

    def __call__(self, name: str) -> bool:
        key = base_plus_ext(name)[0]
        if key is None:
            return False  # group_by_keys drops such names too
        if key != self.key:
            self.index, self.key = self.index + 1, key
        return self.index in self.chosen


def read_samples(url: str, indices: list[int], expected: int, reads: ShardReads | None = None):
    """(index, sample) for the samples numbered ``indices`` (sorted, within the shard's ``expected`` count),
    in order; the others' data is never read, and reading stops after the last one. A shard holding another
    count than its manifest lists is an error: fewer is found where a sample is missing; more, by the reader
    whose run ends at the shard's end, which looks one sample further (its headers only)."""
    if not indices:
        return
    chosen, last, name = set(indices), indices[-1], redact(url)
    stop = last if last < expected - 1 else expected  # look past the end: one more sample there is one too many
    i = -1
    try:
        with (reads or default_reads()).open(url) as stream:
            for i, sample in enumerate(group_by_keys(tar_members(stream, name, _SampleCounter(chosen)))):
                if i == expected:
                    raise DataError(f"shard {name} holds more samples than the {expected} its manifest lists")
                if i in chosen:
                    yield i, sample
                if i >= stop:
                    return
    except (OSError, EOFError, tarfile.TarError, ValueError) as e:
        raise DataError(f"cannot read shard {name}: {e}") from None
    if i == last == expected - 1:  # the shard ended right after its last listed sample
        return
    raise DataError(f"shard {name} holds fewer samples than the {expected} its manifest lists")


def read_positions(urls: tuple[str, ...], lengths: tuple[int, ...], order: list[int],
                   positions: np.ndarray, reads: ShardReads | None = None) -> Iterator[tuple[int, dict]]:
    """(k, sample) for each of the sorted epoch ``positions`` (k its index in ``positions``), the shards read
    in ``order``; shards holding none of them are not opened."""
    sizes = np.array([lengths[i] for i in order], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    shard_of = np.searchsorted(starts, positions, side="right") - 1
    k = 0
    for s in np.unique(shard_of):
        take = positions[shard_of == s] - starts[s]
        url = urls[order[s]]
        for _, sample in read_samples(url, take.tolist(), int(sizes[s]), reads):
            yield k, sample
            k += 1


def in_order(order: Iterable[int], samples: Iterator[tuple[int, dict]]):
    """The samples in ``order`` (indices into the run), from ``samples`` arriving in increasing index: each
    is held from its read until its turn, so no more are held than the shuffle buffer held."""
    held = {}
    for k in order:
        while k not in held:
            j, sample = next(samples)
            held[j] = sample
        yield held.pop(k)
