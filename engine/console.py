"""Every line the trainer writes to the console goes out here, and only here.

- ``say``: the main process's lines (progress, results, warnings), on stdout;
- ``every_rank``: one line from each process, for what only that process knows (rarely: at 1,024 ranks it is
  1,024 lines; the run's summaries gather first and say it once);
- ``fatal``: an ``error: ...`` line on stderr and exit status 1; the run's one way to give up;
- the ``data`` package logs (a library should not print): ``bind`` routes its warnings here too, as
  ``warning: ...`` lines on stderr, from whichever process (loader workers included) logged them.

Each line is one write: ``print`` writes the newline separately, so lines of ranks sharing a pipe could
splice ("...e+05rank 0 ..."). Lines go through tqdm, so a progress bar on the terminal is not torn.
"""

from __future__ import annotations

import logging
import sys
from typing import NoReturn

from tqdm.auto import tqdm

_main_process = True  # until bind(): parsing and start-up errors come from every process alike


def bind(is_main_process: bool) -> None:
    """Call once the process knows its rank: ``say`` then prints on the main process only."""
    global _main_process
    _main_process = is_main_process
    data_log = logging.getLogger("data")
    if not any(isinstance(h, _LineHandler) for h in data_log.handlers):
        data_log.addHandler(_LineHandler(logging.WARNING))
        data_log.propagate = False  # not twice, should anything configure the root logger


def say(text: str) -> None:
    if _main_process:
        _write(text, sys.stdout)


def warn(text: str) -> None:
    say(f"warning: {text}")


def every_rank(text: str) -> None:
    _write(text, sys.stdout)


def spans(numbers) -> str:
    """Ranks as a reader takes them in: "0-7, 9, 12-15"."""
    out, run = [], []
    for n in sorted(numbers):
        if run and n == run[-1] + 1:
            run.append(n)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [n]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def fatal(text: str, *, main_only: bool = False) -> NoReturn:
    """Exit with status 1 after one ``error:`` line on stderr; with ``main_only`` the other ranks exit
    silently (every rank reached the same verdict, one line says it)."""
    raise SystemExit(f"error: {text}" if _main_process or not main_only else 1)


def _write(text: str, stream) -> None:
    tqdm.write(text + "\n", file=stream, end="")
    stream.flush()


class _LineHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write(f"{record.levelname.lower()}: {record.getMessage()}", sys.stderr)
        except Exception:  # noqa: BLE001 -- logging's own rule: a failed log line must not end the run
            self.handleError(record)
