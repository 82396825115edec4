"""Processes and devices: ranks from SLURM, the Accelerator, the one collective the engine adds, run info."""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from data.remote import redact

from . import console
from .options import Config, RuntimeConfig


def adopt_slurm_ranks() -> None:
    """Under `srun python train_imagenet.py` (one task per GPU, no launcher) take the ranks from SLURM."""
    env = os.environ
    if "RANK" in env or "SLURM_STEP_ID" not in env or int(env.get("SLURM_NTASKS", "1")) < 2:
        return
    if "MASTER_ADDR" not in env:
        console.fatal("under srun, export MASTER_ADDR first, e.g. "
                      'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)')
    env.update(RANK=env["SLURM_PROCID"], WORLD_SIZE=env["SLURM_NTASKS"], LOCAL_RANK=env["SLURM_LOCALID"])
    # tasks on this node: "4" or, for unequal nodes, this node's entry of e.g. "4(x2),3" (SLURM's own format)
    per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1").split("(")[0].split(",")[0]
    env.setdefault("LOCAL_WORLD_SIZE", per_node)
    env.setdefault("MASTER_PORT", "29500")


def local_world_size() -> int:
    """Training processes on this node (torchrun sets it, adopt_slurm_ranks under srun); 1 if unknown."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def mixed_precision(option: str | None, launcher: str | None) -> tuple[str, str | None]:
    """The precision to train in: --precision when given, else what `accelerate launch --mixed_precision` (or
    its config file) set, else no; and a line to say when --precision overrides a different launcher setting."""
    if option is None:
        return launcher or "no", None
    if launcher and launcher != option:
        return option, f"--precision {option} overrides accelerate launch's --mixed_precision {launcher}"
    return option, None


# After the last collective, gloo's worker thread still holds that operation's tensors, and letting them go takes
# the GIL. A thread that asks for the GIL once the interpreter is finalizing is ended by CPython (pthread_exit)
# inside that C++ destructor: std::terminate, "terminate called without an active exception" and exit -6 right
# after a rank's own error line (pytorch/pytorch#190489; destroy_process_group does not join those threads).
# Handing the GIL over for a moment before the interpreter finalizes lets it finish: in a loop of two-rank gloo
# runs that exit right after an all-reduce, 15 of 120 processes aborted without it and none of 120 with it.
EXIT_GRACE_S = 0.05


def before_exit() -> None:
    """The process's last steps before the interpreter finalizes (the entry point's ``finally``)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun's and adopt_slurm_ranks' ranks
        time.sleep(EXIT_GRACE_S)  # the GIL is free while this sleeps; no event marks the threads done
    # spare the exit its collection of the millions of objects torch, torchvision and timm made: a second or more
    gc.freeze()  # per process; atexit handlers still run, stdout/stderr are still flushed


def make_accelerator(runtime: RuntimeConfig, *, grad_accum: int, seed: int):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, set_seed

    on_cpu = runtime.cpu or not torch.cuda.is_available()
    precision, note = mixed_precision(runtime.precision, os.environ.get("ACCELERATE_MIXED_PRECISION"))
    if on_cpu and precision == "fp16":
        console.fatal("--precision fp16 needs a GPU; use bf16 or no on the CPU")
    accelerator = Accelerator(
        cpu=on_cpu,  # without it a CPU-only process under torchrun would not join the gloo group
        mixed_precision=precision,
        gradient_accumulation_steps=grad_accum,
        dynamo_backend="inductor" if runtime.compile else "no",
        step_scheduler_with_optimizer=False,  # our schedule counts global steps; we step it ourselves
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=runtime.dist_timeout))],
    )
    console.bind(accelerator.is_main_process)
    if note:
        console.warn(note)
    # The same seed on every rank gives identical initial weights (seed_each_rank follows once they are built);
    # the loader seeds itself per batch.
    set_seed(seed, deterministic=runtime.deterministic)
    if not on_cpu:
        torch.backends.cudnn.benchmark = not runtime.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    say_who_runs(accelerator)
    return accelerator


RANKS: list[dict] = []  # every process's rank, local rank, host and device, gathered at start-up: run_info.json


def say_who_runs(accelerator) -> None:
    """One line for the whole run (processes, hosts, devices, backend), where every rank used to print its own:
    a thousand lines at 1,024 ranks. Each rank's line is in run_info.json ("ranks")."""
    from accelerate.utils import gather_object

    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
    me = {"rank": accelerator.process_index, "local_rank": accelerator.local_process_index,
          "host": socket.gethostname(), "device": str(accelerator.device)}
    RANKS[:] = gather_object([me]) if accelerator.num_processes > 1 else [me]
    by_host: dict[str, list[int]] = {}
    for r in RANKS:
        by_host.setdefault(r["host"], []).append(r["rank"])
    hosts = (f"{len(by_host)} hosts, {len(RANKS) // len(by_host)} processes each"
             if len(by_host) > 4 and len({len(v) for v in by_host.values()}) == 1
             else ", ".join(f"{h}: rank {console.spans(v)}" for h, v in by_host.items()))
    devices = sorted({r["device"].split(":")[0] for r in RANKS})
    console.say(f"{len(RANKS)} process(es) ({hosts}), device {'/'.join(devices)}, backend {backend}")


