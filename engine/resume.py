"""Which checkpoint a run continues from, and whether it can.

Two kinds of failure, told apart because they call for opposite actions:

- **damaged** (checksums fail, a file does not unpickle or is refused as code): the checkpoint is named,
  renamed ``step-N.unloadable`` so it is never tried again, and the one before it is tried;
- **does not fit** (written for another network, class count or optimizer): the checkpoint is intact and
  this run's flags are wrong. The run stops before it touches anything, with one line naming the
  checkpoint, what it was written with (its ``config.yaml``) and what was asked; nothing is renamed, so the
  same command with the right flags continues it.

Everything else may differ from the checkpoint's configuration (LR, epochs, batch size, augmentation, world
size); it is listed in one warning, so a changed recipe is never silent. ``--ema-decay`` newly set starts
the EMA from the checkpoint's weights.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import yaml

from . import console
from .checkpoints import (CONFIG_FILE, RNG_FILE, Progress, attempt, checkpoint_dirs, one_line, read_progress,
                          verify_checksums)
from .runtime import any_rank, bare

# A checkpoint written with other values of these cannot be continued: other tensors, or another optimizer
STRUCTURE = ("arch", "num_classes", "cifar_stem", "blurpool", "opt")
# Not part of what a run computes
NOT_COMPARED = {"resume", "overwrite", "output_dir", "evaluate", "progress", "log_every", "max_steps",
                "checkpoint_every", "keep_checkpoints", "dist_timeout"}
# load_state's words for tensors of another shape or name, or optimizer groups of another size
MISFIT_WORDS = ("Error(s) in loading state_dict", "size mismatch", "doesn't match the size of optimizer",
                "different number of parameter groups")


class Fit:
    """This run's configuration, against which a checkpoint's is checked."""

    def __init__(self, config: dict, card: dict, out: Path):
        self.config = {**config, "num_classes": card["num_classes"]}  # the classes the network really has
        self.out = out

    def saved(self, ckpt: Path) -> dict | None:
        """The checkpoint's configuration; for checkpoints written before they held one, the run directory's
        (whose num_classes is only the --synthetic option, so it is left out)."""
        for path in (ckpt / CONFIG_FILE, self.out / CONFIG_FILE):
            if path.is_file():
                try:
                    saved = yaml.safe_load(path.read_text())
                except yaml.YAMLError:
                    return None
                if isinstance(saved, dict) and path.parent != ckpt:
                    saved.pop("num_classes", None)
                return saved if isinstance(saved, dict) else None
        return None

    def problem(self, ckpt: Path) -> str | None:
        """The one line saying why ``ckpt`` cannot be continued by this run, or None."""
        saved = self.saved(ckpt) or {}
        clash = [k for k in STRUCTURE if k in saved and saved[k] != self.config[k]]
        if not clash:
            return None
        was = ", ".join(flag(k, saved[k]) for k in clash)
        asked = ", ".join(flag(k, self.config[k]) for k in clash)
        return (f"checkpoint {ckpt} was written with {was} (its {CONFIG_FILE}); this run asks for {asked}, which "
                f"cannot continue it. Run again with {was} to continue it, or give a new --output-dir to start "
                "another run; nothing was changed")

    def differences(self, ckpt: Path) -> str | None:
        saved = self.saved(ckpt)
        if saved is None:
            return None
        changed = [f"{flag(k, saved[k])} -> {self.config[k]}" for k in sorted(self.config)
                   if k in saved and k not in NOT_COMPARED and saved[k] != self.config[k]]
        return ", ".join(changed) or None


def flag(key: str, value) -> str:
    if key == "num_classes":
        return f"{value} classes"
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{key.replace('_', '-')}"
    return f"--{key.replace('_', '-')} {value}"


def resume_from(accelerator, where: str, out: Path, learner, fit: Fit) -> Progress:
    """Load the newest loadable checkpoint; a damaged one is named, moved aside and the previous one tried; one
    that does not fit stops the run (see the module docstring)."""
    root = out / "checkpoints"
    if accelerator.is_main_process:
        remove_partial_checkpoints(root)
    candidates = [Path(where)] if where != "auto" else list(reversed(checkpoint_dirs(root)))
    if where != "auto" and not Path(where, "progress.json").exists():
        console.fatal(f"--resume {where}: not a checkpoint directory (no progress.json)")
    for ckpt in candidates:
        progress, error, misfit = try_load(accelerator, ckpt, learner, fit)
        # Every rank must settle on the same checkpoint, so the verdict is agreed collectively.
        failed, misfits = any_rank(accelerator, error is not None, misfit)
        if misfits:
            console.fatal(error if misfit else f"checkpoint {ckpt} does not fit this run on another rank",
                          main_only=True)
        if not failed:
            console.say(f"resumed from {ckpt} at step {progress.global_step} "
                        f"(epoch {progress.epoch}, batch {progress.batch_in_epoch})")
            say_missing_rng_states(accelerator, ckpt)
            changed = fit.differences(ckpt)
            if changed:
                console.warn(f"this run's settings differ from those {ckpt.name} was written with: {changed}; "
                             "the run goes on with this run's")
            return progress
        console.warn(f"checkpoint {ckpt} cannot be loaded ({error or 'on another rank'})")
        if where == "auto" and accelerator.is_main_process:
            set_aside(ckpt)
    if candidates:
        # Starting over would leave the model half-loaded and let pruning delete new checkpoints
        # in favour of the unloadable ones.
        what = f"no checkpoint in {root}" if where == "auto" else f"--resume {where}"
        console.fatal(f"{what} can be loaded (see the warnings above); move the checkpoints away to start "
                      "from scratch", main_only=True)
    return Progress()


def remove_partial_checkpoints(root: Path) -> None:
    """A run killed while writing a checkpoint leaves `.tmp-step-N`, which is never loaded: remove it."""
    for tmp in sorted(root.glob(".tmp-step-*")):
        shutil.rmtree(tmp, ignore_errors=True)
        console.say(f"removed {tmp}: a checkpoint whose writing was interrupted")


def set_aside(ckpt: Path) -> None:
    """Rename an unloadable checkpoint out of the `step-N` namespace, so that it is not tried again and
    does not count among the newest when pruning; it stays on disk for inspection."""
    dest = ckpt.with_name(ckpt.name + ".unloadable")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(ckpt, dest)
    console.say(f"moved {ckpt} aside to {dest}; trying the previous checkpoint")


def try_load(accelerator, ckpt: Path, learner, fit: Fit) -> tuple[Progress | None, str | None, bool]:
    """(progress, None, False) when loaded; else (None, the error in one line, whether it is a misfit)."""
    damaged = verified(accelerator, ckpt)
    if damaged:
        return None, damaged, False
    try:
        progress = read_progress(ckpt)
        check_rng_state(accelerator, ckpt)
    except Exception as e:  # noqa: BLE001 -- any failure here means a damaged checkpoint; it is reported
        return None, one_line(e), False
    problem = fit.problem(ckpt)
    if problem:
        return None, problem, True
    try:
        accelerator.load_state(str(ckpt))  # every file with weights_only=True (we register no custom objects)
        load_ema(accelerator, ckpt, learner)
    except Exception as e:  # noqa: BLE001 -- reported; a misfit stops the run, anything else sets it aside
        misfit = any(w in str(e) for w in MISFIT_WORDS)
        line = one_line(e)
        return None, (f"checkpoint {ckpt} does not fit this run's network or optimizer ({line[:300]}); nothing "
                      "was changed" if misfit else line), misfit
    return progress, None, False


def verified(accelerator, ckpt: Path) -> str | None:
    """Why ``ckpt`` fails its checksums, or None, agreed by every rank. The main process alone hashes every file
    (every rank's RNG file included): hashing is the dear part of a resume (a ResNet-50 checkpoint is some
    300 MB), and every rank hashing every rank's files would read the checkpoint N times over and N^2 RNG
    files at N ranks."""
    error = attempt(verify_checksums, ckpt) if accelerator.is_main_process else None
    if any_rank(accelerator, error is not None)[0]:
        return error or "its files do not match their checksums (found by the main process)"
    return None


def check_rng_state(accelerator, ckpt: Path) -> None:
    """Accelerate ignores an RNG state it cannot load, which would resume inexactly (or quietly accept a file
    crafted to run code): load it first, as accelerate does, and fail here instead."""
    from accelerate.utils import load  # torch.load with weights_only=True and numpy's arrays allowed

    rng_file = ckpt / RNG_FILE.format(accelerator.process_index)
    if rng_file.exists():  # else, the checksums having passed, never written: a run on more processes (said once)
        rng = load(rng_file)
        if not isinstance(rng, dict) or "torch_manual_seed" not in rng:
            raise ValueError("random states file holds no torch_manual_seed")


def say_missing_rng_states(accelerator, ckpt: Path) -> None:
    """One line for the ranks a checkpoint written by fewer processes holds no RNG state for."""
    missing = [r for r in range(accelerator.num_processes) if not (ckpt / RNG_FILE.format(r)).exists()]
    if missing and accelerator.is_main_process:
        console.warn(f"{ckpt} holds no RNG state for rank(s) {console.spans(missing)} (written by fewer "
                     "processes): they start from fresh ones, so the run continues but not bit-exactly")


def load_ema(accelerator, ckpt: Path, learner) -> None:
    """The checkpoint's EMA weights; with --ema-decay newly set, the EMA starts from the model's weights."""
    if learner.ema is None:
        return
    if not (ckpt / "ema.pt").exists():
        learner.ema.set(bare(accelerator, learner.model))
        console.say(f"{ckpt.name} holds no EMA (written without --ema-decay): the EMA starts from its weights")
        return
    learner.ema.module.load_state_dict(torch.load(ckpt / "ema.pt", map_location=accelerator.device,
                                                  weights_only=True))
