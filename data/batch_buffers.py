"""Training batches in shared-memory buffers that each loader worker fills again and again.

Why not the DataLoader's own hand-off: a worker sends every batch in a new shared-memory segment,
which the kernel maps and zeroes one 4 KiB page fault at a time and unmaps once the batch is freed
(torch's default collate pays the same; what it costs: docs/benchmarks.md, "Data loader", the row
with the DataLoader's own hand-off). Here each worker owns ``BUFFERS_PER_WORKER``
fixed buffers. It stacks a batch into a free one and sends only the buffer's number and the labels (as
a list: a tensor, however small, travels in a shared-memory segment of its own); the main process
wraps the buffer in a tensor without copying. The buffer goes back to its worker when the last
tensor or view of it is freed (a finalizer on the numpy array under the tensor), so a batch the
caller keeps is never overwritten: while all of a worker's buffers are in use, it falls back to a new
segment.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import uuid
import weakref

import torch

log = logging.getLogger(__name__)

# The DataLoader keeps prefetch_factor (2) batches in flight per worker; one more is in the caller's
# hands and one in the pin-memory thread's.
BUFFERS_PER_WORKER = 4
SHM_DIR = "/dev/shm"  # where torch's shared-memory segments live on Linux

# Main process: the buffers of every live loader, by token, for the batches that arrive from workers.
_LIVE: weakref.WeakValueDictionary[str, "BatchBuffers"] = weakref.WeakValueDictionary()


class BatchBuffers:
    """``workers x BUFFERS_PER_WORKER`` uint8 buffers for ``[B, C, H, W]`` batches in channels_last memory
    (what the image transforms make, so a fill is a plain copy), made in the main process before the
    workers start; pickled into spawned workers as shared memory. A batch of smaller images (a lower
    training resolution) takes the front of a buffer."""

    def __init__(self, workers: int, batch_shape: tuple[int, int, int, int]):
        b, c, h, w = batch_shape
        self.batch_shape = torch.Size(batch_shape)
        self.pool = torch.empty((workers, BUFFERS_PER_WORKER, b, h, w, c), dtype=torch.uint8).share_memory_()
        self.busy = multiprocessing.Array("b", workers * BUFFERS_PER_WORKER, lock=False)
        self.token = uuid.uuid4().hex
        self._array = self.pool.numpy()
        _LIVE[self.token] = self

    @classmethod
    def create(cls, workers: int, batch_shape: tuple[int, int, int, int],
               local_ranks: int = 1) -> "BatchBuffers | None":
        """The buffers, or None (with a warning) if those of the ``local_ranks`` training processes on this
        node would take over half the free shared memory: the loader then sends every batch the DataLoader's
        way. The node's need, not this process's: all its processes check at the same moment, and each one's
        own share fitting could still overfill /dev/shm together (a SIGBUS when a page is first touched)."""
        mine = workers * BUFFERS_PER_WORKER * int(torch.Size(batch_shape).numel())
        need = mine * max(1, local_ranks)
        try:
            st = os.statvfs(SHM_DIR)
            free = st.f_bavail * st.f_frsize
        except OSError:
            return None
        if need > free // 2:
            # a warning, not info: the trainer shows warnings, and this costs throughput the user can get back
            log.warning("loader batch buffers of the %d training process(es) on this node would need %.1f GB of "
                        "%s, %.1f GB free: using the DataLoader's slower per-batch segments instead (give %s "
                        "more room, e.g. docker --shm-size, or fewer --workers)", max(1, local_ranks), need / 1e9,
                        SHM_DIR, free / 1e9, SHM_DIR)
            return None
        return cls(workers, batch_shape)

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_array"]  # the main process's view; a worker writes through ``pool``
        return state

    def fill(self, worker: int, images: list[torch.Tensor], labels: list[int]) -> "BufferedBatch | None":
        """In worker ``worker``: stack ``images`` into one of its free buffers; None if all are in use, or
        if the batch does not fit one (more images, channels or pixels than the buffers were made for)."""
        b, c, h, w = self.batch_shape
        (ci, hi, wi), n = images[0].shape, len(images)
        if n != b or ci != c or hi * wi > h * w or images[0].dtype != torch.uint8:
            return None
        for k in range(BUFFERS_PER_WORKER):
            i = worker * BUFFERS_PER_WORKER + k
            if not self.busy[i]:
                self.busy[i] = 1
                torch.stack(images, out=nchw(self.pool[worker, k].view(-1)[: n * hi * wi * c].view(n, hi, wi, c)))
                return BufferedBatch(self.token, worker, k, labels, (hi, wi))
        return None

    def release(self, worker: int, k: int) -> None:
        self.busy[worker * BUFFERS_PER_WORKER + k] = 0

    def in_use(self) -> int:
        return sum(self.busy)


def nchw(nhwc: torch.Tensor) -> torch.Tensor:
    """A ``[B, H, W, C]`` tensor as the ``[B, C, H, W]`` channels_last view that the loaders yield."""
    return nhwc.permute(0, 3, 1, 2)


class BufferedBatch:
    """A filled buffer on its way from a worker to the main process: its number (not its pixels) and
    the labels."""

    def __init__(self, token: str, worker: int, k: int, labels: list[int], size: tuple[int, int]):
        self.token, self.worker, self.k, self.labels, self.size = token, worker, k, labels, size
        self._arrived = self._taken = False

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._arrived = True  # this is the main process's copy: it owns the buffer from here

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels): the images share the buffer's memory, which is released when that tensor
        and every view of it are freed."""
        buffers = _LIVE[self.token]
        (b, c, _, _), (h, w) = buffers.batch_shape, self.size
        # a new numpy view of the buffer's front, kept alive by the tensor's storage
        array = buffers._array[self.worker, self.k].reshape(-1)[: b * h * w * c].reshape(b, h, w, c)
        weakref.finalize(array, buffers.release, self.worker, self.k)
        self._taken = True
        return nchw(torch.from_numpy(array)), torch.tensor(self.labels, dtype=torch.int64)

    def pin_memory(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """What the DataLoader's pin-memory thread calls: pinned copies; the buffer is free again."""
        images, labels = self.batch()
        return images.pin_memory(), labels.pin_memory()

    def __del__(self):
        # The DataLoader drops prefetched batches unread when an epoch is cut short; free their buffers.
        if self._arrived and not self._taken and self.token in _LIVE:
            _LIVE[self.token].release(self.worker, self.k)
