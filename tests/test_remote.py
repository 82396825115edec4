"""data/remote.py and remote sources: shards read over a real HTTP server on 127.0.0.1 (tests/shard_server.py),
with faults injected, give the same samples as the local folder; the retries are counted; a store that stays
down is a DataOutage; URLs never reach a shell and their credentials never reach a message."""

import json
import logging
import random
import shutil

import numpy as np
import pytest

import data.remote as remote
from data.errors import DataError, DataOutage
from data.remote import RetryPolicy, ShardReads, redact
from data.shard_reader import read_positions, read_samples, read_shard
from data.sources import resolve_shards
from shard_server import Fault, serve

FAST = RetryPolicy(retries=4, timeout=1.5, first_delay=0.001)  # a stall fails after 1.5 s (no busy CI machine
# pauses a loopback read that long, so no retry is counted that was not injected); backoffs are ms


def keys_and_labels(samples):
    return [(s["__key__"], s["cls"]) for s in samples]


@pytest.fixture
def server(digits_shards):
    with serve(digits_shards) as srv:
        yield srv


def test_redact_hides_userinfo_and_query_tokens():
    text = "cannot read https://alice:s3cret@store.example/in1k/train-000001.tar?X-Amz-Signature=abc&t=1 now"
    assert redact(text) == "cannot read https://***@store.example/in1k/train-000001.tar?*** now"
    assert redact("/data/in1k/train-000001.tar") == "/data/in1k/train-000001.tar"


def test_backoff_doubles_with_jitter_between_half_and_full():
    policy, rng = RetryPolicy(first_delay=1.0), random.Random(0)
    for attempt in (1, 2, 5):
        delays = [policy.delay(attempt, rng) for _ in range(50)]
        assert all(2 ** (attempt - 1) * 0.5 <= d <= 2 ** (attempt - 1) for d in delays)
        assert len(set(delays)) > 1


def test_a_shard_read_over_faulty_http_equals_the_local_one(server, digits_shards, caplog):
    local = keys_and_labels(read_shard(str(digits_shards / "train-000003.tar")))
    server.faults += [Fault("reset", "train-000003", after=5000), Fault("503", "train-000003"),
                      Fault("short", "train-000003", after=20000), Fault("stall", "train-000003", after=90000)]
    reads = ShardReads(FAST)
    with caplog.at_level(logging.WARNING, logger="data"):
        got = keys_and_labels(read_shard(f"{server.url}/train-000003.tar", reads))
    assert got == local and len(got) == 128
    assert reads.retries == server.injected == 4
    starts = [start for path, start in server.requests]
    assert starts[0] == 0 and all(s > 0 for s in starts[1:]), "each retry continues where the read stopped"
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 4 and all("train-000003.tar: read failed at byte" in w for w in warned)
    assert any("HTTP 503" in w for w in warned) and any("timed out" in w for w in warned)


def test_chosen_samples_skip_with_ranged_requests_and_survive_a_reset(server, digits_shards, monkeypatch):
    monkeypatch.setattr(remote, "REOPEN_GAP", 1000)  # digits' samples are ~3.5 KB: reopen past each one skipped
    local = [(i, s["__key__"], s["cls"]) for i, s in read_samples(str(digits_shards / "train-000001.tar"),
                                                                  [3, 60, 61, 127], 128)]
    server.faults.append(Fault("reset", "train-000001", after=1500, times=2))
    reads = ShardReads(FAST)
    got = [(i, s["__key__"], s["cls"]) for i, s in read_samples(f"{server.url}/train-000001.tar",
                                                                [3, 60, 61, 127], 128, reads)]
    assert got == local and reads.retries == 2
    assert len(server.requests) >= 4, "the long gaps were skipped with new ranged requests"


def test_an_epoch_sequence_over_http_equals_the_local_one(server, digits_shards):
    local = resolve_shards(digits_shards, "train")
    remote_set = resolve_shards(server.url, "train")
    assert remote_set.lengths == local.lengths and remote_set.num_classes == local.num_classes
    assert remote_set.urls[0] == f"{server.url}/train-000000.tar"
    order, positions = [3, 0, 7], np.array([5, 127, 128, 300, 383])
    server.faults.append(Fault("reset", "train-000007", after=2000))
    want = [(k, s["__key__"]) for k, s in read_positions(local.urls, local.lengths, order, positions)]
    got = [(k, s["__key__"]) for k, s in read_positions(remote_set.urls, remote_set.lengths, order, positions,
                                                        ShardReads(FAST))]
    assert got == want


