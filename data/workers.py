"""How the loaders' DataLoader workers start, and which signals they leave to the process that made them.

Start method. A worker is forked from the loader's process, unless that process runs threads of a C++ library
that enter Python: the threads of a ``torch.distributed`` process group (gloo's, NCCL's) take a Python thread
state now and then, and on CPython before 3.11.10 a fork at that moment leaves the child stuck before any of
its code runs, in ``PyOS_AfterFork_Child`` on a lock the other thread held (CPython gh-112275). One such worker
hangs its rank, and the job with it: seen once in the under-load runs of tests/under_load.py, a 2-rank run's
validation worker. So with more than one rank the workers start from a forkserver, a single-threaded process
started once per loader process (Python 3.14's default on Linux). It is the same on every Python, so the path
CI tests is the one users run. Its server has the loader modules imported already (preloaded), so a worker
starts in a fork and an unpickling of its dataset, not an import of torch.
"""

from __future__ import annotations

import functools
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import threading

# What the forkserver imports once, so each worker need not: the entry point (multiprocessing loads it in
# every worker anyway) and the modules whose objects the workers unpickle.
PRELOAD = ["__main__", "data.pipeline", "data.validation"]
# SLURM signals every process of a job step (preemption: SIGTERM; --signal: SIGUSR1), and the forkserver must
# live through them: a worker whose parent is gone ends (torch's watchdog), which would end the run with
# "DataLoader worker exited unexpectedly" before the trainer could write its checkpoint.
SERVER_KEEPS = {signal.SIGTERM, signal.SIGUSR1}


def worker_slot() -> tuple[int, int]:
    """(this DataLoader worker's number, how many there are); (0, 1) outside a worker."""
    from torch.utils.data import get_worker_info  # here: data/remote.py needs this module, not torch

    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def start_options(num_workers: int) -> dict:
    """DataLoader arguments for how its ``num_workers`` workers start (see the module docstring): the start
    method and a ``worker_init_fn`` that leaves stop signals to this process; none without workers."""
    if num_workers == 0:
        return {}
    chosen = context()
    if chosen.get_start_method() == "forkserver":
        _start_server()
    return {"multiprocessing_context": chosen,
            "worker_init_fn": functools.partial(ignore_stop_signals, parent=os.getpid())}


def context():
    """The multiprocessing context this process's loader workers start in. What the loaders share with their
    workers and lock (counters) is made from it too: multiprocessing refuses to send a lock made for forked
    children to a forkserver's."""
    chosen = multiprocessing.get_context("forkserver") if _several_ranks() else multiprocessing.get_context()
    if chosen.get_start_method() == "forkserver":  # here, or Python 3.14's default
        chosen.set_forkserver_preload(PRELOAD)
    return chosen


def _several_ranks() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _start_server() -> None:
    """Start the forkserver (once; again if it died) with SERVER_KEEPS blocked: a mask lasts through fork and
    exec, and the server never unblocks them. Blocked here for a moment only, a signal to this process waits
    and is not lost. The server's start starts multiprocessing's resource tracker first, which unblocks
    SIGTERM as it returns (the server then took SIGTERM: seen in tests/test_workers.py), so the tracker starts
    first, on its own."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, SERVER_KEEPS)
    try:
        multiprocessing.resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, SERVER_KEEPS)
        multiprocessing.forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def ignore_stop_signals(_worker_id: int, parent: int | None = None) -> None:
    """DataLoader workers leave SIGTERM, SIGINT and SIGUSR1 to the process that made the loader, ``parent``
    (default: the worker's parent, as after a fork). SLURM signals every process of a job step (preemption,
    scancel), a terminal's Ctrl-C the whole process group; torch's own SIGTERM handler would end a worker at
    once and the run with "DataLoader worker killed", before the trainer could write its checkpoint.

    A SIGTERM from that process itself still ends the worker, as torch's handler does: that is how the
    DataLoader, and multiprocessing at exit, stop workers that do not end by themselves. Python's handlers
    cannot see who sent a signal, so SIGTERM is blocked here and a thread takes it with sigwaitinfo, which
    can."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started from now on inherit it
    parent = os.getppid() if parent is None else parent
    threading.Thread(target=_end_on_sigterm_from, args=(parent,), name="sigterm", daemon=True).start()


def _end_on_sigterm_from(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)  # torch's handler exits 0 too, so the loader does not report a worker "killed"
