"""The output folder of make-shards (data/shard_folder.py): writing one split keeps the others, an output
inside an input is refused, and an interrupted run leaves only complete splits."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, command_defaults, run
from data.make_shards import main as make_shards
from test_shards import CLASSES, _jpeg, _tree, read_split


def _cli(*args) -> list[str]:
    return [*map(str, args), "--workers", "1"]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name.startswith("val-")}


def test_overwrite_of_one_split_keeps_the_other(tmp_path, capsys):
    _tree(tmp_path / "train", 2)
    _tree(tmp_path / "val", 1)
    (tmp_path / "val" / CLASSES[0] / "bad.JPEG").write_text("not an image")
    out = tmp_path / "out"
    assert make_shards(_cli("--train-dir", tmp_path / "train", "--val-dir", tmp_path / "val", "--out", out)) == 0
    val_before = _files(out)
    _jpeg(tmp_path / "train" / CLASSES[0] / "extra.JPEG", (1, 2, 3))
    assert make_shards(_cli("--train-dir", tmp_path / "train", "--out", out, "--overwrite", "--shard-size", "2")) == 0
    assert _files(out) == val_before  # was: the validation shards deleted, val gone from _info.json
    info = json.loads((out / "_info.json").read_text())
    assert (info["splits"]["train"]["shard_lengths"], info["splits"]["val"]["num_samples"]) == ([2, 2, 2, 1], 3)
    assert len(read_split(out, "val")) == 3 and len(read_split(out, "train")) == 7
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [e["split"] for e in skipped] == ["val"]  # val's report is kept too
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_a_missing_split_is_added_without_overwrite_and_must_share_the_classes(tmp_path, capsys):
    _tree(tmp_path / "train", 2)
    _tree(tmp_path / "val", 1)
    out = tmp_path / "out"
    assert make_shards(_cli("--train-dir", tmp_path / "train", "--out", out)) == 0
    assert make_shards(_cli("--val-dir", tmp_path / "val", "--out", out)) == 0
    assert sorted(json.loads((out / "_info.json").read_text())["splits"]) == ["train", "val"]
    _tree(tmp_path / "other", 1)
    _jpeg(tmp_path / "other" / "n09999999" / "x.JPEG", (0, 0, 0))
    capsys.readouterr()
    assert make_shards(_cli("--train-dir", tmp_path / "other", "--out", out, "--overwrite")) == 2
    assert capsys.readouterr().err == (f"error: the classes of {tmp_path / 'other'} (4) differ from those of the "
                                       "shards the output keeps (3, its classes.txt): write every split again\n")
    assert len(read_split(out, "train")) == 6


@pytest.mark.parametrize("inside", ["train", "train/n01000001", "val/sub"])
def test_output_inside_an_input_is_refused(tmp_path, capsys, inside):
    _tree(tmp_path / "train", 1)
    _tree(tmp_path / "val", 1)
    out = tmp_path / inside / "shards"
    code = make_shards(_cli("--train-dir", tmp_path / "train", "--val-dir", tmp_path / "val", "--out", out))
    flag, folder = ("--val-dir", tmp_path / "val") if inside.startswith("val") else ("--train-dir", tmp_path / "train")
    assert (code, capsys.readouterr().err) == (2, f"error: --out {out} is inside {flag} {folder}: its shards would "
                                                  "be read as input on the next run; choose a folder outside it\n")
    assert not out.exists()


def test_output_folder_that_cannot_be_created_is_one_line(tmp_path, capsys, monkeypatch):
    _tree(tmp_path / "train", 1)

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)  # the tests run as root, which no mode bit stops
    out = tmp_path / "locked" / "out"
    assert make_shards(_cli("--train-dir", tmp_path / "train", "--out", out)) == 2
    assert capsys.readouterr().err == f"error: cannot create output folder {out}: Permission denied\n"


# The kernel gives a process's SIGINT to any thread that does not block it, and Python runs the handler only in
# the main thread: here SIGINT lands on one of the pool's threads for certain (the main thread blocks it; the
# pool's threads were started before), as it did by chance in 1 of 6 Ctrl-Cs of the test below beside two busy
# loops, which then hung in the main thread's untimed wait for the pool.
_CTRL_C_ON_A_POOL_THREAD = """
import multiprocessing, os, signal, threading, time
from data.shards import _ignore_interrupts, _pool_result
with multiprocessing.Pool(1, _ignore_interrupts) as pool:
    task = pool.apply_async(time.sleep, (120,))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()  # it inherits the mask: not it either
    try:
        _pool_result(task)
    except KeyboardInterrupt:
        print("interrupted")
"""


def test_ctrl_c_that_lands_on_a_pool_thread_still_interrupts_the_wait():
    result = run([sys.executable, "-c", _CTRL_C_ON_A_POOL_THREAD], timeout=60, env={"PYTHONPATH": str(ROOT)})
    assert result.stdout == "interrupted\n"


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_and_keeps_only_complete_splits(tmp_path):
    _tree(tmp_path / "train", 2)
    _tree(tmp_path / "val", 1)
    fifo = tmp_path / "val" / CLASSES[0] / "waits.JPEG"
    os.mkfifo(fifo)  # opening it blocks until a writer comes: the val split is in progress until then
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data.make_shards", "--train-dir", tmp_path / "train", "--val-dir",
           tmp_path / "val", "--out", out, "--workers", "2"]
    proc = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, preexec_fn=command_defaults)
    try:
        # train is complete once the manifest lists it; val then blocks in a worker on the FIFO
        for _ in range(2400):  # at most 2 minutes, on a loaded machine
            if (out / "_info.json").is_file() and (out / ".val.partial").is_dir():
                break
            with pytest.raises(subprocess.TimeoutExpired):  # still running: it must not end by itself
                proc.wait(timeout=0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert stderr == (f"interrupted: train complete in {out}, val not written (no partial shard left); to finish, "
                      "run again with --val-dir only\n")
    assert sorted(json.loads((out / "_info.json").read_text())["splits"]) == ["train"]
    assert not list(out.glob("val-*")) and not (out / ".val.partial").exists()
    fifo.unlink()
    assert make_shards(_cli("--val-dir", tmp_path / "val", "--out", out)) == 0  # no --overwrite needed
    assert len(read_split(out, "val")) == 3 and len(read_split(out, "train")) == 6
