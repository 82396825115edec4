"""A run directory belongs to one run: a lock keeps a second live run out of it, and a new run is not started
over another run's checkpoints or model (which it would overwrite, append to, or leave for the next
``--resume auto`` to pick up).

The lock is ``OUT/run.lock``, a POSIX record lock held by the main process for the whole run (NFS locks it
across hosts). The kernel releases it when that process ends, however it ends, and forked loader workers
do not inherit it (as they would an flock), so a lock left by a killed run is taken over, never waited on. The
file names its holder (pid, host, start) for the message a second run gets; a clean end empties it, so a
non-empty file found unlocked is a killed run's, and is said to be.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import shutil
import socket
from pathlib import Path

from . import console
from .options import RunConfig
from .runtime import any_rank

LOCK_FILE = "run.lock"
RUN_FILES = ("checkpoints", "tensorboard", "metrics.jsonl", "model.pt", "model_ema.pt", "model.json",
             "config.yaml", "run_info.json", "replicas.json", "data_outage.txt")  # what a run writes; --overwrite removes exactly these


class RunLock:
    """The main process's hold on a run directory (see the module docstring)."""

    def __init__(self, fd: int | None, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        """Empty the holder line and let go: the next run finds a clean lock."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


def take_lock(out: Path) -> tuple[RunLock | None, str | None]:
    """The lock on ``out``, or the one line saying who holds it (or why ``out`` cannot be a run directory)."""
    if out.exists() and not out.is_dir():
        return None, f"--output-dir {out} exists and is not a directory"
    path = out / LOCK_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        return None, f"cannot use --output-dir {out}: {e.strerror or e}"
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):  # a file system without locks (ENOLCK, ...): go on
            return _unlocked(fd, path, e)
        holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
        os.close(fd)
        return None, (f"another run is writing into {out} ({holder}, per {path}); wait for it to end, or give "
                      "this run another --output-dir")
    stale = os.read(fd, 4096).decode(errors="replace").strip()
    if stale:
        console.say(f"{path}: taking over the lock of a run that did not end cleanly ({stale})")
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}, started {started}\n".encode(), 0)
    return RunLock(fd, path), None


def _unlocked(fd: int, path: Path, e: OSError) -> tuple[RunLock, None]:
    console.warn(f"cannot lock {path} ({errno.errorcode.get(e.errno, e.errno)}): make sure no other run writes "
                 "into this directory")
    os.close(fd)
    return RunLock(None, path), None


def another_run(out: Path, overwrite: bool) -> str | None:
    """Why a new run (no --resume) must not start in ``out``, or None; with ``overwrite``, the old run's files
    are removed instead."""
    ckpts = out / "checkpoints"
    found = [what for what, there in (("checkpoints", ckpts.is_dir() and any(ckpts.iterdir())),
                                      ("a finished model.pt", (out / "model.pt").exists())) if there]
    if not found:
        return None
    if overwrite:
        for name in RUN_FILES:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        console.say(f"--overwrite: removed the earlier run in {out}")
        return None
    return (f"{out} holds another run ({' and '.join(found)}); continue it with --resume auto, give this run "
            "another --output-dir, or pass --overwrite to replace it")


def claim_run_dir(run: RunConfig, accelerator) -> RunLock | None:
    """Lock the output directory and make sure this run may write there; every rank agrees, so all stop
    together with the main process's one line."""
    out, lock, problem = Path(run.output_dir), None, None
    if accelerator.is_main_process:
        lock, problem = take_lock(out)
        if problem is None and not run.resume:
            problem = another_run(out, run.overwrite)
    if any_rank(accelerator, problem is not None)[0]:
        if lock is not None:
            lock.release()
        console.fatal(problem or "", main_only=True)
    return lock
