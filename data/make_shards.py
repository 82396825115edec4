"""Turn ImageNet folders into WebDataset shards.

    # class-folder layout for both splits (train/<synset>/*.JPEG, val/<synset>/*.JPEG)
    python -m data.make_shards --train-dir /data/imagenet/train --val-dir /data/imagenet/val \\
        --out /data/imagenet-shards --shard-size 1000

    # the flat ILSVRC2012 val folder, labelled by the devkit's ground truth (meta.mat must sit beside it;
    # reading it needs scipy) ...
    python -m data.make_shards --train-dir /data/imagenet/train --val-dir /data/ILSVRC2012_img_val \\
        --val-labels /data/ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt \\
        --out /data/imagenet-shards
    # ... or by Kaggle's LOC_val_solution.csv, or any '<filename> <synset or 0-based index>' file
    python -m data.make_shards --train-dir /data/imagenet/train --val-dir /data/ILSVRC/Data/CLS-LOC/val \\
        --val-labels /data/LOC_val_solution.csv --out /data/imagenet-shards

The output layout is described in data/shards.py. Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import DataError, OutputExists
from .shards import SKIPPED_FILE, WriterConfig, write_dataset


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="make-shards", description=__doc__.split("\n\n")[0])
    inp = p.add_argument_group("input")
    inp.add_argument("--train-dir", help="class-folder tree: TRAIN_DIR/<synset>/<image>")
    inp.add_argument("--val-dir", help="class-folder tree, or a flat folder with --val-labels")
    inp.add_argument("--val-labels", metavar="FILE",
                     help="labels of a flat val folder: '<filename> <synset|0-based index>' per line, "
                          "Kaggle's LOC_val_solution.csv, or the devkit's one ILSVRC2012_ID per line "
                          "(meta.mat beside it)")
    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, help="folder for the shards, _info.json, classes.txt, skipped.txt")
    out.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    out.add_argument("--max-side", type=int, default=None,
                     help="re-encode images whose longer side exceeds this (default: keep sizes)")
    out.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    out.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    p.add_argument("--workers", type=int, default=_cpu_count(), help="encoding processes (default: all cores)")
    return p.parse_args(argv)


def flag_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags themselves, in their own names (the library names its parameters)."""
    if not args.train_dir and not args.val_dir:
        return "nothing to do: give --train-dir and/or --val-dir"
    if args.val_labels and not args.val_dir:
        return f"--val-labels {args.val_labels} needs --val-dir (the flat folder it labels)"
    if args.shard_size < 1:
        return f"--shard-size must be at least 1, got {args.shard_size}"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = WriterConfig(shard_size=args.shard_size, max_side=args.max_side, quality=args.quality,
                       workers=max(1, args.workers))
    try:
        problem = flag_problem(args)
        if problem:
            raise DataError(problem)
        results = write_dataset(args.out, args.train_dir, args.val_dir, args.val_labels, cfg, args.overwrite)
    except DataError as e:
        hint = " (pass --overwrite to replace them)" if isinstance(e, OutputExists) else ""
        print(f"error: {e}{hint}", file=sys.stderr)
        return 2
    for r in results:
        print(f"{r.name}: {r.num_samples} written in {len(r.filenames)} shards, {len(r.skipped)} skipped")
    if any(r.skipped for r in results):
        print(f"skipped files are listed in {os.path.join(args.out, SKIPPED_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
