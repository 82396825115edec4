"""engine/rundir.py: one run per run directory. A live run's lock keeps a second one out, a killed run's lock
is taken over, and a new run is not started over an old one's checkpoints or model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run, trainer
from engine.rundir import LOCK_FILE, another_run, take_lock

HOLD = """
import sys, time
from pathlib import Path
from engine.rundir import take_lock
lock, problem = take_lock(Path(sys.argv[1]))
assert problem is None, problem
print("locked", flush=True)
time.sleep(600)
"""


def hold_lock(out) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_held_lock_names_its_holder_and_a_killed_holders_lock_is_taken_over(tmp_path, capsys):
    holder = hold_lock(tmp_path)
    try:
        lock, problem = take_lock(tmp_path)
        assert lock is None and f"pid {holder.pid} on host" in problem and str(tmp_path / LOCK_FILE) in problem
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    lock, problem = take_lock(tmp_path)
    assert problem is None and lock is not None
    assert f"taking over the lock of a run that did not end cleanly (pid {holder.pid}" in capsys.readouterr().out
    assert f"pid {os.getpid()} " in (tmp_path / LOCK_FILE).read_text()
    lock.release()
    assert (tmp_path / LOCK_FILE).read_text() == "", "a clean end leaves an empty lock"
    again, problem = take_lock(tmp_path)
    assert problem is None and "taking over" not in capsys.readouterr().out
    again.release()


def test_an_output_dir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    lock, problem = take_lock(tmp_path / "f")
    assert lock is None and problem == f"--output-dir {tmp_path / 'f'} exists and is not a directory"
    lock, problem = take_lock(tmp_path / "f" / "run")  # below a file: mkdir's NotADirectoryError, in one line
    assert lock is None and problem == f"cannot use --output-dir {tmp_path / 'f' / 'run'}: Not a directory"


def test_a_new_run_is_refused_over_another_runs_checkpoints_or_model_unless_asked_to_replace_it(tmp_path, capsys):
    assert another_run(tmp_path, overwrite=False) is None
    (tmp_path / "metrics.jsonl").write_text("{}\n")  # logs alone: a run that wrote no checkpoint
    assert another_run(tmp_path, overwrite=False) is None
    (tmp_path / "checkpoints" / "step-00000004").mkdir(parents=True)
    (tmp_path / "model.pt").write_bytes(b"weights")
    (tmp_path / "notes.txt").write_text("mine")
    problem = another_run(tmp_path, overwrite=False)
    assert problem == (f"{tmp_path} holds another run (checkpoints and a finished model.pt); continue it with "
                       "--resume auto, give this run another --output-dir, or pass --overwrite to replace it")
    assert another_run(tmp_path, overwrite=True) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"], "only the run's own files are removed"
    assert "--overwrite: removed the earlier run" in capsys.readouterr().out


SYNTHETIC = ["--synthetic", "--arch", "resnet20", "--image-size", "32", "--batch-size", "4", "--num-classes", "10",
             "--no-progress", "--log-every", "1"]


@pytest.mark.slow
def test_the_trainer_refuses_a_second_run_into_a_live_or_finished_run_with_one_line(tmp_path):
    out = tmp_path / "run"
    live = subprocess.Popen(trainer(*SYNTHETIC, "--synthetic-steps", "100000", "--epochs", "1", "--output-dir", out),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            # held after step 1 (the fault hook), so it keeps the lock without taking a core
                            # from the runs started beside it
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                                 "RESNET_FAULT_PAUSE_AT_STEP": "1"})
    try:
        deadline = time.monotonic() + 180
        for line in live.stdout:  # under way: it holds the lock
            if line.startswith("step 1 "):
                break
            assert time.monotonic() < deadline
        second = run(trainer(*SYNTHETIC, "--synthetic-steps", "2", "--epochs", "1", "--output-dir", out,
                             "--resume", "auto"), check=False, timeout=120)
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr
        assert second.stderr.strip() == (f"error: another run is writing into {out} (pid {live.pid} on host "
                                         f"{os.uname().nodename}, started {lock_start(out)}, per {out / LOCK_FILE}); "
                                         "wait for it to end, or give this run another --output-dir")
    finally:
        live.kill()
        live.wait(timeout=60)
    # the killed run's lock is taken over; the run finishes; a new run over it is refused, model untouched
    done = run(trainer(*SYNTHETIC, "--synthetic-steps", "2", "--epochs", "1", "--output-dir", out, "--resume",
                       "auto"), timeout=180)
    assert "taking over the lock of a run that did not end cleanly" in done.stdout
    model = (out / "model.pt").read_bytes()
    again = run(trainer(*SYNTHETIC, "--synthetic-steps", "2", "--epochs", "1", "--output-dir", out), check=False,
                timeout=120)
    assert again.returncode == 1 and again.stderr.strip().startswith(f"error: {out} holds another run")
    assert len(again.stderr.strip().splitlines()) == 1 and (out / "model.pt").read_bytes() == model


def lock_start(out) -> str:
    return (out / LOCK_FILE).read_text().split("started ", 1)[1].strip()
