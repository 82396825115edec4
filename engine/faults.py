"""Fault injection for tests/test_faults.py: read from the environment once, here and nowhere else.

Never set these for a real run. They make a test's timing deterministic: it can kill the run while a
checkpoint is half written, or make one step's loss NaN, or hold every rank at a chosen step until the test
has done what it came to do, instead of racing the trainer for it (a busy machine loses such races).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

PAUSE_LIMIT = 600  # seconds a pause lasts at most, should its test never come back


@dataclass(frozen=True)
class Faults:
    nan_at_step: int = -1  # RESNET_FAULT_NAN_AT_STEP: this global step's loss becomes NaN
    slow_save: float = 0.0  # RESNET_FAULT_SLOW_SAVE: seconds paused inside each checkpoint write
    pause_at_step: int = -1  # RESNET_FAULT_PAUSE_AT_STEP: each rank waits once this global step is logged...
    release_file: str = ""  # RESNET_FAULT_RELEASE_FILE: ...until this file exists, or a stop signal reached it

    def pause(self, stop_requested) -> None:
        """Hold this rank after the step, until a stop is requested here or the release file appears: a test
        kills or signals a run at a known step, never one that has raced past it."""
        deadline = time.monotonic() + PAUSE_LIMIT
        while not (stop_requested() or (self.release_file and os.path.exists(self.release_file))):
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)


FAULTS = Faults(nan_at_step=int(os.environ.get("RESNET_FAULT_NAN_AT_STEP", "-1")),
                slow_save=float(os.environ.get("RESNET_FAULT_SLOW_SAVE", "0")),
                pause_at_step=int(os.environ.get("RESNET_FAULT_PAUSE_AT_STEP", "-1")),
                release_file=os.environ.get("RESNET_FAULT_RELEASE_FILE", ""))
