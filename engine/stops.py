"""Why a run ends early, and how every rank comes to agree on it at the same step."""

from __future__ import annotations

import enum
import signal

import torch
import torch.nn as nn

from . import console
from .runtime import any_rank

EXIT_REQUEUE = 75  # EX_TEMPFAIL: stopped by a signal after writing a checkpoint; run again with --resume auto


class StopReason(enum.Enum):
    SIGNAL = "signal"  # SIGUSR1/SIGTERM/SIGINT: write a checkpoint, exit EXIT_REQUEUE
    MAX_STEPS = "max-steps"  # --max-steps reached: write a checkpoint, then finish as at the last epoch
    NONFINITE = "nonfinite"  # the loss stayed NaN/inf, or the weights are no longer finite: save nothing, exit 1


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
