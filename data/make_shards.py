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

The output layout is described in data/shards.py. Errors print one line and exit with status 2; Ctrl-C
stops with one line and status 130, leaving the splits already complete and no partial shard.
Writing one split into an output that holds the other keeps it (e.g. --val-dir alone adds val).
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import DataError, FlatFolder, Interrupted, OutputExists
from .layouts import LABEL_FORMATS
from .shard_folder import containing_input
from .shards import SKIPPED_FILE, WriterConfig, range_text, write_dataset


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
    out.add_argument("--out", required=True, help="folder for the shards, _info.json, classes.txt, skipped.jsonl")
    out.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    out.add_argument("--max-side", type=int, default=None,
                     help="re-encode images whose longer side exceeds this (default: keep sizes)")
    out.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images (default 90)")
    out.add_argument("--overwrite", action="store_true",
                     help="replace the shards of the splits given (the other split in --out is kept)")
    inp.add_argument("--keep-empty-classes", action="store_true",
                     help="make a class of a class folder without files (default: leave it out, with a warning)")
    p.add_argument("--workers", type=int, default=_cpu_count(), help="encoding processes (default: all cores)")
    return p.parse_args(argv)


def flag_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags themselves, in their own names (the library names its parameters)."""
    if not args.train_dir and not args.val_dir:
        return "nothing to do: give --train-dir and/or --val-dir"
    if args.val_labels and not args.val_dir:
        return f"--val-labels {args.val_labels} needs --val-dir (the flat folder it labels)"
    for name in ("shard_size", "max_side", "quality", "workers"):
        value = getattr(args, name)
        cfg = WriterConfig(**{name: value})
        if value is not None and cfg.problem():
            return f"--{name.replace('_', '-')} must be {range_text(name)}, got {value}"
    inside = containing_input(args.out, {"--train-dir": args.train_dir, "--val-dir": args.val_dir})
    if inside:
        return (f"--out {args.out} is inside {inside} {getattr(args, inside[2:].replace('-', '_'))}: its shards "
                "would be read as input on the next run; choose a folder outside it")
    return None


def hint(e: DataError) -> str:
    if isinstance(e, OutputExists):
        return " (pass --overwrite to replace them)"
    if isinstance(e, FlatFolder) and e.split == "val":
        return f"; a flat folder of images needs --val-labels FILE: {LABEL_FORMATS}"
    return ""


def interrupted_line(e: KeyboardInterrupt, out: str) -> str:
    complete = e.complete if isinstance(e, Interrupted) else []
    if not complete:
        return f"nothing written to {out} (no partial shard left); run the same command again"
    flags = " and ".join(f"--{s}-dir" for s in e.missing)
    return (f"{' and '.join(complete)} complete in {out}, {' and '.join(e.missing)} not written (no partial shard "
            f"left); to finish, run again with {flags} only")


def report(results, args: argparse.Namespace) -> None:
    """The summary: a warning per empty class folder left out, then a line per split."""
    for r in results:
        for name in r.empty_classes:
            folder = os.path.join(args.train_dir if r.name == "train" else args.val_dir, name)
            print(f"warning: class folder {folder} holds no files: left out of the classes "
                  "(--keep-empty-classes keeps it)", file=sys.stderr)
    for r in results:
        empty = f"; {len(r.empty_classes)} empty class folder(s) left out" if r.empty_classes else ""
        print(f"{r.name}: {r.num_samples} written in {len(r.filenames)} shards, {len(r.skipped)} skipped{empty}")
    if any(r.skipped for r in results):
        print(f"skipped files are listed in {os.path.join(args.out, SKIPPED_FILE)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = WriterConfig(shard_size=args.shard_size, max_side=args.max_side, quality=args.quality,
                       workers=args.workers, keep_empty_classes=args.keep_empty_classes)
    try:
        problem = flag_problem(args)
        if problem:
            raise DataError(problem)
        results = write_dataset(args.out, args.train_dir, args.val_dir, args.val_labels, cfg, args.overwrite)
    except DataError as e:
        print(f"error: {e}{hint(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Interrupted once writing began; a plain one while listing the inputs
        print(f"interrupted: {interrupted_line(e, args.out)}", file=sys.stderr)
        return 130
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
