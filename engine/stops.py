"""Why a run ends early, and how every rank comes to agree on it at the same step."""

from __future__ import annotations

import datetime
import enum
import signal
from pathlib import Path

import torch
import torch.nn as nn

from data.errors import DataOutage

from . import console
from .runtime import any_rank

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped by a signal or a data outage after a checkpoint; run again with --resume auto
# Written into the run directory on a data outage: torchrun reports its ranks' 75 as 1, so this is how the SLURM
# scripts (launch/slurm/) tell an outage, worth a requeue after a delay, from a crash
OUTAGE_FILE = "data_outage.txt"


class StopReason(enum.Enum):
    SIGNAL = "signal"  # SIGUSR1/SIGTERM/SIGINT: write a checkpoint, exit EXIT_REQUEUE
    MAX_STEPS = "max-steps"  # --max-steps reached: write a checkpoint, then finish as at the last epoch
    NONFINITE = "nonfinite"  # the loss stayed NaN/inf, or the weights are no longer finite: save nothing, exit 1
    DATA_OUTAGE = "data-outage"  # a remote shard stayed unreadable past its retries: checkpoint, exit EXIT_REQUEUE


class StopRequest:
    """SIGUSR1, SIGTERM or Ctrl-C (SIGINT) set a flag; ranks agree on it at a step boundary, so all stop at the
    same step and write one checkpoint. A second Ctrl-C ends the process at once (what follows the last
    checkpoint is lost), for a user who will not wait for the step.

    Installed first thing: a SIGTERM during start-up would otherwise kill the process and a SIGUSR1 be
    lost. Loader workers ignore all three (data/pipeline.py): this process decides.
    """

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True  # only a flag: the step in flight finishes undisturbed
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the second Ctrl-C: the default, immediate end
            console.say("Ctrl-C: stopping at the next step boundary with a checkpoint (press Ctrl-C again to "
                        "quit at once, losing what follows the last checkpoint)")

    @staticmethod
    def ignore_from_now_on() -> None:
        """After the signal's checkpoint, a further stop request has nothing left to do. torchrun SIGTERMs the
        ranks still shutting down once one has exited 75, and Python restores the default (fatal) SIGTERM
        action during interpreter shutdown: ignoring it keeps every rank's exit code 75 instead of "killed"."""
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)


class NonFiniteGuard:
    """Counts consecutive batches whose loss is NaN or inf, on the device, so watching costs no sync per step.

    The count is read only where the trainer syncs anyway: the stop check every STOP_CHECK_EVERY steps,
    and before each checkpoint, which also refuses weights that are no longer finite (SGD never trains
    them back), so a NaN never replaces a good checkpoint. In fp16 the loss scaler skips an overflowing
    step by itself; only a loss that stays non-finite for --max-nonfinite-steps batches stops the run.
    """

    def __init__(self, device, limit: int):
        self.streak = torch.zeros((), dtype=torch.int64, device=device)
        self.limit = limit

    def add(self, loss: torch.Tensor) -> None:
        self.streak = torch.where(torch.isfinite(loss.detach()), 0, self.streak + 1)

    def over_limit(self) -> bool:
        return bool(self.streak >= self.limit)  # a sync: call only at the points above

    @staticmethod
    def weights_finite(model: nn.Module) -> bool:
        return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())

    def message(self, step: int, model: nn.Module, newest) -> str:
        """The error line: what went non-finite, that nothing was saved from it, what to try."""
        state = "finite" if self.weights_finite(model) else "no longer finite"
        return (f"stopped at step {step}: the loss was NaN or inf for the last {int(self.streak)} batches (limit "
                f"--max-nonfinite-steps {self.limit}) and the weights are {state}; nothing was saved from them, "
                f"the newest checkpoint is {newest or 'none'}. Lower --lr, add --warmup-epochs or --clip-grad, "
                "or check the data, then run again with --resume auto")


def agree_to_stop(accelerator, guard: NonFiniteGuard, request: StopRequest) -> StopReason | None:
    """One tiny all-reduce: a stop signal on any rank, or a run of non-finite losses on any rank."""
    nonfinite, signalled = any_rank(accelerator, guard.over_limit(), request.requested)
    return StopReason.NONFINITE if nonfinite else StopReason.SIGNAL if signalled else None


def unsafe_to_save(accelerator, guard: NonFiniteGuard, model: nn.Module) -> bool:
    """Whether any rank's loss stayed non-finite or its weights are no longer finite: then nothing is saved."""
    too_many, bad_weights = any_rank(accelerator, guard.over_limit(), not guard.weights_finite(model))
    return too_many or bad_weights


class DataWatch:
    """Each step's batch, or None on every rank when any rank's remote shard read gave up (DataOutage, after its
    retries: data/remote.py), so that all stop at the same step and the last complete one is checkpointed.

    A rank without its batch cannot simply stop: the others would wait in the step's gradient all-reduce for
    --dist-timeout. So with remote data every step first agrees on whether all ranks have their batch: one
    all-reduce of one integer, on the CPU over gloo (a group of its own beside NCCL), so the device is never
    synchronised for it. Local data cannot have an outage (a bad local shard is a DataError), and goes
    unwatched."""

    def __init__(self, accelerator, *, remote: bool, timeout_s: int):
        self.world, self.message, self.group = accelerator.num_processes, "", None
        self.watched = remote and self.world > 1
        if self.watched:
            import torch.distributed as dist

            self.group = dist.group.WORLD if dist.get_backend() == "gloo" else \
                dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))

    def next_batch(self, it):
        """``next(it)``, or None when a rank's data is out (``message`` then names the shard and the cause)."""
        try:
            batch, failure = next(it), ""
        except DataOutage as e:
            if not self.watched and self.world > 1:
                raise
            batch, failure = None, str(e)
        if self.watched:
            failure = self._agree(failure)
        self.message = failure
        return None if failure else batch

    def _agree(self, failure: str) -> str:
        """The outage of the first rank that had one, on every rank; "" when none had."""
        import torch.distributed as dist

        flag = torch.tensor([1 if failure else 0], dtype=torch.int32)
        dist.all_reduce(flag, group=self.group)
        if not flag.item():
            return ""
        said = [None] * self.world  # rare, once per outage: the words themselves
        dist.all_gather_object(said, failure, group=self.group)
        return next(m for m in said if m)


def exit_for_outage(out: Path, message: str, is_main_process: bool) -> int:
    """A data outage's end: OUTAGE_FILE in the run directory (for the SLURM scripts), one line, the requeue code."""
    if is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / OUTAGE_FILE).write_text(message + "\n")
    console.say(f"{message}; exit {EXIT_REQUEUE}: run again with --resume auto once the store answers")
    StopRequest.ignore_from_now_on()
    return EXIT_REQUEUE
