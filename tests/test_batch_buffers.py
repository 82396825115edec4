"""data/batch_buffers.py: reused shared-memory batch buffers give the same batches as the DataLoader's
own hand-off, never overwrite a batch (or a view of one) the caller still holds, and do not leak."""

import gc
import pickle

import pytest
import torch

import data.batch_buffers
from data import build_train_loader
from data.batch_buffers import BUFFERS_PER_WORKER, BatchBuffers

WORKERS = 2


def loader(shards, **kw):
    return build_train_loader(shards, batch_size=16, num_workers=WORKERS, image_size=32, seed=1, **kw)


def epoch(ld, e, *, keep=False):
    """Epoch ``e``'s batches: the yielded tensors themselves with ``keep``, else copies."""
    ld.set_epoch(e)
    return [(x, y) if keep else (x.clone(), y.clone()) for x, y in ld]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


@pytest.fixture(scope="module")
def reference(digits_shards):
    """Epochs 0 and 1 through the DataLoader's own hand-off (no buffers)."""
    create = BatchBuffers.create
    BatchBuffers.create = classmethod(lambda cls, *a: None)
    try:
        ld = loader(digits_shards)
        assert ld._buffers is None
        return [epoch(ld, 0), epoch(ld, 1)]
    finally:
        BatchBuffers.create = create


def test_buffered_batches_equal_plain_ones_and_buffers_come_back(digits_shards, reference):
    ld = loader(digits_shards)
    assert ld._buffers is not None
    assert same(epoch(ld, 0), reference[0])  # copies: every buffer is reused many times
    assert ld._buffers.in_use() == 0
    held = epoch(ld, 1, keep=True)  # holding all 89 batches: buffers run out and workers fall back
    assert same(held, reference[1])
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in held + reference[0])
    assert ld._buffers.in_use() == WORKERS * BUFFERS_PER_WORKER
    del held
    gc.collect()
    assert ld._buffers.in_use() == 0


def test_a_view_keeps_its_buffer_from_being_reused(digits_shards, reference):
    ld = loader(digits_shards)
    ld.set_epoch(0)
    views = []
    for x, _ in ld:
        views.append(x[3:5])  # the batch itself is dropped; only a view of it lives on
    assert all(torch.equal(v, x[3:5]) for v, (x, _) in zip(views, reference[0]))


def test_an_epoch_cut_short_frees_the_buffers_of_batches_never_read(digits_shards, reference):
    ld = loader(digits_shards)
    ld.set_epoch(0)
    for i, batch in enumerate(ld):
        if i == 2:
            break  # the DataLoader still holds prefetched batches; the next epoch discards them
    del batch
    assert same(epoch(ld, 1), reference[1])
    gc.collect()
    assert ld._buffers.in_use() == 0


def test_pinning_copies_the_batch_and_frees_the_buffer(monkeypatch, reference):
    # the DataLoader's pin-memory thread calls BufferedBatch.pin_memory; on this CPU-only machine a
    # copy stands in for pinned memory. Filled here, not by live workers: a worker that is still
    # prefetching may take the freed buffer again at once, which would make the check below a race.
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: self.clone())
    images, labels = reference[0][0]
    buffers = BatchBuffers(1, tuple(images.shape))
    sent = buffers.fill(0, list(images), labels.tolist())
    raw = pickle.loads(pickle.dumps(sent))  # what arrives in the main process from a worker
    busy = raw.worker * BUFFERS_PER_WORKER + raw.k
    assert buffers.busy[busy] == 1
    pinned, pinned_labels = raw.pin_memory()
    assert torch.equal(pinned, images) and torch.equal(pinned_labels, labels)
    assert buffers.busy[busy] == 0  # the copy holds no buffer


def test_no_buffers_when_shared_memory_is_short(digits_shards, monkeypatch, reference, caplog):
    class Tiny:
        f_bavail, f_frsize = 100, 4096

    monkeypatch.setattr(data.batch_buffers.os, "statvfs", lambda path: Tiny)
    ld = loader(digits_shards)
    assert ld._buffers is None
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "/dev/shm" in r.getMessage()]
    assert len(warned) == 1 and "0.0 GB free" in warned[0].getMessage()  # one line, with the figures
    assert same(epoch(ld, 0), reference[0])


def test_a_lower_resolution_fills_the_front_of_the_same_buffers(digits_shards):
    """Progressive resizing: buffers made for the largest size carry every smaller epoch; the batches equal
    those of a loader made for that size."""
    ramp = build_train_loader(digits_shards, batch_size=16, num_workers=WORKERS, image_size=24, max_image_size=40,
                              seed=1)
    for size in (24, 40, 32):
        ramp.set_epoch(1, image_size=size)
        it = iter(ramp)
        x, y = next(it)
        assert ramp._buffers.in_use() >= 1, "the batch came through a buffer, not the DataLoader's hand-off"
        got = [(x.clone(), y.clone())] + [(a.clone(), b.clone()) for a, b in it]
        del x
        assert {tuple(x.shape) for x, _ in got} == {(16, 3, size, size)}
        assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in got)
        fixed = build_train_loader(digits_shards, batch_size=16, num_workers=WORKERS, image_size=size, seed=1)
        assert same(got, epoch(fixed, 1))
    gc.collect()
    assert ramp._buffers.in_use() == 0 and ramp._buffers.batch_shape == (16, 3, 40, 40)


def test_shared_memory_is_accounted_for_every_training_process_on_the_node(monkeypatch, caplog):
    """8 local ranks check at the same moment: each one's share fitting is not enough (they would overfill it
    together, a SIGBUS), so the node's need is what is compared."""
    shape = (4, 3, 16, 16)
    mine = 2 * BUFFERS_PER_WORKER * 4 * 3 * 16 * 16

    class Room:
        f_bavail, f_frsize = 3 * mine, 1  # one process's buffers fit in half of it, eight processes' do not

    monkeypatch.setattr(data.batch_buffers.os, "statvfs", lambda path: Room)
    assert BatchBuffers.create(2, shape, local_ranks=1) is not None
    assert BatchBuffers.create(2, shape, local_ranks=8) is None
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "of the 8 training process(es) on this node" in warned[0]