def seed_each_rank(seed: int, rank: int) -> None:
    """A random stream of its own for each rank, once the network is built. Mixup/CutMix and random erasing
    run in the training process (engine/batches.py): with one seed for all, every rank drew the same lambda and
    the same boxes at every step, so a global batch shared one lambda (timm seeds seed + rank too). The
    network is built before this from the common seed, so its initial weights are the same on every rank
    (and DDP broadcasts rank 0's when it wraps the model). Each rank's stream is in its checkpoint's RNG file,
    so a resume continues it exactly; the loader seeds each batch itself and is not affected."""
    from accelerate.utils import set_seed

    set_seed(seed + rank)


def bare(accelerator, model):
    """The network itself, out of its DDP and torch.compile wrappers, with those wrappers left as they are.
    Accelerate's unwrap_model by default (keep_torch_compile=True) re-points the compiled module at the network
    it unwrapped: the training model then loses DDP's no_sync, so accumulate() all-reduced every micro-batch,
    and what it returns is the compiled wrapper, whose keys (`_orig_mod.*`) an EMA and its files then carry."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def allow_a_graph_per_size(sizes: int) -> None:
    """With --compile, each training size gets its own graph: inductor's convolution backward fixes the spatial
    sizes, so dynamic shapes cannot share one (torch 2.14, seen with TORCH_LOGS=+dynamic). Past dynamo's
    recompile limit (8) a model would silently run eager for the rest of the run; room for every size, plus the
    evaluation's shapes (full and last batch, model and EMA)."""
    import torch._dynamo

    quiet_cuda_probe()
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, sizes + 4)


def quiet_cuda_probe() -> None:
    """Inductor probes for CUDA on a CPU-only machine and says so ("No CUDA runtime is found, using
    CUDA_HOME=..."): noise to a CPU run, whose compile CompileNotice's lines announce."""
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


class CompileNotice:
    """--compile: the first step waits for the compiler (a minute on a CPU) with no other sign of life; say that
    it is compiling, and when it is done."""

    def __init__(self, enabled: bool):
        self.state, self.started = ("waiting" if enabled else "done"), 0.0

    def before_step(self) -> None:
        if self.state == "waiting":
            console.say("compiling the model (torch.compile, inductor): the first step waits for it")
            self.state, self.started = "compiling", time.monotonic()

    def after_step(self) -> None:
        if self.state == "compiling":
            console.say(f"compiled in {time.monotonic() - self.started:.0f} s; training")
            self.state = "done"


def from_main(accelerator, read):
    """What ``read()`` returns on the main process, on every rank: reading files once for all. At 1,024 ranks,
    each reading the shard manifest and stat-ing every shard would be a million file-system operations on
    one shared file system at start-up (docs/benchmarks.md, "Start-up"). Its DataError (a missing shard,
    a bad manifest) becomes one error line for all; any other failure keeps its traceback on the main process
    while the others end quietly, rather than wait at the broadcast for --dist-timeout."""
    if accelerator.num_processes == 1:
        return read()
    from accelerate.utils import broadcast_object_list

    from data import DataError
    from data.errors import DataOutage

    box, crash = [None], None
    if accelerator.is_main_process:
        try:
            box = [("ok", read())]
        except DataOutage as e:  # the store is down, not the data bad: every rank exits 75 (engine/stops.py)
            box = [("outage", str(e))]
        except DataError as e:
            box = [("error", str(e))]
        except Exception as e:  # noqa: BLE001 -- re-raised below, once the other ranks know to stop
            box, crash = [("error", "")], e
    broadcast_object_list(box)
    kind, value = box[0]
    if crash is not None:
        raise crash
    if kind == "error":
        console.fatal(value, main_only=True)
    if kind == "outage":
        raise DataOutage(value)
    return value


def any_rank(accelerator, *flags: bool) -> list[bool]:
    """For each flag, whether it is set on any rank: one all-reduce, which every rank must call."""
    t = torch.tensor([float(f) for f in flags], device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return [v > 0 for v in t.tolist()]


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_run_info(cfg: Config, accelerator, out: Path, loader=None) -> None:
    """The resolved configuration (itself a recipe: `--config config.yaml` runs it again) and what
    produced it, next to the run's outputs; ``loader``: the training loader, whose decoder it names."""
    if not accelerator.is_main_process:
        return
    import accelerate
    import timm
    import torchvision
    import webdataset

    from data.transforms import train_decoder

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.flat(), sort_keys=True))
    info = {
        "argv": [redact(a) for a in sys.argv], "git_revision": git_revision(), "world_size": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision, "device": str(accelerator.device),
        "host": socket.gethostname(), "ranks": RANKS, "python": platform.python_version(),
        "versions": {m.__name__: m.__version__ for m in (torch, torchvision, timm, accelerate, webdataset)},
        "decoder": "none (synthetic data)" if cfg.data.synthetic else
                   train_decoder(cfg.data.decode, bool(cfg.augment.auto_augment or cfg.augment.color_jitter),
                                 getattr(loader, "device_decoder", None)),
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
