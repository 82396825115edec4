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


def test_compile_gets_room_for_a_graph_per_training_size():
    """Past dynamo's recompile limit a compiled model silently runs eager: every size needs its graph."""
    import torch._dynamo

    from engine.runtime import allow_a_graph_per_size

    # dynamo's own patch: monkeypatch's undo deletes the setting from dynamo's config module (later reads fail)
    before = torch._dynamo.config.recompile_limit
    with torch._dynamo.config.patch(recompile_limit=8):
        many = [str(s) for s in range(64, 64 + 32 * 12, 32)]  # 12 sizes
        cfg = parse_config(["--synthetic", "--epochs", "12", "--res-schedule", *many])
        schedule = ResolutionSchedule(cfg.resolution, cfg.data.image_size, cfg.schedule.epochs)
        allow_a_graph_per_size(len(schedule.sizes()))
        assert torch._dynamo.config.recompile_limit >= 12 + 2
        allow_a_graph_per_size(1)  # never lowered
        assert torch._dynamo.config.recompile_limit >= 12 + 2
    assert torch._dynamo.config.recompile_limit == before, "the setting is back, and readable, after the test"


def test_workers_default_to_the_cores_and_more_is_said_once_without_torchs_warning(monkeypatch, capsys):
    import warnings

    from torch.utils.data import DataLoader

    from engine.batches import settle_workers

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)  # torch asks it too
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert settle_workers(parse_config(["--synthetic"])).data.workers == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert settle_workers(parse_config(["--synthetic"])).data.workers == 1  # two processes share the cores
    assert settle_workers(parse_config(["--synthetic", "--workers", "0"])).data.workers == 0
    assert capsys.readouterr().out == ""
    with warnings.catch_warnings(record=True) as caught:  # keeps the filters, records what passes them
        cfg = settle_workers(parse_config(["--synthetic", "--workers", "8"]))
        DataLoader(list(range(4)), num_workers=cfg.data.workers)
        DataLoader(list(range(4)), num_workers=cfg.data.workers)
    assert capsys.readouterr().out == ("warning: --workers 8 is more than the 1 core(s) of this process (2 training "
                                       "process(es) on this node); the loaders may compete with training for them "
                                       "(by default --workers follows the cores)\n")
    assert not [w for w in caught if "suggested max number of worker" in str(w.message)]


def test_compile_says_it_is_compiling_and_when_it_is_done(capsys):
    import logging

    from engine.runtime import CompileNotice, quiet_cuda_probe

    notice = CompileNotice(enabled=True)
    for _ in range(3):
        notice.before_step()
        notice.after_step()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "compiling the model (torch.compile, inductor): the first step waits for it"
    assert len(out) == 2 and out[1].startswith("compiled in ") and out[1].endswith(" s; training")
    CompileNotice(enabled=False).before_step()
    assert capsys.readouterr().out == ""
    quiet_cuda_probe()  # inductor's "No CUDA runtime is found, using CUDA_HOME=..." on a CPU: silenced
    assert not logging.getLogger("torch.utils.cpp_extension").isEnabledFor(logging.WARNING)
