"""tests/under_load.py: the script that runs a selection N times under load and names what failed."""

from __future__ import annotations

import psutil

import under_load

FLAKY = '''
from pathlib import Path

def test_steady():
    assert True

def test_fails_the_first_time_only():
    seen = Path(__file__).with_suffix(".seen")
    first = not seen.exists()
    seen.touch()
    assert not first, "first run"
'''


def test_a_flaky_test_is_named_with_the_runs_it_failed_and_the_busy_loops_are_stopped(tmp_path, capsys):
    (tmp_path / "test_flaky.py").write_text(FLAKY)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    code = under_load.main(["--runs", "2", "--busy", "1", "--out", str(tmp_path / "out"), "--",
                            str(tmp_path / "test_flaky.py")])
    text = capsys.readouterr().out
    assert code == 1
    assert "2 run(s): 1 passed, 1 failed; the last 1 in a row passed" in text, text
    assert "test_flaky::test_fails_the_first_time_only: failed in run(s) 1\n    AssertionError: first run" in text, text
    assert "test_steady" not in text.split("passed in")[-1]
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before, "a busy loop was left running"


HANGS = '''
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print("child", child.pid, flush=True)
time.sleep(600)
'''


def test_a_command_that_hangs_fails_with_its_stacks_and_leaves_no_process_behind():
    """conftest.run on a timeout: the output so far and each process's Python stacks in the failure, and the
    whole tree gone, a child in its own session included (as accelerate's launcher starts the ranks)."""
    import re
    import sys

    import pytest

    from conftest import run

    with pytest.raises(pytest.fail.Exception) as failed:
        run([sys.executable, "-c", HANGS], timeout=3)
    text = str(failed.value)
    assert "did not finish in 3 s" in text and "Fatal Python error: Aborted" in text
    assert re.search(r'File "<string>", line 1 in <module>\n(.|\n)*File "<string>", line 5 in <module>', text), \
        text  # the child's stack, then the parent's: each whole
    child = int(re.search(r"child (\d+)", text).group(1))
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


CTRL_C = '''
import os, signal
try:
    os.kill(os.getpid(), signal.SIGINT)
    signal.sigtimedwait([], 0)  # (a call into C: Python runs the handler on its way back)
    print("not interrupted")
except KeyboardInterrupt:
    print("interrupted")
'''


def test_the_commands_tests_start_take_ctrl_c_even_where_pytest_was_started_ignoring_it():
    """A script that starts pytest in the background (`pytest &`, nohup) starts it with SIGINT ignored, and
    every process started from it inherits that: Python then installs no KeyboardInterrupt, and a test's
    Ctrl-C did nothing (make-shards' Ctrl-C test hung in a run of tests/under_load.py started so). The
    commands the tests start take Ctrl-C as from a terminal."""
    import signal
    import subprocess
    import sys

    from conftest import command_defaults, run

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        through_run = run([sys.executable, "-c", CTRL_C], timeout=60).stdout
        started = subprocess.run([sys.executable, "-c", CTRL_C], preexec_fn=command_defaults, capture_output=True,
                                 text=True, timeout=60).stdout
    finally:
        signal.signal(signal.SIGINT, before)
    assert through_run == started == "interrupted\n"


SLEEPS = '''
import time
from pathlib import Path

import pytest


@pytest.fixture
def launched():
    yield
    Path(__file__).with_suffix(".torn_down").touch()  # where a test's fixture stops the commands it started


def test_sleeps(launched):
    Path(__file__).with_suffix(".started").touch()
    time.sleep(600)
'''


def test_a_killed_series_interrupts_its_pytest_stops_the_busy_loops_and_says_so(tmp_path):
    """kill(1) to the script mid-run: pytest gets a Ctrl-C, so its fixtures tear down what the test started
    (before, pytest ran on alone and so did the busy loops), and the script ends with the runs so far."""
    import signal
    import subprocess
    import sys
    import time

    test = tmp_path / "test_sleeps.py"
    test.write_text(SLEEPS)
    script = subprocess.Popen([sys.executable, under_load.__file__, "--runs", "3", "--busy", "1", "--out",
                               str(tmp_path / "out"), "--", str(test)], stdout=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))  # as under nohup
    try:
        deadline = time.monotonic() + 120
        while not test.with_suffix(".started").exists():
            assert script.poll() is None and time.monotonic() < deadline, "pytest never started the test"
            time.sleep(0.05)
        started = psutil.Process(script.pid).children(recursive=True)
        script.terminate()
        out, _ = script.communicate(timeout=120)
    finally:
        script.kill()
    assert script.returncode == 130, out
    assert "interrupted in run 1: it is not counted" in out and "0 run(s)" in out, out
    assert test.with_suffix(".torn_down").exists(), "pytest did not tear the test down"
    assert len(started) >= 2  # pytest and the busy loop
    assert not [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "left running"
