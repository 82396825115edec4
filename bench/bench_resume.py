"""What a resume costs: the time and bytes to a loader's first batch when a run resumes at the start and near
the end of an epoch, with readers that seek past the samples already used, with readers on a stream that
cannot seek (they read past them), and what the loader before seeking read (every sample up to the resume
point); and, at ImageNet scale, what continuing an epoch under another layout costs (the replay of every
slot's shuffle buffer on integers) and adds to a checkpoint (a bit per sample).

    python -m bench.bench_resume                       # generated photos (bench_loader.make_photos)
    python -m bench.bench_resume --images 4000 --rounds 5 --cold

Side by side in one run, interleaved in rounds, medians over the rounds; one process, no workers (the
time to the first batch is one slot's, which is what every slot of every rank pays at once). Not a test:
it prints Markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from unittest import mock

import numpy as np

import data.tarstream
from bench.bench_loader import make_photos
from data import build_train_loader
from data.positions import Layout, Segment, pack, shard_order, used
from data.shard_reader import read_shard
from data.shards import WriterConfig, write_dataset

IMAGENET_TRAIN = 1_281_167


@contextmanager
def reading_through():
    """Readers that cannot seek: every byte of a skipped sample is read (and not decoded)."""
    with mock.patch.object(data.tarstream, "_seekable", lambda stream: False):
        yield


def bytes_read() -> int:
    """Bytes this process has read through read() so far (page-cache hits included): what a reader asked for."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def drop_page_cache() -> None:
    """Cold files, as a resume on a node that has not read them meets them (root only)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def first_batch(shards: Path, start: int, batch: int, buffer: int, cold: bool) -> tuple[float, int]:
    """Seconds and bytes read until the first batch of a loader set to start at batch ``start``."""
    loader = build_train_loader(shards, batch_size=batch, num_workers=0, image_size=224, shuffle_buffer=buffer)
    loader.set_epoch(1, start)
    if cold:
        drop_page_cache()
    t0, b0 = time.perf_counter(), bytes_read()
    next(iter(loader))
    return time.perf_counter() - t0, bytes_read() - b0


def reading_everything_before(shards: Path, start: int, batch: int, buffer: int, cold: bool) -> tuple[float, int]:
    """What the loader before seeking paid at least: every sample of the slot's run read (not decoded) up to the
    last one its first batch needs; timed alone, without that batch's decoding."""
    loader = build_train_loader(shards, batch_size=batch, num_workers=0, image_size=224, shuffle_buffer=buffer)
    layout, n = loader.layout, loader.num_samples
    lo, hi = layout.run(0, 0, layout.batches(n))
    order = Segment(1).order(hi - lo, buffer, 0, 0)
    last = lo + max(order[start * batch:(start + 1) * batch])
    stream = loader._loader.dataset.shards
    if cold:
        drop_page_cache()
    t0, b0, pos = time.perf_counter(), bytes_read(), 0
    for i in shard_order(0, 1, len(stream.urls)):
        if pos > last:
            break
        for _ in read_shard(stream.urls[i]):
            pos += 1
            if pos > last:
                break
    return time.perf_counter() - t0, bytes_read() - b0


def resume_table(shards: Path, rounds: int, batch: int, buffer: int, cold: bool) -> list[str]:
    loader = build_train_loader(shards, batch_size=batch, num_workers=0, image_size=224, shuffle_buffer=buffer)
    late = len(loader) - 1
    starts = {"start": 0, "end": late}
    ways = ("seek", "read", "before")
    times, sizes = {(w, h): [] for w in starts for h in ways}, {}
    for _ in range(rounds):
        for (where, how) in times:
            if how == "before":
                seconds, sizes[where, how] = reading_everything_before(shards, starts[where], batch, buffer, cold)
            else:
                with reading_through() if how == "read" else nullcontext():
                    seconds, sizes[where, how] = first_batch(shards, starts[where], batch, buffer, cold)
            times[where, how].append(seconds)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = ["| resume at | this loader: s, MiB read | on a stream that cannot seek | before seeking: reading alone |",
            "|---|---:|---:|---:|"]
    for where, label in (("start", "batch 0 (epoch start)"), ("end", f"batch {late} of {len(loader)} (epoch end)")):
        rows.append(f"| {label} | " + " | ".join(f"{med[where, h]:.2f} s, {sizes[where, h] / 2**20:.0f} MiB"
                                              for h in ways) + " |")
    return rows


def replay_table(batch: int) -> list[str]:
    """used() at ImageNet scale near the end of an epoch: every slot's first batches replayed."""
    rows = ["| ranks x readers | slots | replay (s) | positions.npy added to a checkpoint |", "|---|---:|---:|---:|"]
    for world, readers in ((8, 4), (8, 8), (32, 8), (128, 8)):
        layout = Layout(world, readers, batch, 2000)
        late = layout.batches(IMAGENET_TRAIN) - 1
        t0 = time.perf_counter()
        done = used(Segment(3), layout, IMAGENET_TRAIN, seed=0, batches=late)
        seconds = time.perf_counter() - t0
        kib = pack(done).nbytes / 1024
        rows.append(f"| {world} x {readers} | {world * readers} | {seconds:.2f} | {kib:.0f} KiB |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--shard-size", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shuffle-buffer", type=int, default=250, help="per slot; the trainer's is 2000 (ImageNet)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", type=Path, help="keep the generated photos and shards here")
    p.add_argument("--cold", action="store_true", help="drop the page cache before each resume (root only)")
    args = p.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_resume_"))
    shards = work / "shards"
    if not (shards / "_info.json").exists():
        make_photos(work / "photos", args.images)
        write_dataset(shards, work / "photos", cfg=WriterConfig(shard_size=args.shard_size, workers=os.cpu_count()))
    size = sum(f.stat().st_size for f in shards.glob("train-*.tar")) / 2**20
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; {args.images} images "
          f"({size:.0f} MiB) in shards of {args.shard_size}; batch {args.batch_size}, shuffle buffer "
          f"{args.shuffle_buffer}; {args.rounds} rounds, medians; files "
          f"{'dropped from the page cache before each resume' if args.cold else 'in the page cache'}\n")
    print("Time and bytes read to the first batch of a resumed epoch (one slot):\n")
    print("\n".join(resume_table(shards, args.rounds, args.batch_size, args.shuffle_buffer, args.cold)))
    print(f"\nContinuing an epoch under another layout, ImageNet's {IMAGENET_TRAIN:,} training images, batch 256 "
          "per process, resumed one batch before the epoch's end:\n")
    print("\n".join(replay_table(256)))


if __name__ == "__main__":
    main()
