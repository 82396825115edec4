"""How evenly validation is dealt to the ranks: the images of the busiest rank against the mean, for whole
shards dealt to reader slots (the loader before) and for the split cut by sample (data/validation.py now).

    python -m bench.bench_validation                     # ImageNet's 50,000 images in make-shards' 50 shards
    python -m bench.bench_validation --shards 64 --per-shard 782

Every rank waits for the busiest one at the evaluation's final all-reduce, so the busiest rank's share over
the mean is the evaluation's time over a balanced one. Counting, not timing: exact on any machine. Not a
test: it prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse

from data.validation import worker_run


def by_shard(lengths: list[int], world: int, workers: int) -> list[int]:
    """Images per rank when shard s goes to slot s % (world x workers), rank r owning slots r*workers..."""
    slots = world * workers
    return [sum(sum(lengths[r * workers + w::slots]) for w in range(workers)) for r in range(world)]


def by_sample(lengths: list[int], world: int, workers: int) -> list[int]:
    n = sum(lengths)
    return [sum(hi - lo for lo, hi in (worker_run(n, r, world, w, workers) for w in range(workers)))
            for r in range(world)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=50)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--workers", type=int, default=12)
    args = p.parse_args()
    lengths = [args.per_shard] * args.shards
    print(f"{sum(lengths):,} validation images in {args.shards} shards of {args.per_shard}; "
          f"{args.workers} workers per rank\n")
    print("| ranks | whole shards: busiest / mean | idle ranks | by sample: busiest / mean | idle ranks |")
    print("|---:|---:|---:|---:|---:|")
    for world in (1, 8, 64, 1024):
        rows = []
        for deal in (by_shard, by_sample):
            loads = deal(lengths, world, args.workers)
            mean = sum(loads) / world
            assert sum(loads) == sum(lengths), "every image exactly once"
            rows.append(f"{max(loads) / mean:.2f} | {sum(1 for x in loads if x == 0)}")
        print(f"| {world} | " + " | ".join(rows) + " |")


if __name__ == "__main__":
    main()
