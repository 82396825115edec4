"""engine/continuation.py: a run stopped mid-epoch on 2 processes continues on 1 with a larger --batch-size,
or on 3 with other --workers: the epoch ends after exactly the batches its unused samples give, the LR
follows the schedule in images seen across the change at the new global batch's peak, and the next epoch is
a fresh epoch at the new size. (Which samples each segment uses, and that none is used twice, is proven on
the loaders themselves: tests/test_positions.py.)"""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest

from conftest import accelerate_launch, run
from test_train import TINY

pytestmark = pytest.mark.slow

N, B, EPOCHS, LR, STOP = 484, 32, 2, 0.4, 3  # small_digits_shards' training images; the first run's batch; cosine
USED = STOP * B * 2  # images of epoch 0 the 2-process run used


def records(out, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def expected_lr(step: int, world: int, batch: int) -> float:
    """LR after global `step` of the run continued on `world` processes of `batch`: cosine at the share of the
    training done, counted in images, at the new global batch's peak (--lr is per 256 images)."""
    per_step = world * batch
    fresh, rest = N // per_step, (N - USED) // per_step  # steps of a whole epoch now; steps epoch 0 has left
    if step <= STOP + rest:
        t = fresh * (USED + (step - STOP) * per_step) / (USED + rest * per_step)
    else:
        t = fresh + step - STOP - rest
    return LR * per_step / 256 * 0.5 * (1 + math.cos(math.pi * t / (EPOCHS * fresh)))


def test_a_two_process_run_continues_on_one_and_on_three_processes(tmp_path, small_digits_shards):
    common = ["--data-dir", small_digits_shards, *TINY, "--epochs", EPOCHS, "--log-every", "1", "--seed", "1"]
    first = tmp_path / "two"
    run(accelerate_launch(2, *common, "--batch-size", B, "--workers", "1", "--max-steps", STOP,
                          "--output-dir", first), timeout=420)
    (first / "model.pt").unlink()
    for world, workers, batch in ((1, 1, 48), (3, 2, 32)):
        out = tmp_path / f"on{world}"
        shutil.copytree(first, out)
        text = run(accelerate_launch(world, *common, "--batch-size", batch, "--workers", workers,
                                     "--output-dir", out, "--resume", "auto"), timeout=600).stdout
        per_step = world * batch
        rest, fresh = (N - USED) // per_step, N // per_step
        assert (f"epoch 0 was read by 2 process(es) x 1 reader(s) x batch 32 ({STOP} batches each); it continues "
                f"on {world} process(es) x {workers} reader(s) x batch {batch}: {USED} of its {N} images used, "
                f"{N - USED} left, {rest} batches per process, {N - USED - rest * per_step} left out") in text, text
        # epoch 0 ends after the batches its unused images give; epoch 1 is a whole fresh epoch at the new size
        assert [r["step"] for r in records(out, "epoch")] == [STOP + rest, STOP + rest + fresh]
        assert re.search(rf"final top1=\S+ top5=\S+ images=122 step={STOP + rest + fresh}", text), text
        lrs = [(r["step"], r["lr"]) for r in records(out, "train") if r["step"] > STOP]
        assert len(lrs) == rest + fresh
        for step, lr in lrs:
            assert lr == pytest.approx(expected_lr(step, world, batch), rel=1e-6, abs=1e-9), (world, step)
    assert "holds no RNG state for rank(s) 2 (written by fewer processes)" in text
