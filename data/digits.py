"""Demo data in seconds without a network: scikit-learn's bundled handwritten digits as ImageNet-style shards.

    python -m data.digits demo_data        # -> demo_data/raw/{train,val}/<digit>/*.JPEG, demo_data/shards/

1797 8x8 greyscale digits (10 classes) are upscaled to 32x32 and saved as greyscale JPEGs in the
ImageNet folder layout, split 80/20 stratified with a fixed seed; our writer then turns them into
shards of 128 samples (converting the greyscale JPEGs to RGB on the way). Train the demo with
image_size 32, crop_pct 1.0 and no horizontal flip (a mirrored digit is a different symbol).
Running it again when ``OUT/shards`` is complete does nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError
from .shards import INFO_FILE, WriterConfig, write_dataset

IMAGE_SIDE = 32
SHARD_SIZE = 128
VAL_FRACTION = 0.2
SPLIT_SEED = 0


def write_image_folders(raw: Path) -> None:
    """``raw/{train,val}/<digit>/<index>.JPEG``: the digits, upscaled, stratified split."""
    from sklearn.datasets import load_digits  # optional dependency (extra "demo"): import only when used
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train, val = train_test_split(index, test_size=VAL_FRACTION, stratify=digits.target, random_state=SPLIT_SEED)
    for split, members in (("train", train), ("val", val)):
        for i in sorted(members):
            folder = raw / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)  # values are 0..16
            img = Image.fromarray(pixels, mode="L").resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.BILINEAR)
            img.save(folder / f"{i:04d}.JPEG", quality=95)


def make_demo_data(out: Path, workers: int = 1) -> bool:
    """Write the folders and shards under ``out``; returns False if the shards were complete already."""
    shards = out / "shards"
    if (shards / INFO_FILE).is_file():  # written last by the writer, so its presence means complete
        return False
    write_image_folders(out / "raw")
    write_dataset(shards, out / "raw" / "train", out / "raw" / "val",
                  cfg=WriterConfig(shard_size=SHARD_SIZE, workers=workers), overwrite=True)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.digits", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for raw/ (JPEG tree) and shards/")
    p.add_argument("--workers", type=int, default=1, help="encoding processes (default 1: it takes seconds)")
    args = p.parse_args(argv)
    try:
        made = make_demo_data(args.out, args.workers)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'wrote' if made else 'already complete:'} {args.out / 'shards'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
