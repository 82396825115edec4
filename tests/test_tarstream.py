"""data.tarstream reads what webdataset's tarfile-based reader reads, in every tar format, and fails loudly."""

import gzip
import io
import tarfile

import pytest
from webdataset.tariterators import tar_file_iterator

from data.errors import DataError
from data.shard_reader import read_shard
from data.tarstream import tar_members

LONG = "d" * 90 + "/" + "sample_ü_" + "x" * 120  # over ustar's 100-byte name field, non-ASCII


def make_tar(fmt, members, *, extra=True) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        if extra:
            d = tarfile.TarInfo("a_dir")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            link = tarfile.TarInfo("a_link.jpg")
            link.type, link.linkname = tarfile.SYMTYPE, "000.jpg"
            tar.addfile(link)
            tar.addfile(tarfile.TarInfo("__index__"), io.BytesIO(b""))  # webdataset skips meta names
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def sample_members(n=5):
    return [(f"{k:03d}.{ext}", (f"{k}-{ext}-" * (50 * k + 100)).encode()) for k in range(n) for ext in ("jpg", "cls")]


class Trickle(io.RawIOBase):
    """A pipe-like stream: at most 1000 bytes per read."""

    def __init__(self, data):
        self.buf = io.BytesIO(data)

    def read(self, n=-1):
        return self.buf.read(min(n, 1000) if n >= 0 else 1000)


def ours(data: bytes, stream=None):
    return [(m["fname"], m["data"]) for m in tar_members(stream or io.BytesIO(data), "u")]


def reference(data: bytes):
    return [(m["fname"], m["data"]) for m in tar_file_iterator(io.BytesIO(data))]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_same_members_as_webdataset(fmt):
    members = sample_members() + ([] if fmt == tarfile.USTAR_FORMAT else [(LONG + ".jpg", b"long")])
    if fmt == tarfile.USTAR_FORMAT:  # ustar splits a path over 100 bytes into prefix/name
        members.append(("p" * 80 + "/" + "q" * 60 + ".jpg", b"split"))
    data = make_tar(fmt, members)
    got = ours(data)
    assert got == reference(data)
    assert got == [(name, d) for name, d in members]  # directory, link and __index__ skipped


def test_short_reads_and_empty_archives():
    data = make_tar(tarfile.PAX_FORMAT, sample_members(20))
    assert ours(data, stream=Trickle(data)) == reference(data)
    assert ours(make_tar(tarfile.PAX_FORMAT, [], extra=False)) == []
    assert ours(b"") == []


def test_compressed_shard_goes_to_webdataset():
    data = make_tar(tarfile.PAX_FORMAT, sample_members())
    assert ours(gzip.compress(data)) == reference(data)


def _second_header() -> int:
    return 512 + 512 * ((len(sample_members()[0][1]) + 511) // 512)


@pytest.mark.parametrize("cut, where", [(512 + 100, "member at byte 0"), (None, "header at byte")])
def test_truncated_stream_is_an_error(cut, where):
    data = make_tar(tarfile.PAX_FORMAT, sample_members(), extra=False)
    with pytest.raises(tarfile.ReadError, match=f"unexpected end of data in the {where}"):
        ours(data[:cut or _second_header() + 10])


def test_corrupt_header_is_an_error(tmp_path):
    data = bytearray(make_tar(tarfile.PAX_FORMAT, sample_members(), extra=False))
    second = _second_header()
    data[second + 5] ^= 0xFF
    with pytest.raises(tarfile.ReadError, match=f"bad tar header checksum at byte {second}"):
        ours(bytes(data))
    shard = tmp_path / "bad.tar"
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"cannot read shard {shard}: bad tar header checksum"):
        list(read_shard(str(shard)))


def test_read_shard_groups_samples(tmp_path):
    shard = tmp_path / "s.tar"
    shard.write_bytes(make_tar(tarfile.PAX_FORMAT, sample_members(3)))
    samples = list(read_shard(str(shard)))
    assert [s["__key__"] for s in samples] == ["000", "001", "002"]
    assert samples[1]["cls"] == b"1-cls-" * 150 and samples[1]["__url__"] == str(shard)


class Counting(io.BytesIO):
    """A seekable stream that counts the bytes read from it."""

    read_bytes = 0

    def read(self, n=-1):
        out = super().read(n)
        self.read_bytes += len(out)
        return out


def test_unwanted_members_are_sought_over_on_a_file_and_read_past_on_a_pipe():
    members = [(f"{k:03d}.{ext}", bytes([k]) * 20_000) for k in range(8) for ext in ("jpg", "cls")]
    data = make_tar(tarfile.PAX_FORMAT, members, extra=False)
    want = {"006.jpg", "006.cls"}
    for stream in (Counting(data), Trickle(data)):
        got = [(m["fname"], m["data"]) for m in tar_members(stream, "u", lambda name: name in want)]
        assert [name for name, _ in got] == [name for name, _ in members], "every member is still named, in order"
        assert all(d == (full if name in want else None) for (name, d), (_, full) in zip(got, members))
    seeking = Counting(data)
    list(tar_members(seeking, "u", lambda name: name in want))
    headers = 512 * (len(members) + 1)  # one per member, and the end-of-archive block
    assert seeking.read_bytes <= headers + 2 * 20_480, "headers and the two wanted members only"
    assert len(data) > 6 * seeking.read_bytes
