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
