"""What starting loader workers from a forkserver costs a rank (data/workers.py: the start method beside other
ranks) against forking them from the rank (the start method when it is alone), side by side: seconds from
building the training loader to its first batch, seconds for the rest of the epoch, and the memory of the rank's
process tree (PSS: a page shared by several processes counts once, split between them).

    python -m bench.bench_worker_start                   # 5 rounds, 2 workers, 512 generated photos
    python -m bench.bench_worker_start --rounds 7 --workers 4

Each measurement runs in a fresh process (the server and its imports are paid once per process, on its first
loader with workers), started after `import torch` and our data package, as in the trainer; rounds alternate
which start method goes first, so load from other processes hits both alike. Not a test: it prints a Markdown
table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("fork", "forkserver")


def measure(method: str, shards: str, workers: int) -> dict:
    """One loader's start, first batch and epoch in this process, with workers started by ``method``."""
    import data.workers
    from data import build_train_loader

    data.workers._several_ranks = lambda: method == "forkserver"  # beside other ranks, or alone
    t0 = time.perf_counter()
    loader = build_train_loader(shards, batch_size=32, num_workers=workers, image_size=160)
    batches = iter(loader)
    next(batches)
    first = time.perf_counter() - t0
    rest = sum(1 for _ in batches)
    epoch = time.perf_counter() - t0 - first
    tree = [psutil.Process(), *psutil.Process().children(recursive=True)]
    assert loader._loader.multiprocessing_context.get_start_method() == method
    return {"first_batch_s": first, "rest_s": epoch, "batches": rest + 1, "processes": len(tree),
            "pss_mib": sum(p.memory_full_info().pss for p in tree) / 2**20}


def one(method: str, shards: Path, workers: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.bench_worker_start", "--one", method, "--shards", str(shards),
                          "--workers", str(workers)], cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--one", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--shards", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, str(args.shards), args.workers)))
        return

    from bench.bench_loader import make_photos
    from data.shards import WriterConfig, write_dataset

    with tempfile.TemporaryDirectory() as work:
        make_photos(Path(work) / "images", args.images)
        shards = Path(work) / "shards"
        write_dataset(shards, train_dir=Path(work) / "images", cfg=WriterConfig(shard_size=32, workers=args.workers))
        one("fork", shards, args.workers)  # warm-up: page cache, .pyc files
        runs = {m: [] for m in METHODS}
        for r in range(args.rounds):
            for m in METHODS[::1 if r % 2 == 0 else -1]:
                runs[m].append(one(m, shards, args.workers))

    print(f"{args.images} generated photos, batch 32 at 160 px, {args.workers} workers; median of {args.rounds} "
          "rounds (range)\n")
    print("| workers start | first batch s | rest of the epoch s | processes | PSS of the process tree, MiB |")
    print("|---|---:|---:|---:|---:|")
    for m in METHODS:
        cells = []
        for key in ("first_batch_s", "rest_s", "processes", "pss_mib"):
            xs = [run[key] for run in runs[m]]
            fmt = "{:.0f}" if key in ("processes", "pss_mib") else "{:.2f}"
            cells.append(f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}-{fmt.format(max(xs))})")
        print(f"| {m} | " + " | ".join(cells) + " |")
    pairs = list(zip(runs["fork"], runs["forkserver"]))
    later = statistics.median(s["first_batch_s"] - f["first_batch_s"] for f, s in pairs)
    memory = statistics.median(s["pss_mib"] / f["pss_mib"] for f, s in pairs)
    print(f"\nper round, forkserver against fork: first batch {later:+.2f} s, memory {memory:.2f}x (medians)")


if __name__ == "__main__":
    main()
