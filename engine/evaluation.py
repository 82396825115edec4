"""Exact evaluation (every validation image once over all ranks), the BatchNorm sync that makes the ranks
score one model, the replica check, the torchvision-loadable export, and `--evaluate`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn

from data.errors import DataOutage

from . import console
from .checkpoints import one_line
from .runtime import bare


def predict(net: nn.Module, images: torch.Tensor, flip: bool) -> torch.Tensor:
    """Logits; with ``flip`` the mean of the logits of the images and of their mirror images."""
    logits = net(images)
    return (logits + net(images.flip(3))) / 2 if flip else logits


@torch.no_grad()
def evaluate(model, loader, prep, accelerator, *, flip: bool = False) -> dict:
    """Top-1/top-5 over the whole split, each image counted once across all ranks (flipped or not).

    Ranks may hold different numbers of batches, so nothing is exchanged per batch: the counts are summed
    locally and reduced once at the end (a per-batch collective would hang on uneven ranks). A rank whose
    remote shards stay unreadable (DataOutage) says so in that reduction, and every rank raises DataOutage.
    """
    net = bare(accelerator, model)  # no DDP: its forward could sync buffers
    sync_buffers(accelerator, net)
    was_training = net.training
    net.eval()
    counts = torch.zeros(5, dtype=torch.float64, device=accelerator.device)  # top1, top5, images, unreadable, outages
    bad_before = getattr(loader, "bad_samples", 0)  # the loader's count runs over its whole life
    outage = ""
    try:
        for images, labels in loader:
            images, labels, _ = prep(images, labels, train=False)
            with accelerator.autocast():
                logits = predict(net, images, flip)
            top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
            hit = top5.eq(labels[:, None])
            counts[0] += hit[:, 0].sum()
            counts[1] += hit.any(dim=1).sum()
            counts[2] += labels.numel()
    except DataOutage as e:
        counts[4], outage = 1, str(e)
    counts[3] = getattr(loader, "bad_samples", 0) - bad_before
    counts = accelerator.reduce(counts, reduction="sum").cpu()
    net.train(was_training)
    if counts[4]:
        raise DataOutage(outage or f"data outage: the validation shards of {int(counts[4])} other process(es) "
                                   "stayed unreadable (their warnings name the shard)")
    n = int(counts[2])
    return {"top1": 100 * counts[0].item() / max(n, 1), "top5": 100 * counts[1].item() / max(n, 1), "images": n,
            "unreadable": int(counts[3])}


def check_count(result: dict, loader) -> None:
    """Say when the evaluation did not score every image the manifest lists, and why: unreadable images
    (each named in a warning as it was skipped), or a manifest that does not match its shards."""
    expected, seen = getattr(loader, "num_samples", 0), result["images"] + result.get("unreadable", 0)
    if not expected or result["images"] == expected:
        return
    if seen == expected:
        console.warn(f"evaluated {result['images']} of the {expected} validation images the manifest lists: "
                     f"{result['unreadable']} could not be decoded (named in the warnings above)")
    else:
        console.warn(f"the validation shards gave {seen} images ({result['images']} evaluated, "
                     f"{result.get('unreadable', 0)} unreadable) but their manifest lists {expected}: it does not "
                     "match the shards; write them again with make-shards")


def sync_buffers(accelerator, module: nn.Module) -> None:
    """Give every rank rank 0's BatchNorm statistics.

    DDP broadcasts buffers before each forward, but the last training forward then updates each rank's
    running statistics with its own batch, so the replicas' BN buffers differ slightly. Evaluating or
    exporting without this would mix models: each rank would score its share of the validation set
    with different statistics from the model that is saved.
    """
    if accelerator.num_processes > 1:
        for buf in module.buffers():
            torch.distributed.broadcast(buf.data, src=0)


def check_replicas(accelerator, model, out: Path) -> None:
    """A fingerprint of every rank's weights, gathered: the main process says in one line whether they agree
    (and which ranks differ), and writes each rank's to replicas.json.

    DDP keeps replicas identical by construction; this makes it visible, so a user can trust it.
    """
    net = bare(accelerator, model)
    tensors = [*net.parameters(), *(b for b in net.buffers() if b.is_floating_point())]
    local = sum((p.detach().double() * (i + 1)).sum() for i, p in enumerate(tensors)).reshape(1)
    every = accelerator.gather(local.to(accelerator.device)).cpu().tolist()
    if not accelerator.is_main_process:
        return
    (out / "replicas.json").write_text(json.dumps({"weights_checksum_by_rank": every}, indent=1) + "\n")
    differ = [r for r, c in enumerate(every) if c != every[0]]
    if not differ:
        console.say(f"weights identical on all {len(every)} rank(s) (checksum {every[0]:.12e})")
    else:
        console.warn(f"weights differ between ranks: rank(s) {console.spans(differ)} differ from rank 0 "
                     f"(checksums by rank in {out / 'replicas.json'})")


def plain_keys(state: dict) -> dict:
    """Drop the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes: torchvision's names."""
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items()}


