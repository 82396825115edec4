"""What a run shows while it trains: TensorBoard and metrics.jsonl, the per-interval console line with
images/s and data wait, the progress bar, and the warning when the loader cannot keep up."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import console

SLOW_DATA_FRACTION = 0.10  # of the wall time spent waiting for the loader, per logging interval
SLOW_DATA_INTERVALS = 3  # sustained, not one noisy interval: a busy neighbour or an epoch boundary is no
#                          reason to re-shard


class Monitor:
    """TensorBoard and metrics.jsonl, written by the main process only; the hyper-parameters go in at the end,
    beside the final accuracy."""

    def __init__(self, out: Path, *, enabled: bool, resume_step: int, hparams: dict, workers: int, log_every: int):
        self.enabled, self.writer, self.hparams = enabled, None, hparams
        self.jsonl = out / "metrics.jsonl"
        self.data_wait = DataWaitWatch(workers, log_every)
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        # At step 0 the run owns the directory (engine/rundir.py saw to it): what logs are there belong to a run
        # that wrote no checkpoint, and a fresh run's curves must not continue them.
        if resume_step:
            self._truncate_jsonl(resume_step)
        else:
            self.jsonl.unlink(missing_ok=True)
            for old in (out / "tensorboard").glob("events.out.tfevents.*"):
                old.unlink()
        # purge_step drops events a killed run wrote after the checkpoint we resume from: no step twice.
        self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def _truncate_jsonl(self, step: int) -> None:
        if self.jsonl.exists():
            keep = [ln for ln in self.jsonl.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            self.jsonl.write_text("".join(ln + "\n" for ln in keep))

    def log(self, step: int, scalars: dict, kind: str) -> None:
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(f"{kind}/{name}", value, step)
        with self.jsonl.open("a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **scalars}) + "\n")

    def log_train(self, step: int, epoch: int, stats: dict) -> None:
        """An interval's scalars, its console line, and the data-wait check."""
        self.log(step, stats, "train")
        console.say(f"step {step} epoch {epoch}: loss {stats['loss']:.4f}  lr {stats['lr']:.4g}  "
                    f"{stats['images_per_s']:.0f} img/s  data wait {100 * stats['data_wait_fraction']:.0f}%")
        self.data_wait.add(stats["data_wait_fraction"])

    def image_grid(self, images: torch.Tensor, step: int) -> None:
        if self.enabled:
            from torchvision.utils import make_grid

            self.writer.add_image("train/augmented_batch", make_grid(images[:32].cpu(), nrow=8), step)

    def close(self, metrics: dict) -> None:
        if self.enabled:
            clean = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.hparams.items()}
            self.writer.add_hparams(clean, {f"hparam/{k}": v for k, v in metrics.items()}, run_name="hparams")
            self.writer.close()


class DataCounts:
    """What the training loader counted, reported per epoch as metrics.jsonl's "data" line (and TensorBoard's
    data/*): corrupt samples skipped (the loader warns about each by name), with --decode device the images
    decoded on the CPU instead (data/device_decode.py says which), and the remote shard reads retried (by both
    loaders, which share their ShardReads; each retry was a warning naming the shard and the byte)."""

    NAMES = ("bad_samples", "cpu_fallbacks", "shard_retries")

    def __init__(self):
        self.reported = dict.fromkeys(self.NAMES, 0)  # totals over all ranks, as last reported

    def report(self, accelerator, train, monitor: "Monitor", progress) -> None:
        """Every rank calls it (one all-reduce); the counts since the last report are logged and said."""
        mine = torch.tensor([float(getattr(train, name, 0)) for name in self.NAMES], device=accelerator.device)
        totals = accelerator.reduce(mine, reduction="sum") if accelerator.num_processes > 1 else mine
        new = {}
        for name, total in zip(self.NAMES, (int(v) for v in totals.tolist())):
            new[name], self.reported[name] = total - self.reported[name], total
        monitor.log(progress.global_step, new, "data")
        if new["bad_samples"]:
            console.say(f"epoch {progress.epoch}: skipped {new['bad_samples']} corrupt training samples "
                        "(named in the warnings above)")
        if new["cpu_fallbacks"]:
            console.say(f"epoch {progress.epoch}: {new['cpu_fallbacks']} training images decoded on the CPU, not "
                        "the device (greyscale, CMYK or not JPEG, or refused by the device's decoder)")
        if new["shard_retries"]:
            console.say(f"epoch {progress.epoch}: {new['shard_retries']} remote shard reads retried (named in the "
                        "warnings above)")


class StepMeter:
    """Loss, images/s and the share of wall time spent waiting for the loader, per logging interval."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self):
        self.loss_sum = torch.zeros((), device=self.device)  # summed on the device: no sync per step
        self.batches, self.images, self.wait = 0, 0, 0.0
        self.t0 = time.perf_counter()

    def start_wait(self):
        self._w = time.perf_counter()

    def end_wait(self):
        self.wait += time.perf_counter() - self._w

    def add(self, loss, n: int):
        self.loss_sum += loss.float()
        self.batches += 1
        self.images += n

    def read(self, accelerator) -> dict:
        """The interval's figures over all ranks (every rank calls it at the same step): the mean loss, and the
        slowest rank's data wait, which is what holds every rank up at the next all-reduce."""
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        # .item()/.tolist() wait for the device: the interval's queued GPU work is inside the timing
        mine = torch.stack([self.loss_sum.float(), torch.tensor(float(self.batches), device=self.device),
                            torch.tensor(self.wait / elapsed, device=self.device)])
        ranks = accelerator.gather(mine[None]) if accelerator.num_processes > 1 else mine[None]
        loss_sum, batches, _ = ranks.sum(dim=0).tolist()
        stats = {"loss": loss_sum / max(batches, 1),
                 "images_per_s": self.images * accelerator.num_processes / elapsed,
                 "data_wait_fraction": float(ranks[:, 2].max())}
        self.reset()
        return stats


class DataWaitWatch:
    """Says once per run when waiting for data has taken over SLOW_DATA_FRACTION of the wall time for
    SLOW_DATA_INTERVALS logging intervals in a row."""

    def __init__(self, workers: int, log_every: int):
        self.workers, self.log_every = workers, log_every
        self.slow_intervals, self.warned = 0, False

    def add(self, data_wait_fraction: float) -> None:
        self.slow_intervals = self.slow_intervals + 1 if data_wait_fraction > SLOW_DATA_FRACTION else 0
        if self.slow_intervals == SLOW_DATA_INTERVALS and not self.warned:
            self.warned = True
            console.warn(f"over {SLOW_DATA_FRACTION:.0%} of step time has been spent waiting for data for "
                         f"{SLOW_DATA_INTERVALS * self.log_every} steps; raise --workers (now {self.workers}), "
                         "write pre-resized shards (make-shards --max-side 320) so JPEG decoding is cheaper, "
                         "or decode on the GPU (--decode device)")


def progress_bar(enabled: bool, epoch: int, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # disable=None: no bar when stdout is not a terminal (SLURM logs, CI), where the log lines suffice
    return tqdm(total=total, initial=initial, desc=f"epoch {epoch}", unit="batch", leave=False,
                dynamic_ncols=True, disable=None)
