"""The members of a tar shard, read straight from its byte stream.

Why not webdataset's ``tar_file_iterator``: it goes through Python's ``tarfile``, which builds a full
TarInfo for every member and copies data through its own stream buffer; on our shards (three members
per sample) this reader costs a fraction of that (both measured in docs/benchmarks.md, "Data loader",
the stage table). It reads what tar writers produce
for shards (ustar, GNU long names, pax headers) and checks every header's checksum; a stream that
does not start with a tar header (``.tar.gz`` and other compressed shards) goes to webdataset's
reader, which decompresses.
"""

from __future__ import annotations

import io
import re
import tarfile
from typing import BinaryIO, Callable, Iterator

from webdataset.tariterators import tar_file_iterator

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = {b"0", b"\0", b"7"}  # '7' is a contiguous file: a regular file to every reader
_SKIP = re.compile(r"__[^/]*__($|/)")  # webdataset's default skip_meta: names like __index__
_META = {b"x", b"L", b"g", b"K"}  # pax and GNU headers that describe the next member


def _read(stream: BinaryIO, n: int) -> bytes:
    """Exactly ``n`` bytes (fewer only at the end of the stream): pipes may return short reads."""
    data = stream.read(n)
    while len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    return data


def _number(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256, for sizes over 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _is_header(block: bytes) -> bool:
    try:
        stored = _number(block[148:156])
    except ValueError:
        return False
    return stored == sum(block) - sum(block[148:156]) + 8 * 32  # the checksum field counts as spaces


def _pax_fields(data: bytes) -> dict[str, str]:
    """The records ``"<length> <key>=<value>\\n"`` of a pax extended header."""
    fields, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        length = int(data[pos:data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1:pos + length - 1].partition(b"=")
        fields[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return fields


def _seekable(stream) -> bool:
    try:
        return stream.seekable()
    except (AttributeError, OSError, ValueError):
        return False


class _Prefixed:
    """``stream`` with ``head`` put back in front of it (for handing a peeked stream on)."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out + (self.stream.read(n - len(out)) if len(out) < n else b"")


def _skip(stream: BinaryIO, n: int, seekable: bool) -> None:
    """Move ``n`` bytes on: seek where the stream can (a local file), read and drop otherwise (a pipe)."""
    if seekable:
        stream.seek(n, io.SEEK_CUR)
        return
    while n > 0:
        got = len(stream.read(min(n, 1 << 20)))
        if not got:
            return
        n -= got


def tar_members(stream: BinaryIO, url: str, wanted: Callable[[str], bool] | None = None) -> Iterator[dict]:
    """``{"fname", "data", "__url__"}`` for each regular file in the tar ``stream``, as webdataset's
    ``tar_file_iterator`` yields them (so ``group_by_keys`` groups them into samples). Raises
    ``tarfile.ReadError`` for a bad header or a stream that ends inside a member.

    ``wanted(name)``, called once per regular file in order, may refuse a member: its data is then not read
    (sought over where the stream can seek) and it is yielded with ``data`` None. This is what lets a reader
    start in the middle of a shard, or leave out samples already used, at the cost of reading headers."""
    block = _read(stream, BLOCK)
    if block and block != _ZERO_BLOCK and not _is_header(block):
        for member in tar_file_iterator(_Prefixed(block, stream)):
            keep = wanted is None or wanted(member["fname"])
            yield {**member, "data": member["data"] if keep else None, "__url__": url}
        return
    seekable = wanted is not None and _seekable(stream)
    pos, pax, long_name = 0, {}, None
    while len(block) == BLOCK and block != _ZERO_BLOCK:
        if not _is_header(block):
            raise tarfile.ReadError(f"bad tar header checksum at byte {pos}")
        kind, size = block[156:157], _number(block[124:136])
        size = int(pax.get("size", size))
        name = None
        if kind not in _META:
            name = pax.get("path") or long_name or _ustar_name(block)
            pax, long_name = {}, None
            name = name if kind in _REGULAR and not _SKIP.match(name) else None
        if name is not None and wanted is not None and not wanted(name):
            _skip(stream, size + (-size % BLOCK), seekable)
            data = None
        else:
            data = _read(stream, size)
            if len(data) < size:
                raise tarfile.ReadError(f"unexpected end of data in the member at byte {pos}")
            _read(stream, -size % BLOCK)
        pos += BLOCK + size + (-size % BLOCK)
        if kind == b"x":  # pax header for the next member
            pax = _pax_fields(data)
        elif kind == b"L":  # GNU long name for the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif name is not None:
            yield {"fname": name, "data": data, "__url__": url}
        block = _read(stream, BLOCK)
    if block and block != _ZERO_BLOCK:
        raise tarfile.ReadError(f"unexpected end of data in the header at byte {pos}")


def _ustar_name(block: bytes) -> str:
    name = block[:100].split(b"\0", 1)[0]
    if block[257:265] == b"ustar\x0000":  # POSIX ustar: long paths are split into prefix/name
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")
