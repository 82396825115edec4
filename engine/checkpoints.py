"""Checkpoints that survive crashes: written beside and renamed, checksummed, agreed across ranks.

Layout: `OUT/checkpoints/step-NNNNNNNN/` holds Accelerate's `save_state` files (model, optimizer, scheduler,
scaler, one RNG file per rank), `ema.pt`, `progress.json` and `checksums.json`, written last. A directory is
`.tmp-step-N` until complete; one that fails to load is renamed `step-N.unloadable`. Every load uses
weights_only=True: a checkpoint can hold tensors and plain data, never code.

One job with its own failure modes (full disks, kills mid-write, damaged or crafted files), each proven
by tests/test_faults.py. The step-directory name is made in one place, `step_name`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from data.positions import pack, unpack

from . import console
from .faults import FAULTS
from .runtime import any_rank


@dataclass
class Progress:
    """What a checkpoint must hold beyond Accelerate's states to continue a run exactly, in progress.json, and
    where the epoch stands in samples (data/positions.py), in positions.npy when a change of layout split it."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches per rank of `epoch` (of its current segment) already consumed
    best_top1: float = -1.0
    best_checkpoint: str = ""
    last_eval_step: int = -1
    last_eval: dict = field(default_factory=dict)
    skipped_steps: int = 0  # fp16 steps skipped by the loss scaler
    history: list = field(default_factory=list)
    layout: dict = field(default_factory=dict)  # data.positions.Layout the batches were counted in ({}: unknown)
    epoch_samples: int = 0  # samples in the epoch's sequence (the training split)
    segment: int = 0  # changes of layout within `epoch` so far (data.positions.Segment.index)
    images_before_segment: int = 0  # images of `epoch` used before its current segment
    done: np.ndarray | None = field(default=None, repr=False)  # per sample: used before the current segment

    def saved(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "done"}

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.batch_in_epoch, self.segment, self.images_before_segment, self.done = epoch, 0, 0, 0, None


RNG_FILE = "random_states_{}.pkl"  # Accelerate's name for rank i's RNG states
CHECKSUM_FILE = "checksums.json"  # sha256 of every other file of a checkpoint
CONFIG_FILE = "config.yaml"  # the configuration that wrote it (the run's options, and the network card)
POSITIONS_FILE = "positions.npy"  # Progress.done, one bit per sample
STEP_DIGITS = 8  # step-00001234: names sort in step order


