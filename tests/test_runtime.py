"""engine.runtime: the collective the stop check and the checkpoints agree with, and the run info."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import ROOT, command_defaults, free_port
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
    assert info["decoder"] == "none (synthetic data)"


@pytest.mark.parametrize("decode, augment, expected", [
    ("cpu", [], "in the loader workers: "), ("cpu", ["--color-jitter", "0.4"], "in the loader workers: PIL"),
    ("device", [], "on the device: ")])
def test_run_info_says_which_decoder_the_training_images_go_through(tmp_path, decode, augment, expected):
    from data import region_decode

    cfg = parse_config(["--data-dir", str(tmp_path), "--decode", decode, *augment])
    write_run_info(cfg, one_process(), tmp_path)
    decoder = json.loads((tmp_path / "run_info.json").read_text())["decoder"]
    assert decoder.startswith(expected)
    assert ("region decode" in decoder) == (region_decode.available() and not augment)
    if decode == "device":  # the name of the decoder the loader's device decoder chose
        write_run_info(cfg, one_process(), tmp_path, SimpleNamespace(device_decoder="nvimgcodec"))
        assert json.loads((tmp_path / "run_info.json").read_text())["decoder"].startswith("on the device: nvimgcodec")


def test_each_rank_draws_its_own_mixup_and_erasing_and_the_same_rank_the_same():
    """With one seed for all, two ranks given different images drew the same Mixup lambda and the same erasing
    boxes at every step (seen on 2 gloo processes); seed + rank, as timm does."""
    from timm.data import Mixup
    from timm.data.random_erasing import RandomErasing

    from engine.runtime import seed_each_rank

    def draws(rank: int):
        seed_each_rank(7, rank)
        mix = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, num_classes=10)
        erase = RandomErasing(1.0, mode="pixel", device="cpu")  # as engine/batches.py makes it
        lams = [mix._params_per_batch()[0] for _ in range(4)]
        return lams, erase(torch.zeros(2, 3, 32, 32))

    (lam0, erased0), (lam1, erased1), (again, erased_again) = draws(0), draws(1), draws(0)
    assert lam0 != lam1 and not torch.equal(erased0, erased1)
    assert lam0 == again and torch.equal(erased0, erased_again)


def test_precision_follows_accelerate_launch_unless_given_and_says_when_it_overrides_it():
    """`accelerate launch --mixed_precision bf16` was silently overridden by --precision's default (no)."""
    from engine.runtime import mixed_precision

    assert mixed_precision(None, "bf16") == ("bf16", None)
    assert mixed_precision(None, None) == ("no", None)
    assert mixed_precision("bf16", "bf16") == ("bf16", None)
    assert mixed_precision("no", "bf16") == ("no", "--precision no overrides accelerate launch's --mixed_precision bf16")
    assert parse_config(["--synthetic"]).runtime.precision is None


def test_the_bare_network_comes_out_of_ddp_and_compile_leaving_the_wrappers_as_they_are():
    """Accelerate's unwrap_model (keep_torch_compile=True) re-pointed the compiled module at the bare network, so
    the training model lost DDP's no_sync (accumulate() then all-reduced every micro-batch, seen on 2 ranks) and
    the EMA built from it carried `_orig_mod.` keys that neither torchvision nor a run without --compile loads."""
    import socket

    import torch.distributed as dist
    import torchvision
    from accelerate.utils import extract_model_from_parallel
    from timm.utils import ModelEmaV3

    from engine.runtime import bare
    from resnet import build_model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        net = build_model("resnet18", num_classes=10)
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        compiled = torch.compile(ddp)  # as Accelerate prepares --compile: DDP, then compile; nothing compiles yet
        accelerator = SimpleNamespace(unwrap_model=lambda m, **kw: extract_model_from_parallel(m, **kw))
        assert bare(accelerator, compiled) is net
        assert compiled._orig_mod is ddp and hasattr(compiled, "no_sync"), "the training model keeps DDP"
        ema = ModelEmaV3(bare(accelerator, compiled), decay=0.9)
        torchvision.models.resnet18(num_classes=10).load_state_dict(ema.module.state_dict())
        extract_model_from_parallel(compiled)  # Accelerate's default, for the record: it re-points the wrapper
        assert compiled._orig_mod is net and not hasattr(compiled, "no_sync")
    finally:
        dist.destroy_process_group()


def test_credentials_in_a_data_url_reach_neither_config_yaml_nor_run_info(tmp_path, monkeypatch):
    argv = ["train_imagenet.py", "--data-dir", "https://alice:s3cret@store.example/in1k?token=t0ken"]
    monkeypatch.setattr("sys.argv", argv)
    cfg = parse_config(argv[1:])
    assert cfg.data.data_dir == argv[2], "the run itself reads with them"
    write_run_info(cfg, one_process(), tmp_path)  # cfg.flat() also makes each checkpoint's config and the hparams
    written = (tmp_path / "config.yaml").read_text() + (tmp_path / "run_info.json").read_text()
    assert "s3cret" not in written and "t0ken" not in written
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data_dir"] == "https://***@store.example/in1k?***"


EXITS_AFTER_AN_ALL_REDUCE = """
import ctypes, sys, torch, torch.distributed as dist
from engine.runtime import before_exit
dist.init_process_group("gloo")
x = torch.ones(1)
base = sys.getrefcount(x)  # gloo's worker thread holds one more while the operation's tensors are in its hands
sys.setswitchinterval(1000.0)  # this thread keeps the GIL until it blocks or sleeps: the worker cannot let go
dist.all_reduce(x, async_op=True)  # the handle dropped at once: the worker has the operation's last reference
value = ctypes.c_float.from_address(x.data_ptr())
while value.value != 2:  # reading it through torch would hand the GIL over
    pass
try:
    raise SystemExit(1)  # what console.fatal does, right after the ranks agreed to stop
finally:
    before_exit()
    held = sys.getrefcount(x) - base
    print(f"held by gloo at exit: {held}", flush=True)
"""


def test_a_rank_exiting_right_after_a_collective_lets_gloo_finish_with_its_tensors_first():
    """Found under issue 21: a rank that printed its error line then aborted ("terminate called without an active
    exception", exit -6), 1 run in 20 of the disk-full test. Gloo's worker thread still held the last all-reduce's
    tensors and asked for the GIL to let them go while the interpreter finalized (engine/runtime.py, before_exit).
    Here the rank holds the GIL from the moment the all-reduce completes, so without the hand-over the worker
    has certainly not let go when the process reaches its exit."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", EXITS_AFTER_AN_ALL_REDUCE], cwd=ROOT, env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              preexec_fn=command_defaults) for r in (0, 1)]
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [1, 1], outs
    assert all("held by gloo at exit: 0" in out for out in outs), outs