def export_model(accelerator, model, out: Path, card: dict, ema=None) -> None:
    """model.pt: a plain state_dict (no `module.` / `_orig_mod.` prefixes) with torchvision's names, which its
    resnet loads strictly; model.json beside it: the network it belongs to and how to build that; with an EMA,
    model_ema.pt, its weights the same way. Each is written beside and renamed, so none is ever half there."""
    if not accelerator.is_main_process:
        return

    def plain(net: nn.Module) -> dict:
        return {k: v.detach().cpu() for k, v in plain_keys(net.state_dict()).items()}

    files = {"model.pt": lambda tmp: torch.save(plain(bare(accelerator, model)), tmp),
             "model.json": lambda tmp: tmp.write_text(json.dumps(card, indent=1) + "\n")}
    if ema is not None:
        files["model_ema.pt"] = lambda tmp: torch.save(plain(ema.module), tmp)
    for name, write in files.items():
        tmp = out / f".{name}.tmp"
        write(tmp)
        os.replace(tmp, out / name)


def load_weights(path: str, model: nn.Module, device) -> None:
    """A model.pt, a checkpoint directory (its model.safetensors) or a pickled state_dict into ``model``;
    only tensors are accepted, never pickled code."""
    path = Path(path)
    weights = path / "model.safetensors" if path.is_dir() else path
    if path.is_dir() and not weights.exists():
        console.fatal(f"--evaluate {path}: {what_folder_holds(path)}")
    if not weights.exists():
        console.fatal(f"--evaluate {path}: no such model file")
    try:
        if weights.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(weights), device=str(device))
        else:
            state = torch.load(weights, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a damaged or crafted file: one line, no traceback
        console.fatal(f"--evaluate {weights}: cannot load it ({one_line(e)}); only tensors are accepted")
    try:
        model.load_state_dict(plain_keys(state))
    except RuntimeError as e:  # torch lists every missing, unexpected and misshapen key: name the first kind
        detail = ([ln.strip() for ln in str(e).splitlines()[1:2]] or [one_line(e)])[0][:200]
        console.fatal(f"--evaluate {weights}: its weights do not fit the network ({detail}); "
                      "check --arch and --cifar-stem")


def what_folder_holds(path: Path) -> str:
    """For a folder given to --evaluate that is no checkpoint: what it holds, and the path that would do."""
    names = sorted(p.name for p in path.iterdir())
    holder = path / "checkpoints" if "checkpoints" in names and (path / "checkpoints").is_dir() else path
    steps = sorted(p.name for p in holder.iterdir() if re.fullmatch(r"step-\d+", p.name))
    if "model.pt" in names:
        suggestion = f"a run directory: evaluate its {path / 'model.pt'}"
    elif steps:
        suggestion = f"checkpoints, not one: give one of them, e.g. {holder / steps[-1]}"
    else:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "") if names else "nothing"
        suggestion = f"no model.safetensors (it holds {shown})"
    return f"{suggestion}; --evaluate takes a model.pt file or a checkpoint directory (checkpoints/step-N)"