def step_name(step: int) -> str:
    """The directory name of the checkpoint written at a global step."""
    return f"step-{step:0{STEP_DIGITS}d}"


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Incomplete ones are `.tmp-*` and never match."""
    pattern = rf"step-\d{{{STEP_DIGITS}}}"
    return sorted((p for p in root.glob("step-*") if re.fullmatch(pattern, p.name)), key=lambda p: p.name)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointError(Exception):
    """A checkpoint could not be written; its partial directory is already gone."""


def save_checkpoint(accelerator, root: Path, progress: Progress, ema, keep: int, config: dict) -> Path:
    """Write into `.tmp-step-N`, then rename: a crash mid-save leaves the previous checkpoint untouched.

    A write that fails on any rank (a full disk, a lost mount) is agreed by all ranks: the partial directory
    is removed and every rank raises CheckpointError, so none is left waiting for one that gave up.
    """
    final = root / step_name(progress.global_step)
    tmp = root / f".tmp-{final.name}"
    error = attempt(make_empty_dir, tmp) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    for phase in (write_checkpoint, seal_checkpoint):  # the second starts when every rank's files are in
        if error is None:
            error = attempt(phase, accelerator, tmp, progress, ema, config)
        if any_rank(accelerator, error is not None)[0]:
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(error or "the write failed on another rank")
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_path(root)  # the rename itself
        prune_checkpoints(root, keep, progress.best_checkpoint)
    accelerator.wait_for_everyone()
    return final


def failure_message(root: Path, step: int, error: str, need: int) -> str:
    """One line: which checkpoint, why (the disk is full, most often), what is left, what to do."""
    free = shutil.disk_usage(root).free
    why = f"no space left on the device ({error})" if free < need else error
    newest = checkpoint_dirs(root)
    return (f"cannot write checkpoint {root / step_name(step)}: {why}; it needs about {need / 2**20:.1f} MiB "
            f"and {free / 2**20:.1f} MiB are free there. Nothing of it is left behind; "
            f"{newest[-1] if newest else 'no earlier checkpoint'} is intact. Free some space and run again "
            "with --resume auto")


def state_bytes(*states) -> int:
    """About what a checkpoint of these state_dicts takes: the bytes of their tensors."""
    def size(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(map(size, x.values()))
        return sum(map(size, x)) if isinstance(x, (list, tuple)) else 0

    return size(states)


def make_empty_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def write_checkpoint(accelerator, tmp: Path, progress: Progress, ema, config: dict) -> None:
    """This rank's files of a checkpoint, flushed to disk before anyone renames the directory."""
    accelerator.save_state(str(tmp))  # model, optimizer, scheduler, scaler (main); RNG state (every rank)
    if accelerator.is_main_process:
        if ema is not None:
            torch.save(ema.module.state_dict(), tmp / "ema.pt")
        time.sleep(FAULTS.slow_save)  # tests kill the run here, with the checkpoint half written
        (tmp / "progress.json").write_text(json.dumps(progress.saved(), indent=1))
        if progress.done is not None:
            np.save(tmp / POSITIONS_FILE, pack(progress.done), allow_pickle=False)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=True))
    mine = sorted(tmp.iterdir()) if accelerator.is_main_process else [tmp / RNG_FILE.format(accelerator.process_index)]
    for f in mine:
        fsync_path(f)


def seal_checkpoint(accelerator, tmp: Path, *_) -> None:
    """Checksums of every file: neither torch nor safetensors notices bytes changed inside tensor data."""
    if accelerator.is_main_process:
        sums = {f.name: file_sha256(f) for f in sorted(tmp.iterdir())}
        (tmp / CHECKSUM_FILE).write_text(json.dumps(sums, indent=1))
        fsync_path(tmp / CHECKSUM_FILE)
        fsync_path(tmp)  # its entries, now that every rank has written its files


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def verify_checksums(ckpt: Path) -> None:
    """Raise unless every file listed in the checkpoint's checksums is present and unchanged."""
    if not (ckpt / CHECKSUM_FILE).exists():
        return  # written before checksums were
    for name, digest in json.loads((ckpt / CHECKSUM_FILE).read_text()).items():
        if not (ckpt / name).is_file() or file_sha256(ckpt / name) != digest:
            raise ValueError(f"{name} is missing or not the file that was written (checksum mismatch)")


def attempt(fn, *args) -> str | None:
    """Run fn; None on success, else the error in one line (to be agreed across ranks, then reported)."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 -- every failure is reported; the caller decides what it means
        return one_line(e)
    return None


def one_line(e: BaseException) -> str:
    """An exception in one line; for a refused pickle, the line naming what it tried to load (the first
    line of torch's message suggests weights_only=False, which would run the file's code)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [""]
    refused = [ln for ln in lines if "GLOBAL " in ln or "WeightsUnpickler error" in ln]
    return f"{type(e).__name__}: {(refused or lines)[0]}"


def prune_checkpoints(root: Path, keep: int, best: str) -> None:
    done = checkpoint_dirs(root)
    for old in done[: max(0, len(done) - keep)]:
        if old.name != best:
            shutil.rmtree(old, ignore_errors=True)


def read_progress(ckpt: Path) -> Progress:
    path = ckpt / "progress.json"
    progress = Progress(**json.loads(path.read_text()))
    if not all(isinstance(v, int) and v >= 0 for v in (progress.global_step, progress.epoch,
                                                        progress.batch_in_epoch, progress.segment)):
        raise ValueError(f"{path}: step, epoch, batch and segment must be counts")
    if progress.segment:
        progress.done = unpack(np.load(ckpt / POSITIONS_FILE, allow_pickle=False), progress.epoch_samples)
    return progress
