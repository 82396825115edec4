"""Fixtures shared by the test modules: real small data made by our own writer, and a way to run commands."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """scikit-learn's 1,797 digits as 32x32 JPEG shards (1,437 train / 360 val), written by our writer."""
    from data.digits import make_demo_data

    out = tmp_path_factory.mktemp("digits")
    make_demo_data(out)
    return out / "shards"


@pytest.fixture(scope="session")
def small_digits_shards(digits_shards, tmp_path_factory) -> Path:
    """Every third image of each class of ``digits_shards`` (484 train / 122 val) in shards of 40: the same
    data and shard layout a third the size, for end-to-end runs whose assertions hold at any size (exact
    resume, counts), so each of their epochs costs a third."""
    import shutil

    from data.shards import WriterConfig, write_dataset

    out = tmp_path_factory.mktemp("small_digits")
    for split in ("train", "val"):
        for folder in sorted((digits_shards.parent / "raw" / split).iterdir()):
            (out / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[::3]:
                shutil.copy(image, out / split / folder.name / image.name)
    write_dataset(out / "shards", out / "train", out / "val", cfg=WriterConfig(shard_size=40, workers=1))
    return out / "shards"


def image_shards(root: Path, counts: dict[str, int], image, *, classes: int, shard_size: int) -> Path:
    """Our writer's shards in ``root/out`` of ``counts[split]`` JPEGs per split (``image(split, i)``, quality
    90, image i in class folder c{i % classes}), written by the writer in this process."""
    from data.shards import WriterConfig, write_dataset

    for split, n in counts.items():
        for i in range(n):
            path = root / split / f"c{i % classes}" / f"{i:03d}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            image(split, i).save(path, quality=90)
    write_dataset(root / "out", *(root / s if s in counts else None for s in ("train", "val")),
                  cfg=WriterConfig(shard_size=shard_size, workers=1))
    return root / "out"


def run(cmd: list[str], *, timeout: float = 300, env: dict | None = None, check: bool = True):
    """Run a command from the repository root; on failure the assertion shows its output.

    On a timeout every process it started (the launcher, the ranks in their own sessions, their loader workers)
    prints its Python stacks (faulthandler, on SIGABRT) and is killed, and the test fails with those stacks and
    the output so far: a hang says where it hung and leaves no orphans behind. (A hung validation under load,
    tests/under_load.py, once left both ranks and their workers running after the launcher was killed, and
    subprocess.run's timeout had dropped the output.)"""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1",
                **(env or {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=command_defaults)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = _stop_tree(proc)
        pytest.fail(f"{' '.join(map(str, cmd))} did not finish in {timeout:.0f} s; its output, then each process's "
                    f"Python stacks when it was stopped:\n{stdout[-6000:]}\n{stderr[-20000:]}", pytrace=False)
    result = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if check:
        assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{stdout}\n{stderr}"
    return result


def command_defaults() -> None:
    """preexec_fn of the commands tests start: no core files (run's timeout SIGABRTs a hung command, which must
    not leave them in the repository), and Ctrl-C at its default, as from a terminal, whatever pytest inherited:
    started in the background by a script (`pytest &`, nohup), it ignores SIGINT, as would all it starts, and a
    test's Ctrl-C would do nothing (make-shards' Ctrl-C test hung in a run of tests/under_load.py started so)."""
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _stop_tree(proc: subprocess.Popen, grace: float = 15) -> tuple[str, str]:
    """SIGABRT to everything below ``proc`` and to it, one at a time, deepest first, so that each one's stacks
    (faulthandler) come out whole on the shared stderr; SIGKILL to what is left; returns the output."""
    import signal

    tree = [*reversed(psutil.Process(proc.pid).children(recursive=True)), psutil.Process(proc.pid)]  # any session
    for p in tree:
        try:
            p.send_signal(signal.SIGABRT)
            deadline = time.monotonic() + 3
            while p.is_running() and p.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
                time.sleep(0.02)
        except psutil.NoSuchProcess:
            pass
    try:
        output = proc.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        _kill(tree)
        output = proc.communicate()
    _kill(tree)  # whatever outlived its dump
    return output


def _kill(tree: list[psutil.Process]) -> None:
    for p in tree:
        try:
            p.kill()  # psutil checks that the pid is still this process, not a reused one
        except psutil.NoSuchProcess:
            pass


def trainer(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "train_imagenet.py"), *map(str, args)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(num_processes: int, *args: str) -> list[str]:
    """CPU processes through accelerate's multi-process launcher (its --cpu flag would need mpirun)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    if num_processes > 1:
        launcher += ["--multi_gpu", "--num_processes", str(num_processes)]
    else:
        launcher += ["--cpu", "--num_processes", "1"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", str(free_port())]
    return [*launcher, str(ROOT / "train_imagenet.py"), *map(str, args)]