def test_a_store_that_stays_down_is_an_outage_naming_shard_byte_and_cause(server):
    server.faults.append(Fault("503", "train-000002", times=100))
    reads = ShardReads(RetryPolicy(retries=3, timeout=0.5, first_delay=0.001))
    with pytest.raises(DataOutage, match=r"data outage: shard http://127\.0\.0\.1:\d+/train-000002\.tar "
                                         r"unreadable at byte 0 after 4 attempts .*HTTP 503"):
        list(read_shard(f"{server.url}/train-000002.tar", reads))
    assert reads.retries == 3
    capped = ShardReads(RetryPolicy(retries=50, timeout=0.5, first_delay=0.01, max_wait=0.05))
    with pytest.raises(DataOutage):
        list(read_shard(f"{server.url}/train-000002.tar", capped))
    assert capped.retries < 5, "the cap on the total wait ends the retries before the attempts run out"


def test_a_missing_shard_fails_at_once_without_retries(server):
    reads = ShardReads(FAST)
    with pytest.raises(DataError, match="train-000099.tar: HTTP 404") as info:
        list(read_shard(f"{server.url}/train-000099.tar", reads))
    assert not isinstance(info.value, DataOutage) and reads.retries == 0


def test_credentials_are_sent_but_never_shown(server, caplog):
    server.faults.append(Fault("503", "train-000000", times=100))
    url = server.url.replace("http://", "http://alice:s3cret@") + "/train-000000.tar?token=t0ken"
    with caplog.at_level(logging.WARNING, logger="data"), pytest.raises(DataOutage) as info:
        list(read_shard(url, ShardReads(RetryPolicy(retries=1, first_delay=0.001))))
    shown = str(info.value) + "".join(r.getMessage() for r in caplog.records)
    assert "s3cret" not in shown and "t0ken" not in shown and "***@127.0.0.1" in shown


def test_a_url_prefix_finds_both_splits_like_the_folder(server, digits_shards):
    for split in ("train", "val"):
        here, there = resolve_shards(digits_shards, split), resolve_shards(server.url + "/", split)
        assert there.lengths == here.lengths and there.num_samples == here.num_samples
        assert [u.rsplit("/", 1)[1] for u in there.urls] == [u.rsplit("/", 1)[1] for u in here.urls]


def test_a_training_pattern_asked_for_validation_gives_the_validation_shards(server, digits_shards):
    """The bug of issue 18: a pattern evaluated on its own (training) shards, whatever the split."""
    pattern = server.url + "/train-{000000..000001}.tar"
    train = resolve_shards(pattern, "train")
    assert train.num_samples == 256
    val = resolve_shards(pattern, "val")
    assert val.num_samples == 360 and all("/val-" in u for u in val.urls)
    local = resolve_shards(str(digits_shards / "train-{000000..000002}.tar"), "val")
    assert local.num_samples == 360 and all("/val-" in u for u in local.urls)


@pytest.mark.parametrize("name", ["/etc/passwd", "../other/train-000000.tar", "a/../../b.tar",
                                  "pipe:cat x.tar", "https://elsewhere/x.tar"])
def test_unsafe_shard_names_in_a_manifest_are_refused(tmp_path, digits_shards, name):
    shutil.copy(digits_shards / "classes.txt", tmp_path)
    info = json.loads((digits_shards / "_info.json").read_text())
    info["splits"]["val"]["filenames"][1] = name
    (tmp_path / "_info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=rf"shard manifest {tmp_path}/_info.json lists .*plain names"):
        resolve_shards(tmp_path, "train")


def test_a_url_never_passes_through_a_shell(tmp_path, digits_shards, monkeypatch):
    folder = tmp_path / "q'$(touch pwned)'"
    shutil.copytree(digits_shards, folder)
    monkeypatch.chdir(tmp_path)
    with serve(tmp_path) as srv:
        shards = resolve_shards(f"{srv.url}/q'$(touch%20pwned)'", "val")
        samples = list(read_shard(shards.urls[0]))
    assert shards.num_samples == 360 and len(samples) == shards.lengths[0]
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "q'").exists()


def test_the_loaders_over_faulty_http_give_the_local_batches_and_count_the_retries(server, digits_shards):
    """The training loader (one worker process: the count is in shared memory) and the validation loader, over
    HTTP with a reset and a 503, yield the labels they yield from the local folder, the validation every image
    once; both count their retries into the ShardReads they share."""
    from data import build_train_loader, build_val_loader

    def labels(loaders):
        return [y.tolist() for loader in loaders for _, y in loader]

    def loaders(source, reads=None):
        train = build_train_loader(source, batch_size=64, num_workers=1, image_size=32, seed=3, reads=reads)
        train.set_epoch(0, start_batch=5)  # a resume: the first 5 batches' samples are sought over
        val = build_val_loader(source, batch_size=100, num_workers=0, image_size=32, crop_pct=1.0, reads=reads)
        return train, val

    local = labels(loaders(digits_shards))
    server.faults += [Fault("reset", "train-", after=9000), Fault("503", "val-000001")]
    reads = ShardReads(FAST)
    train, val = loaders(server.url, reads)
    assert labels([train, val]) == local
    assert sum(len(b) for b in local[-4:]) == 360
    assert train.shard_retries == val.shard_retries == reads.retries == 2


