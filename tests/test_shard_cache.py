"""data/shard_cache.py: remote shards copied to a local folder while read, only whole and verified, evicted
least recently used first; over a real HTTP server on 127.0.0.1 (tests/shard_server.py)."""

import logging

import pytest

import data.shard_cache as shard_cache
from data.remote import RetryPolicy, ShardReads
from data.shard_cache import ShardCache
from data.shard_reader import read_samples, read_shard
from shard_server import Fault, serve

FAST = RetryPolicy(retries=4, timeout=1.5, first_delay=0.001)


@pytest.fixture
def server(digits_shards):
    with serve(digits_shards) as srv:
        yield srv


def keys(samples):
    return [(s["__key__"], s["cls"]) for s in samples]


def test_a_shard_read_whole_is_cached_verified_and_read_locally_after(server, digits_shards, tmp_path):
    cache = ShardCache(tmp_path / "cache", max_bytes=10**9)
    reads = ShardReads(FAST, cache)
    url = f"{server.url}/val-000002.tar"
    server.faults.append(Fault("reset", "val-000002", after=4000))  # the copy survives a retried read too
    first = keys(read_shard(url, reads))
    assert cache.path(url).read_bytes() == (digits_shards / "val-000002.tar").read_bytes()
    asked = len(server.requests)
    assert keys(read_shard(url, reads)) == first and len(server.requests) == asked, "the second read is local"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache.path(url).name], "no .tmp-* left"


def test_a_read_that_stops_early_leaves_nothing_in_the_cache(server, tmp_path):
    cache = ShardCache(tmp_path / "cache", max_bytes=10**9)
    got = list(read_samples(f"{server.url}/train-000004.tar", [2], 128, ShardReads(FAST, cache)))
    assert [i for i, _ in got] == [2]
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_copy_that_reads_back_other_bytes_is_not_cached(server, tmp_path, monkeypatch, caplog):
    cache = ShardCache(tmp_path / "cache", max_bytes=10**9)
    monkeypatch.setattr(shard_cache, "_sha256", lambda path: "0" * 64)  # as if the disk wrote something else
    with caplog.at_level(logging.WARNING, logger="data"):
        list(read_shard(f"{server.url}/val-000000.tar", ShardReads(FAST, cache)))
    assert list((tmp_path / "cache").iterdir()) == [] and "not cached" in caplog.text


def test_a_half_copy_never_takes_a_shards_place_and_a_stale_one_is_cleared(server, tmp_path, monkeypatch):
    cache = ShardCache(tmp_path / "cache", max_bytes=10**9)
    url = f"{server.url}/val-000001.tar"
    with ShardReads(FAST, cache).open(url) as stream:
        stream.read(10_000)  # the process "dies" here: nothing is in place, only its .tmp-* file
        assert not cache.path(url).exists()
        assert [p.name.startswith(".tmp-") for p in (tmp_path / "cache").iterdir()] == [True]
        monkeypatch.setattr(shard_cache, "STALE_TMP_S", -1)
        cache.evict()
        assert list((tmp_path / "cache").iterdir()) == []


def test_the_least_recently_used_shards_leave_at_the_cap(server, digits_shards, tmp_path):
    size = (digits_shards / "train-000000.tar").stat().st_size  # the first 11 train shards are the same size
    cache = ShardCache(tmp_path / "cache", max_bytes=2 * size)
    reads = ShardReads(FAST, cache)
    urls = [f"{server.url}/train-{i:06d}.tar" for i in range(3)]
    for url in urls[:2]:
        list(read_shard(url, reads))
    list(read_shard(urls[0], reads))  # a hit: shard 0 is now the most recently used
    list(read_shard(urls[2], reads))
    assert [cache.path(u).exists() for u in urls] == [True, False, True]
