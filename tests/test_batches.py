"""engine.batches: the training size of each epoch (progressive resizing) and the loaders that follow it."""

from __future__ import annotations

import pytest

from engine.batches import ResolutionSchedule
from engine.config import parse_config


def sizes(*argv, epochs=8):
    cfg = parse_config(["--synthetic", "--image-size", "224", "--epochs", str(epochs), *argv])
    schedule = ResolutionSchedule(cfg.resolution, cfg.data.image_size, cfg.schedule.epochs)
    return [schedule.at(e) for e in range(epochs)], schedule.largest()


def test_the_training_size_is_fixed_by_default():
    assert sizes() == ([224] * 8, 224)


def test_ffcv_ramp_rises_linearly_in_steps_of_32_between_the_ramp_epochs():
    # FFCV's rule: min_res up to start_ramp, max_res from end_ramp, between them the linear value
    # rounded to a multiple of 32 (160 + 32 * 1/3 -> 160, 160 + 32 * 2/3 -> 192)
    assert sizes("--min-res", "160", "--max-res", "192", "--ramp-start-epoch", "2", "--ramp-end-epoch", "5") == (
        [160, 160, 160, 160, 192, 192, 192, 192], 192)
    assert sizes("--min-res", "128", "--ramp-start-epoch", "0", "--ramp-end-epoch", "4", epochs=6) == (
        [128, 160, 192, 192, 224, 224], 224)  # ends at --image-size; 176 / 32 = 5.5 rounds to even, 192


def test_an_explicit_list_gives_each_epoch_its_size_and_the_last_repeats():
    assert sizes("--res-schedule", "128", "192", "160", epochs=5) == ([128, 192, 160, 160, 160], 192)


@pytest.mark.parametrize("argv, message", [
    (["--min-res", "256"], "--min-res 256 is above the final size 224"),
    (["--min-res", "160", "--ramp-start-epoch", "5", "--ramp-end-epoch", "3"], "comes after --ramp-end-epoch 3"),
    (["--max-res", "192"], "need --min-res"),
    (["--res-schedule", "160", "4"], "at least 8 px"),
    (["--res-schedule", "160", "--min-res", "160"], "give one"),
])
def test_a_schedule_that_cannot_be_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(["--synthetic", *argv])
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_compile_gets_room_for_a_graph_per_training_size(monkeypatch):
    """Past dynamo's recompile limit a compiled model silently runs eager: every size needs its graph."""
    import torch._dynamo

    from engine.runtime import allow_a_graph_per_size

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
    many = [str(s) for s in range(64, 64 + 32 * 12, 32)]  # 12 sizes
    cfg = parse_config(["--synthetic", "--epochs", "12", "--res-schedule", *many])
    schedule = ResolutionSchedule(cfg.resolution, cfg.data.image_size, cfg.schedule.epochs)
    allow_a_graph_per_size(len(schedule.sizes()))
    assert torch._dynamo.config.recompile_limit >= 12 + 2
    allow_a_graph_per_size(1)  # never lowered
    assert torch._dynamo.config.recompile_limit >= 12 + 2
