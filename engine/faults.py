"""Fault injection for tests/test_faults.py: read from the environment once, here and nowhere else.

Never set these for a real run. They make a test's timing deterministic: it can kill the run while a
checkpoint is half written, or make one step's loss NaN, instead of racing the trainer for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Faults:
    nan_at_step: int = -1  # RESNET_FAULT_NAN_AT_STEP: this global step's loss becomes NaN
    slow_save: float = 0.0  # RESNET_FAULT_SLOW_SAVE: seconds paused inside each checkpoint write


FAULTS = Faults(nan_at_step=int(os.environ.get("RESNET_FAULT_NAN_AT_STEP", "-1")),
                slow_save=float(os.environ.get("RESNET_FAULT_SLOW_SAVE", "0")))
