"""engine.runtime: the collective the stop check and the checkpoints agree with, and the run info."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch
import yaml

from engine import checkpoints, stops
from engine.config import parse_config
from engine.runtime import any_rank, write_run_info


def one_process():
    return SimpleNamespace(device=torch.device("cpu"), num_processes=1, is_main_process=True, mixed_precision="no")


def test_any_rank_is_the_one_collective_for_both_the_stop_check_and_the_checkpoints():
    assert any_rank(one_process(), True, False, True) == [True, False, True]
    assert stops.any_rank is any_rank and checkpoints.any_rank is any_rank  # not a second copy in either


def test_run_info_holds_the_resolved_recipe_and_the_versions(tmp_path):
    cfg = parse_config(["--synthetic", "--arch", "resnet18", "--epochs", "3"])
    write_run_info(cfg, one_process(), tmp_path)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == cfg.flat()
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["world_size"] == 1 and {"torch", "timm", "accelerate", "webdataset"} <= set(info["versions"])
