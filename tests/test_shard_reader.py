"""data/shard_reader.py: chosen samples of a shard, and of an epoch's sequence, read without the others."""

import tarfile

import numpy as np
import pytest

from data.errors import DataError
from data.shard_reader import in_order, read_positions, read_samples, read_shard
from test_tarstream import make_tar, sample_members


@pytest.fixture
def shard_files(tmp_path):
    paths = []
    for s in range(3):
        path = tmp_path / f"s{s}.tar"
        members = [(f"{s}{name}", data) for name, data in sample_members(4)]  # keys 0000..0003, 1000.., 2000..
        path.write_bytes(make_tar(tarfile.PAX_FORMAT, members, extra=False))
        paths.append(str(path))
    return paths


def test_chosen_samples_of_a_shard_are_the_same_as_read_in_full(shard_files):
    whole = list(read_shard(shard_files[1]))
    got = list(read_samples(shard_files[1], [1, 3], expected=4))
    assert [i for i, _ in got] == [1, 3] and [s for _, s in got] == [whole[1], whole[3]]
    with pytest.raises(DataError, match=f"shard {shard_files[1]} holds fewer samples than the 6 its manifest lists"):
        list(read_samples(shard_files[1], [5], expected=6))


def test_positions_of_an_epoch_are_found_in_the_shard_order_given(shard_files):
    order = [2, 0, 1]  # the epoch's sequence: s2's four samples, then s0's, then s1's
    positions = np.array([0, 3, 5, 11])
    got = [(k, s["__key__"]) for k, s in read_positions(tuple(shard_files), (4, 4, 4), order, positions)]
    assert got == [(0, "2000"), (1, "2003"), (2, "0001"), (3, "1003")]


def test_in_order_holds_each_sample_until_its_turn():
    arriving = iter([(0, "a"), (1, "b"), (2, "c"), (3, "d")])
    assert list(in_order([2, 0, 3, 1], arriving)) == ["c", "a", "d", "b"]


def test_a_shard_with_more_samples_than_its_manifest_lists_is_named(shard_files):
    """The reader whose run ends at the shard's end looks one sample further: a manifest that says 3 for a
    shard of 4 was read as 3, the evaluation then 'short' of nothing and the fourth image never seen."""
    with pytest.raises(DataError, match=f"shard {shard_files[0]} holds more samples than the 3 its manifest lists"):
        list(read_samples(shard_files[0], [1, 2], expected=3))
    assert [i for i, _ in read_samples(shard_files[0], [1, 2], expected=4)] == [1, 2]  # not at the end: no look
    assert [i for i, _ in read_samples(shard_files[0], [3], expected=4)] == [3]  # exactly as listed