def test_object_store_urls_go_through_fsspec_and_read_like_the_folder(digits_shards, monkeypatch):
    """s3:// and gs:// are read through fsspec's ranged file objects; fsspec's in-memory store stands in for a
    bucket here (s3fs and gcsfs are optional and not installed for the tests: see README)."""
    import fsspec

    assert remote.is_remote("s3://bucket/in1k") and remote.is_remote("gs://bucket/in1k")
    assert not remote.is_remote("/data/in1k") and not remote.is_remote("pipe:cat x.tar")
    monkeypatch.setattr(remote, "FSSPEC_SCHEMES", remote.FSSPEC_SCHEMES + ("memory://",))
    fs = fsspec.filesystem("memory")
    for f in digits_shards.iterdir():
        fs.pipe(f"/bucket18/in1k/{f.name}", f.read_bytes())
    try:
        shards = resolve_shards("memory://bucket18/in1k", "val")
        assert shards.lengths == resolve_shards(digits_shards, "val").lengths
        got = keys_and_labels(read_shard(shards.urls[1], ShardReads(FAST)))
        assert got == keys_and_labels(read_shard(str(digits_shards / "val-000001.tar")))
        with pytest.raises(DataError, match="FileNotFoundError"):
            list(read_shard("memory://bucket18/in1k/val-000099.tar", ShardReads(FAST)))
    finally:
        fs.rm("/bucket18", recursive=True)


def test_object_store_without_its_package_is_one_line_naming_the_extra(monkeypatch):
    import fsspec.core

    def no_s3fs(url, **kw):
        raise ImportError("Install s3fs to access S3")  # what fsspec says without s3fs

    monkeypatch.setattr(fsspec.core, "url_to_fs", no_s3fs)
    with pytest.raises(DataError, match=r"s3:// needs fsspec and s3fs: pip install \.\[s3\]"):
        list(read_shard("s3://bucket/in1k/train-000000.tar", ShardReads(FAST)))


def test_a_manifest_store_that_stays_down_is_an_outage_under_the_runs_policy(server):
    """Found by the start-up test in tests/test_faults.py: manifests were read with the default policy (8 retries,
    minutes of backoff) whatever --read-retries said, and their outage became a plain DataError (exit 1)."""
    server.faults.append(Fault("503", "_info.json", times=100))
    reads = ShardReads(RetryPolicy(retries=1, first_delay=0.001))
    with pytest.raises(DataOutage, match="_info.json unreadable at byte 0 after 2 attempts"):
        resolve_shards(server.url, "train", reads=reads)
    assert reads.retries == 1


def test_a_pipe_command_that_breaks_off_or_stalls_is_run_again_from_the_byte_it_reached(tmp_path, digits_shards,
                                                                                         caplog):
    """A pipe: command that exits non-zero after 5,000 bytes, then one that stalls after 20,000: each is run
    again, what the earlier runs gave is dropped, and the samples are the local shard's."""
    import shlex

    shard, runs = digits_shards / "train-000003.tar", tmp_path / "runs"
    q = {"shard": shlex.quote(str(shard)), "runs": shlex.quote(str(runs))}
    command = ("pipe:echo run >> {runs}; n=$(wc -l < {runs}); "
               "if [ $n = 1 ]; then head -c 5000 {shard}; exit 3; fi; "
               "if [ $n = 2 ]; then head -c 20000 {shard}; exec sleep 30; fi; cat {shard}").format(**q)
    reads = ShardReads(RetryPolicy(retries=4, timeout=1.5, first_delay=0.001))
    with caplog.at_level(logging.WARNING, logger="data"):
        got = keys_and_labels(read_shard(command, reads))
    assert got == keys_and_labels(read_shard(str(shard))) and len(got) == 128
    assert reads.retries == 2 and runs.read_text().count("run") == 3
    warned = [r.getMessage() for r in caplog.records]
    assert "read failed at byte 5000 (OSError: the pipe: command exited with status 3)" in warned[0], warned
    assert "read failed at byte 20000 (TimeoutError: no byte from the pipe: command in 1.5 s)" in warned[1], warned


def test_a_pipe_command_that_keeps_failing_is_an_outage(tmp_path):
    reads = ShardReads(RetryPolicy(retries=2, timeout=1.5, first_delay=0.001))
    with pytest.raises(DataOutage, match=r"unreadable at byte 0 after 3 attempts .*exited with status 7"):
        list(read_shard("pipe:exit 7", reads))
