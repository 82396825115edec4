"""engine.console: the one way out for the trainer's lines, data/'s log records included."""

from __future__ import annotations

import logging

import pytest

from engine import console


@pytest.fixture
def bound():
    yield console.bind
    console.bind(True)
    data_log = logging.getLogger("data")
    data_log.handlers = [h for h in data_log.handlers if not isinstance(h, console._LineHandler)]
    data_log.propagate = True


def test_other_ranks_say_nothing_but_their_own_lines_and_exit_quietly(bound, capsys):
    bound(False)
    console.say("only the main process")
    console.every_rank("rank 1 weights checksum 1.0")
    with pytest.raises(SystemExit) as e:
        console.fatal("the disk is full", main_only=True)
    assert e.value.code == 1
    assert capsys.readouterr().out == "rank 1 weights checksum 1.0\n"
    with pytest.raises(SystemExit, match="^error: this rank's own problem$"):
        console.fatal("this rank's own problem")


def test_the_main_process_says_its_lines_and_fails_with_one_error_line(bound, capsys):
    bound(True)
    console.say("epoch 1 step 22: val top1 90.00")
    console.warn("over 10% of step time waiting for data")
    assert capsys.readouterr().out == ("epoch 1 step 22: val top1 90.00\n"
                                       "warning: over 10% of step time waiting for data\n")
    with pytest.raises(SystemExit, match="^error: cannot write checkpoint$"):
        console.fatal("cannot write checkpoint", main_only=True)


def test_data_warnings_come_out_as_warning_lines_on_stderr_once(bound, capsys):
    bound(True)
    bound(True)  # binding twice must not print each record twice
    logging.getLogger("data.pipeline").warning("skipping corrupt sample %s in shard %s", "00000007", "train-0.tar")
    logging.getLogger("data.pipeline").info("not shown: the trainer shows warnings")
    captured = capsys.readouterr()
    assert captured.err == "warning: skipping corrupt sample 00000007 in shard train-0.tar\n" and not captured.out
