"""Write ImageNet-style image folders as WebDataset tar shards.

Output layout (the reader in ``data.pipeline`` and timm's ``wds/`` reader both rely on it)::

    OUT/train-000000.tar ...   samples in shuffled order (fixed seed), ``shard_size`` per shard
    OUT/val-000000.tar ...     samples in sorted file order
    OUT/_info.json             per split: num_samples, filenames, shard_lengths (timm's layout), num_skipped
    OUT/classes.txt            one synset per line; class index = line number = sorted synset order
    OUT/skipped.jsonl          one JSON object (split, path, reason) per line, per input file not written

A split is staged and moved in whole (data/shard_folder.py): writing one split keeps the others.

Each sample holds ``jpg`` (RGB JPEG bytes), ``cls`` (class index as ASCII digits) and ``fname.txt``
(the file's path relative to the split's input folder, UTF-8). Keys are ``%08d`` positions in the
split's file list, so they never contain dots and never collide.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from .errors import DataError, FlatFolder, Interrupted
from .layouts import class_folder_items, class_folders, flat_val_items
from .shard_folder import (CLASSES_FILE, INFO_FILE, SKIPPED_FILE, check_output, commit_split, containing_input,
                           create_output, discard_staging, kept_classes, staging)

__all__ = ["CLASSES_FILE", "INFO_FILE", "SKIPPED_FILE", "WriterConfig", "write_dataset"]
IMAGE_KEY = "jpg"
LABEL_KEY = "cls"
NAME_KEY = "fname.txt"


def describe(sample: dict) -> str:
    """'key (file) in shard url': how warnings name a sample read back from a shard."""
    name = sample.get(NAME_KEY, b"?").decode("utf-8", "replace")
    return f"{sample.get('__key__')} ({name}) in shard {sample.get('__url__')}"
# Class folders are written in sorted order; shuffling the training list once (fixed seed, so the
# output stays deterministic) puts many classes in every shard, which the reader's small shuffle
# buffer alone could not do.
TRAIN_ORDER_SEED = 0


@dataclass
class WriterConfig:
    """How images are stored: samples per shard, optional down-scaling and JPEG quality."""

    shard_size: int = 1000
    max_side: int | None = None  # longest side after re-encoding; None keeps the original size
    quality: int = 90  # JPEG quality for the images that must be re-encoded
    workers: int = 1
    keep_empty_classes: bool = False  # a class folder without files: a class (True) or left out (False)

    def problem(self) -> str | None:
        """The first value out of its range, in the words of this config's fields."""
        for name, value in (("shard_size", self.shard_size), ("max_side", self.max_side),
                            ("quality", self.quality), ("workers", self.workers)):
            if value is not None and not RANGES[name][0] <= value <= RANGES[name][1]:
                return f"{name} must be {range_text(name)}, got {value}"
        return None


# Inclusive bounds of the numeric settings. max_side 0 would divide by zero in PIL's thumbnail; a negative
# one skipped every image; JPEG quality is 1..100 in PIL.
RANGES = {"shard_size": (1, float("inf")), "max_side": (1, float("inf")), "quality": (1, 100),
          "workers": (1, float("inf"))}


def range_text(name: str) -> str:
    low, high = RANGES[name]
    return f"at least {low}" if high == float("inf") else f"between {low} and {high}"


@dataclass
class SplitResult:
    """What was written for one split, in the words of ``_info.json``."""

    name: str
    filenames: list[str] = field(default_factory=list)
    shard_lengths: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    empty_classes: list[str] = field(default_factory=list)  # class folders left out: they hold no file

    @property
    def num_samples(self) -> int:
        return sum(self.shard_lengths)


# ---------------------------------------------------------------- one image

