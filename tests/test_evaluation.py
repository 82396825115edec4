"""engine.evaluation through `--evaluate`: it reads only the validation split and says clearly when the
weights do not fit."""

from __future__ import annotations

import json
import shutil

import torch

from conftest import run, trainer
from resnet import build_model

SMALL = ["--image-size", "32", "--crop-pct", "1.0", "--workers", "0", "--batch-size", "100", "--no-progress"]


def val_only_copy(shards, dest):
    """The digits shards without their training split: all that --evaluate may need."""
    shutil.copytree(shards, dest)
    info = json.loads((dest / "_info.json").read_text())
    for name in info["splits"].pop("train")["filenames"]:
        (dest / name).unlink()
    (dest / "_info.json").write_text(json.dumps(info))
    return dest


def test_evaluate_reads_only_the_validation_split(tmp_path, digits_shards):
    shards = val_only_copy(digits_shards, tmp_path / "val-only")
    weights = tmp_path / "model.pt"
    torch.save(build_model("resnet20", num_classes=10).state_dict(), weights)
    # no training split, and a --grad-accum no training set here could feed: neither concerns evaluation
    proc = run(trainer("--data-dir", shards, "--arch", "resnet20", *SMALL, "--grad-accum", "1000",
                       "--evaluate", weights), timeout=180)
    assert "images=360" in proc.stdout and "Traceback" not in proc.stderr, proc.stdout + proc.stderr


def test_weights_of_another_network_are_one_line_naming_the_file(tmp_path, digits_shards):
    weights = tmp_path / "model.pt"
    torch.save(build_model("resnet20", num_classes=10).state_dict(), weights)
    proc = run(trainer("--data-dir", digits_shards, "--arch", "resnet32", *SMALL, "--evaluate", weights),
               check=False, timeout=180)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"--evaluate {weights}: its weights do not fit the network" in errors[0]
    assert "check --arch" in errors[0]
