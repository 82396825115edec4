"""How the loaders' workers start (data/workers.py): forked when this process is the only rank, from a
single-threaded forkserver beside other ranks, with the same batches either way, and a server that lives through
the stop signals SLURM sends every process of a job step.

The hang this guards against (CPython gh-112275: a fork while a gloo thread takes a Python thread state) cannot be
made to happen on purpose; what is tested is that its precondition is gone: beside other ranks, the process
the workers are forked from runs one thread."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image

import data.workers
from conftest import image_shards
from data import TrainAugment, build_train_loader, build_val_loader
from data.workers import SERVER_KEEPS


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return image_shards(tmp_path_factory.mktemp("workers"), {"train": 48, "val": 20},
                        lambda split, i: Image.new("RGB", (24, 20), (i * 5, 255 - i * 5, 128)), classes=3, shard_size=6)


@pytest.fixture
def several_ranks(monkeypatch):
    """As if a process group of several ranks were up (its threads are what makes a fork unsafe)."""
    monkeypatch.setattr(data.workers, "_several_ranks", lambda: True)


def _train(shards):
    return build_train_loader(shards, batch_size=4, num_workers=2, image_size=16, seed=5,
                              augment=TrainAugment(scale=(0.3, 1.0), hflip=0.5))


def _epoch(loader, epoch=None):
    if epoch is not None:
        loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b))


def _server() -> psutil.Process:
    servers = [p for p in psutil.Process().children() if "forkserver" in " ".join(p.cmdline())]
    assert len(servers) == 1, [p.cmdline() for p in psutil.Process().children()]
    return servers[0]


def _signals(pid: int, field: str) -> set[int]:
    """A signal set of /proc/PID/status: SigBlk blocked, ShdPnd waiting for the process."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith(field + ":"))
    mask = int(line.split()[1], 16)
    return {s for s in range(1, 65) if mask >> (s - 1) & 1}


def test_alone_the_workers_are_forked_from_this_process(shards):
    loader = _train(shards)
    assert loader._loader.multiprocessing_context.get_start_method() == "fork"
    assert len(_epoch(loader, 0)) == len(loader)
    assert len([p for p in psutil.Process().children() if p.name() == "pt_data_worker"]) == 2  # ours, persistent


def test_beside_other_ranks_the_workers_come_from_a_one_thread_server_with_the_same_batches(shards, several_ranks):
    with pytest.MonkeyPatch.context() as alone:
        alone.setattr(data.workers, "_several_ranks", lambda: False)
        forked = _train(shards)
        expected = [_epoch(forked, 0), _epoch(forked, 1)]
        del forked
    loader = _train(shards)
    assert loader._loader.multiprocessing_context.get_start_method() == "forkserver"
    assert _same(_epoch(loader, 0), expected[0])
    server = _server()
    assert server.num_threads() == 1  # nothing that could hold an interpreter lock when it forks
    assert len(server.children()) == 2  # the two persistent workers
    assert SERVER_KEEPS <= _signals(server.pid, "SigBlk")
    # SLURM signals every process of the step (from another process: kill(1) here); the server and the workers
    # live on, and the next epoch is whole
    pids = [str(p.pid) for p in [server, *server.children()]]
    for name in ("TERM", "USR1"):
        subprocess.run(["kill", "-s", name, *pids], check=True)
    for _ in range(1000):  # until they reached the server: waiting there, blocked, or it is gone
        if server.status() == psutil.STATUS_ZOMBIE or SERVER_KEEPS <= _signals(server.pid, "ShdPnd"):
            break
        time.sleep(0.01)
    assert server.status() != psutil.STATUS_ZOMBIE  # (a dead one stays a zombie: we are its parent)
    assert _same(_epoch(loader, 1), expected[1])
    assert server.status() != psutil.STATUS_ZOMBIE and len(server.children()) == 2


def test_validation_beside_other_ranks_gives_every_image_once_as_when_forked(shards, several_ranks):
    served = build_val_loader(shards, batch_size=4, num_workers=2, image_size=16)
    assert served._loader.multiprocessing_context.get_start_method() == "forkserver"
    images = torch.cat([x for x, _ in served])
    with pytest.MonkeyPatch.context() as alone:
        alone.setattr(data.workers, "_several_ranks", lambda: False)
        forked = build_val_loader(shards, batch_size=4, num_workers=2, image_size=16)
        assert torch.equal(images, torch.cat([x for x, _ in forked]))
    assert len(images) == 20


def test_a_worker_ends_on_a_sigterm_from_the_loaders_process_only(shards, several_ranks):
    loader = _train(shards)
    _epoch(loader, 0)
    workers = _server().children()
    os.kill(workers[0].pid, signal.SIGTERM)  # from this process, as the DataLoader stops a worker
    workers[0].wait(timeout=30)
    assert workers[1].is_running()