def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB for any PIL mode; transparent pixels become white rather than whatever colour they hide."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def encode_image(path: str, max_side: int | None, quality: int) -> bytes:
    """RGB JPEG bytes for the image file at ``path``; raises OSError/ValueError if it cannot be read.

    An RGB JPEG that needs no down-scaling is stored as it is (no second lossy step, and fast);
    everything else (CMYK, greyscale, PNG named .JPEG, too large) is converted and re-encoded.
    """
    with open(path, "rb") as f:
        raw = f.read()
    with Image.open(io.BytesIO(raw)) as img:
        img.load()  # decode everything now: truncated files fail here, not in the training run
        too_large = max_side is not None and max(img.size) > max_side
        if img.format == "JPEG" and img.mode == "RGB" and not too_large:
            return raw
        out = _to_rgb(img)
    if too_large:
        out.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _encode_job(job: tuple[str, int | None, int]) -> tuple[bytes | None, str]:
    """Pool task: (JPEG bytes, "") or (None, reason) so one bad file never stops the pool."""
    path, max_side, quality = job
    try:
        return encode_image(path, max_side, quality), ""
    except FileNotFoundError:
        return None, "file not found"
    except Image.UnidentifiedImageError:  # its message names a BytesIO address: useless and not reproducible
        return None, "not an image file PIL can read"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return None, f"{type(e).__name__}: {e}".replace("\t", " ").replace("\n", " ")


# ---------------------------------------------------------------- one split

ENCODE_WINDOW = 512  # images per pool task batch: two in flight bound memory (pool.imap would not)
WAKE_S = 0.2  # how often the main thread wakes while it waits for the pool, to take a Ctrl-C


def _pool_result(task):
    """``task.get()``, waited for in short slices. Python runs a signal's handler only in the main thread,
    but the kernel may hand SIGINT to any thread: to one of the pool's own, the main thread's untimed wait
    never wakes to raise KeyboardInterrupt and Ctrl-C does nothing (make-shards hung in 1 of 6 Ctrl-Cs
    beside two busy loops)."""
    while not task.ready():
        task.wait(WAKE_S)
    return task.get()


def _encoded_in_order(jobs: list, pool):
    """_encode_job results in input order. Two windows in flight keep the workers busy while the
    writer catches up, without queueing a whole split's JPEGs in memory when the disk is slower."""
    if pool is None:
        yield from map(_encode_job, jobs)
        return
    pending = None
    for k in range(0, len(jobs), ENCODE_WINDOW):
        upcoming = pool.map_async(_encode_job, jobs[k:k + ENCODE_WINDOW], chunksize=8)
        if pending is not None:
            yield from _pool_result(pending)
        pending = upcoming
    if pending is not None:
        yield from _pool_result(pending)


def write_split(name: str, root: Path, items: list[tuple[str, int]], out: Path,
                cfg: WriterConfig, pool) -> SplitResult:
    """Encode ``items`` (relative path, label; label -1 = unlabelled) in order into ``out/name-*.tar``;
    a split of which no sample could be written is an error (its first skipped file says why)."""
    result = SplitResult(name)
    counts: dict[str, int] = {}
    jobs = [(str(root / rel), cfg.max_side, cfg.quality) for rel, _ in items]
    encoded = _encoded_in_order(jobs, pool)
    # mtime=0 and fixed user/group make the tar headers, and so the shards, byte-identical across runs.
    sink = wds.ShardWriter(str(out / f"{name}-%06d.tar"), maxcount=cfg.shard_size, maxsize=float("inf"),
                           verbose=0, encoder=False, mtime=0)
    # disable=None: a bar on a terminal, none in a log file (where every redraw would be a line)
    with sink, tqdm(total=len(items), desc=f"{name:5s}", unit="img", dynamic_ncols=True, disable=None) as bar:
        for index, ((rel, label), (jpeg, reason)) in enumerate(zip(items, encoded)):
            bar.update()
            if label < 0:
                reason = "no label in the label file"
            if reason:
                result.skipped.append((str(root / rel), reason))
                continue
            sink.write({"__key__": f"{index:08d}", IMAGE_KEY: jpeg,
                        LABEL_KEY: str(label).encode(),
                        NAME_KEY: rel.encode("utf-8", "surrogateescape")})  # a non-UTF-8 name: its own bytes
            shard = os.path.basename(sink.fname)
            counts[shard] = counts.get(shard, 0) + 1
    if not counts:  # ShardWriter opens its first file up front; an empty split leaves no shard behind
        (out / f"{name}-000000.tar").unlink(missing_ok=True)
    result.filenames, result.shard_lengths = list(counts), list(counts.values())
    if not counts:
        why = f"all {len(items)} files were skipped, the first: {result.skipped[0][0]}: {result.skipped[0][1]}" \
            if items else "it holds no image files"
        raise DataError(f"no {name} sample written from {root}: {why}")
    return result


