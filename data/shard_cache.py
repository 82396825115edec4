"""A local copy of remote shards (``--shard-cache DIR``), so later epochs read them from the node's disk.

A shard enters the cache only whole and verified: the bytes of its first read are written to a file beside the
cache's (``.tmp-*``, unique per process) while the reader consumes them, hashed as they arrive; when the read
reaches the end of the shard the file is read back, its sha256 compared with the stream's, and only then
renamed into place. A crash, a reader that stops early (a slot whose run ends mid-shard) or a disk that wrote
something else leaves no shard behind, only a ``.tmp-*`` file that the next insertion clears. Shards are kept
up to a size cap, the least recently used leaving first (each hit renews a file's modification time). Many
processes of a node may share one cache: names are per URL, renames atomic, and a file removed while another
process reads it stays readable to that process (POSIX).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from pathlib import Path

from .errors import DataError
from .remote import redact

log = logging.getLogger(__name__)

TAIL_DRAIN = 64 << 10  # bytes: a reader that stopped this close to the end (tar's end padding) is finished for it
STALE_TMP_S = 3600  # a .tmp-* file untouched this long belongs to a process that died


class ShardCache:
    """Whole, verified copies of remote shards under ``root``, at most ``max_bytes`` in all."""

    def __init__(self, root: str, max_bytes: int):
        self.root, self.max_bytes = Path(root), max_bytes
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, url: str) -> Path:
        """The cached copy of ``url``: named by a hash of the full URL, and the shard's own name for a reader."""
        digest = hashlib.sha256(url.encode()).hexdigest()[:24]
        return self.root / f"{digest}-{url.rsplit('/', 1)[-1].split('?')[0]}"

    def open(self, url: str, remote):
        """The cached copy of ``url`` if there is one; else ``remote()``'s stream, copied while it is read."""
        path = self.path(url)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            return Filling(remote(), path, self)
        os.utime(path)  # least recently used leaves first
        return f

    def admit(self, tmp: Path, path: Path, digest: str) -> None:
        """``tmp`` into the cache as ``path`` if it reads back as ``digest``; then evict down to the cap."""
        if _sha256(tmp) != digest:
            log.warning("shard cache: %s read back other bytes than were received; not cached", tmp)
            tmp.unlink(missing_ok=True)
            return
        os.replace(tmp, path)
        self.evict()

    def evict(self) -> None:
        files, now = [], time.time()
        for p in self.root.iterdir():
            try:
                st = p.stat()
            except FileNotFoundError:  # another process evicted it meanwhile
                continue
            if p.name.startswith(".tmp-"):
                if now - st.st_mtime > STALE_TMP_S:
                    p.unlink(missing_ok=True)
                continue
            files.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            p.unlink(missing_ok=True)
            total -= size


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class Filling(io.RawIOBase):
    """A remote stream whose bytes are also written to a temporary file and hashed; forward seeks read the gap
    (the copy needs it). On close, a stream read to its end (or to within TAIL_DRAIN of it, then drained)
    enters the cache; any other is dropped."""

    def __init__(self, source, path: Path, cache: ShardCache):
        super().__init__()
        self.source, self.path, self.cache, self.name = source, path, cache, redact(getattr(source, "name", ""))
        self.tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        self.file, self.hash, self.pos, self.ended = open(self.tmp, "wb"), hashlib.sha256(), 0, False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        data = self.source.read(n)
        if not data and n != 0:
            self.ended = True
        self.file.write(data)
        self.hash.update(data)
        self.pos += len(data)
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = offset if whence == io.SEEK_SET else self.pos + offset
        while self.pos < target and self.read(min(target - self.pos, 1 << 20)):
            pass
        return self.pos

    def close(self) -> None:
        if self.closed:
            return
        try:
            total = getattr(self.source, "total", None)
            if not self.ended and total is not None and total - self.pos <= TAIL_DRAIN:
                while self.read(1 << 16):
                    pass
            self.file.close()
            if self.ended:
                self.cache.admit(self.tmp, self.path, self.hash.hexdigest())
        except (OSError, DataError) as e:  # a full disk, a store gone for the tail: the run goes on uncached
            log.warning("shard cache: %s not cached: %s", self.name, e)
        finally:
            self.tmp.unlink(missing_ok=True)
            self.source.close()
            super().close()
