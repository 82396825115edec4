"""data/positions.py: which samples of an epoch are used, in terms of no particular world size, and an epoch
continued under another layout (world size, workers, batch size) using each sample at most once.

The loaders run for real on test_pipeline's shards, whose images encode their sample ids; one loader per
rank stands for the processes of a run."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data.positions import Layout, Segment, pack, shard_order, shuffled, unpack, used
from data.shard_reader import read_shard
from test_pipeline import TRAIN_IDS, _ids, _train, shards  # noqa: F401 -- shards is a fixture

N = len(TRAIN_IDS)
SEED = 5


def loaders(source, world_size: int, **kw):
    return [_train(source, world_size=world_size, rank=r, seed=SEED, **kw) for r in range(world_size)]


def taken(ranks, epoch: int, *, start: int = 0, segment=None, stop: int | None = None) -> list[int]:
    """The sample ids of batches start..stop-1 of ``epoch`` (of ``segment``), all ranks together."""
    ids = []
    for loader in ranks:
        loader.set_epoch(epoch, start, segment=segment)
        for b, (x, _) in enumerate(loader, start):
            if stop is not None and b >= stop:
                break  # leaves the iterator as a stopped run does
            ids += _ids(x)
    return ids


def sequence(source, epoch: int) -> list[int]:
    """The sample ids in the order of the epoch's sequence: its shards in the epoch's order, end to end."""
    urls = sorted(str(p) for p in source.glob("train-*.tar"))
    ids = []
    for i in shard_order(SEED, epoch, len(urls)):
        for s in read_shard(urls[i]):
            rgb = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), dtype=float).mean(axis=(0, 1))
            ids.append(_ids(torch.tensor(rgb).view(1, 3, 1, 1))[0])
    return ids


def test_the_shuffle_buffer_order_depends_only_on_the_count_and_the_seed():
    words = [f"w{i}" for i in range(50)]
    order = list(shuffled(range(50), 7, random.Random(3)))
    assert sorted(order) == list(range(50)) and order != list(range(50))
    assert list(shuffled(words, 7, random.Random(3))) == [words[i] for i in order]


@pytest.mark.parametrize("world, workers, batch", [(1, 0, 4), (2, 2, 4), (3, 1, 3)])
def test_used_replays_what_the_readers_took_without_reading(shards, world, workers, batch):
    ranks = loaders(shards, world, num_workers=workers, batch_size=batch, shuffle_buffer=6)
    got = taken(ranks, 2, stop=3)
    positions = np.flatnonzero(used(Segment(2), Layout(world, max(1, workers), batch, 6), N, SEED, batches=3))
    seq = sequence(shards, 2)
    assert sorted(seq[p] for p in positions) == sorted(got)


def test_the_used_positions_pack_into_a_bit_per_sample():
    done = np.random.default_rng(0).random(1001) < 0.3
    bits = pack(done)
    assert bits.nbytes == 126 and np.array_equal(unpack(bits, 1001), done)


# (old world, old workers, old batch) -> (new ...): another world size, another --workers, another --batch-size
CHANGES = [((2, 1, 4), (1, 0, 4)), ((2, 1, 4), (3, 1, 4)), ((2, 1, 4), (2, 2, 4)), ((1, 2, 4), (1, 2, 3)),
           ((3, 1, 3), (2, 0, 5))]


@pytest.mark.parametrize("old, new", CHANGES)
def test_an_epoch_continued_under_another_layout_uses_each_sample_once(shards, old, new):
    (w0, k0, b0), (w1, k1, b1) = old, new
    first = loaders(shards, w0, num_workers=k0, batch_size=b0, shuffle_buffer=6)
    stop = 2
    before = taken(first, 1, stop=stop)
    second = loaders(shards, w1, num_workers=k1, batch_size=b1, shuffle_buffer=6)
    segment = second[0].continued(1, None, first[0].layout, batches=stop)
    assert segment.index == 1 and segment.done.sum() == len(before)
    assert second[0].batches_in(segment) == (N - len(before)) // (w1 * b1)
    after = taken(second, 1, segment=segment)
    everything = before + after
    assert len(set(everything)) == len(everything), "a sample used twice in one epoch"
    assert set(everything) <= set(TRAIN_IDS)
    assert N - len(everything) < w1 * b1, "fewer than one new global batch is left out"
    # and the next epoch is what a fresh run at the new size does
    fresh = loaders(shards, w1, num_workers=k1, batch_size=b1, shuffle_buffer=6)
    assert taken(second, 2) == taken(fresh, 2)


def test_a_continued_segment_resumes_exactly_and_changes_again(shards):
    """Stopped twice in one epoch under three layouts: the second segment resumed on its own layout gives its
    own tail, and a third layout again uses only what is left."""
    a = loaders(shards, 2, num_workers=1, batch_size=4, shuffle_buffer=6)
    used_a = taken(a, 0, stop=2)
    seg1 = a[0].continued(0, None, a[0].layout, batches=2)
    b = loaders(shards, 1, num_workers=2, batch_size=3, shuffle_buffer=6)
    whole_b = taken(b, 0, segment=seg1)
    b_first = taken(b, 0, segment=seg1, stop=3)
    assert taken(b, 0, segment=seg1, start=3) == whole_b[len(b_first):]  # same layout: the exact tail
    seg2 = b[0].continued(0, seg1, b[0].layout, batches=3)
    assert seg2.index == 2 and seg2.done.sum() == len(used_a) + len(b_first)
    c = loaders(shards, 3, num_workers=0, batch_size=2, shuffle_buffer=6)
    used_c = taken(c, 0, segment=seg2)
    everything = used_a + b_first + used_c
    assert len(set(everything)) == len(everything) and N - len(everything) < 3 * 2


def test_nothing_used_yet_means_the_new_layout_starts_the_epoch_afresh(shards):
    a = loaders(shards, 2, num_workers=1, batch_size=4)
    segment = a[0].continued(3, None, a[0].layout, batches=0)
    assert segment.index == 0 and segment.done is None
    b = loaders(shards, 1, num_workers=0, batch_size=4)
    assert taken(b, 3, segment=segment) == taken(loaders(shards, 1, num_workers=0, batch_size=4), 3)