# ---------------------------------------------------------------- the whole dataset

def _split_items(train_dir, val_dir, val_labels, classes, keep_empty):
    """The classes, per split the (relative path, label) list to write in output order, and the class
    folders left out as empty. ``classes``: those of the splits kept in the output, if any."""
    given, empty = classes, []
    if train_dir:
        classes, empty = class_folders(train_dir, keep_empty)
        if given and classes != given:
            raise DataError(f"the classes of {train_dir} ({len(classes)}) differ from those of the shards the "
                            f"output keeps ({len(given)}, its {CLASSES_FILE}): write every split again")
    splits = []
    if train_dir:
        items = class_folder_items(train_dir, classes)
        random.Random(TRAIN_ORDER_SEED).shuffle(items)
        splits.append(("train", train_dir, items))
    if val_dir and val_labels:
        items, classes = flat_val_items(val_dir, Path(val_labels), classes)
        splits.append(("val", val_dir, items))
    elif val_dir:
        try:
            classes, empty = (classes, empty) if classes else class_folders(val_dir, keep_empty)
        except FlatFolder as e:
            e.split = "val"
            raise
        splits.append(("val", val_dir, class_folder_items(val_dir, classes)))
    return classes, splits, empty


def _check_request(out: Path, train_dir, val_dir, val_labels, cfg: WriterConfig) -> None:
    problem = cfg.problem()
    if problem:
        raise DataError(problem)
    if train_dir is None and val_dir is None:
        raise DataError("nothing to do: give train_dir and/or val_dir")
    if val_labels and val_dir is None:
        raise DataError(f"val_labels {val_labels} needs val_dir (the flat folder it labels)")
    inside = containing_input(out, {"train_dir": train_dir, "val_dir": val_dir})
    if inside:
        raise DataError(f"out {out} is inside {inside} {train_dir if inside == 'train_dir' else val_dir}: "
                        "its shards would be read as input on the next run")


def _ignore_interrupts() -> None:
    """Pool workers leave Ctrl-C to the main process, which stops them: one message, not one per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def write_dataset(out, train_dir=None, val_dir=None, val_labels=None, cfg: WriterConfig = WriterConfig(),
                  overwrite: bool = False) -> list[SplitResult]:
    """Write the shards of the given splits into ``out``, with the class list, skipped-file report and
    manifest; splits already in ``out`` that are not written here are kept."""
    out = Path(out)
    train_dir, val_dir = (Path(d) if d else None for d in (train_dir, val_dir))
    _check_request(out, train_dir, val_dir, val_labels, cfg)
    names = ["train"] * bool(train_dir) + ["val"] * bool(val_dir)
    check_output(out, names, overwrite)
    classes, splits, empty = _split_items(train_dir, val_dir, val_labels, kept_classes(out, names)[0],
                                          cfg.keep_empty_classes)
    create_output(out)
    header = {"keys": {"image": IMAGE_KEY, "label": LABEL_KEY, "filename": NAME_KEY},
              "writer": {"shard_size": cfg.shard_size, "max_side": cfg.max_side, "quality": cfg.quality}}
    pool = multiprocessing.Pool(cfg.workers, _ignore_interrupts) if cfg.workers > 1 else None
    results, committed = [], []
    try:
        for name, root, items in splits:
            results.append(write_split(name, root, items, staging(out, name), cfg, pool))
            results[-1].empty_classes = empty if name == splits[0][0] else []
            commit_split(out, results[-1], classes, header)
            committed.append(name)
    except KeyboardInterrupt:
        raise Interrupted(out, committed, [n for n in names if n not in committed]) from None
    except OSError as e:  # reading inputs never raises (bad files are skipped): this is the output side
        raise DataError(f"cannot write to {out}: {e}") from None
    finally:
        if pool:
            pool.terminate()
        discard_staging(out, names)
    return results


