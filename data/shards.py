"""Write ImageNet-style image folders as WebDataset tar shards.

Output layout (the reader in ``data.pipeline`` and timm's ``wds/`` reader both rely on it)::

    OUT/train-000000.tar ...   samples in shuffled order (fixed seed), ``shard_size`` per shard
    OUT/val-000000.tar ...     samples in sorted file order
    OUT/_info.json             per split: num_samples, filenames, shard_lengths (timm's layout), num_skipped
    OUT/classes.txt            one synset per line; class index = line number = sorted synset order
    OUT/skipped.txt            one ``split<TAB>path<TAB>reason`` line per input file that was not written

Each sample holds ``jpg`` (RGB JPEG bytes), ``cls`` (class index as ASCII digits) and ``fname.txt``
(the file's path relative to the split's input folder, UTF-8). Keys are ``%08d`` positions in the
split's file list, so they never contain dots and never collide.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from .errors import DataError, OutputExists

IMAGE_KEY = "jpg"
LABEL_KEY = "cls"
NAME_KEY = "fname.txt"
INFO_FILE = "_info.json"
CLASSES_FILE = "classes.txt"
SKIPPED_FILE = "skipped.txt"
SPLITS = ("train", "val")


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


@dataclass
class SplitResult:
    """What was written for one split, in the words of ``_info.json``."""

    name: str
    filenames: list[str] = field(default_factory=list)
    shard_lengths: list[int] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)

    @property
    def num_samples(self) -> int:
        return sum(self.shard_lengths)


# ---------------------------------------------------------------- input layouts

def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def list_classes(root: Path) -> list[str]:
    """Sorted names of the class folders under ``root``."""
    if not root.is_dir():
        raise DataError(f"input folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))
    if not classes:
        raise DataError(f"no class folders in {root} (expected {root}/<synset>/<image>)")
    return classes


def _files_under(root: Path) -> list[str]:
    """Every visible file below ``root``, as sorted POSIX paths relative to it."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        found += [(rel / f).as_posix() for f in filenames if not f.startswith(".")]
    return sorted(found)


def class_folder_items(root: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(relative path, class index) for every file in ``root/<class>/``, sorted by path."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = [c for c in list_classes(root) if c not in index]
    if unknown:
        raise DataError(f"{root}: class folders not among the training classes: {', '.join(unknown[:5])}")
    return [(rel, index[rel.split("/", 1)[0]]) for rel in _files_under(root) if "/" in rel]


def _devkit_wnids(labels_file: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> synset, from the devkit's meta.mat beside the ground-truth file."""
    meta = labels_file.parent / "meta.mat"
    if not meta.is_file():
        raise DataError(f"{labels_file} holds devkit label ids; their synsets come from {meta}, which is missing")
    try:
        from scipy import io as sio
    except ImportError:
        raise DataError(f"reading {meta} needs scipy (pip install scipy)") from None
    synsets = sio.loadmat(str(meta), squeeze_me=True)["synsets"]
    return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}


def _parse_label(token: str, classes: list[str], where: str) -> int:
    """A label is a synset name or a 0-based index in sorted synset order (Caffe's val.txt)."""
    if token in classes:
        return classes.index(token)
    if token.isdigit() and int(token) < len(classes):
        return int(token)
    raise DataError(f"{where}: label {token!r} is neither a known synset nor an index below {len(classes)}")


def _label_lines(labels_file: Path) -> list[tuple[str | None, str]]:
    """(file name or None, label token) per line of a validation label file, in any of its formats."""
    lines = [ln.strip() for ln in labels_file.read_text().splitlines() if ln.strip()]
    if lines and lines[0].replace(" ", "") == "ImageId,PredictionString":  # Kaggle's LOC_val_solution.csv
        return [(name, boxes.split()[0]) for name, boxes in (ln.split(",", 1) for ln in lines[1:])]
    rows = [ln.split() for ln in lines]
    if rows and all(len(r) == 1 and r[0].isdigit() for r in rows):  # devkit ground truth: ids only
        return [(None, r[0]) for r in rows]
    if rows and all(len(r) == 2 for r in rows):
        return [(r[0], r[1]) for r in rows]
    raise DataError(f"{labels_file}: expected '<filename> <label>' lines, one devkit label id per line, "
                    "or Kaggle's LOC_val_solution.csv")


def flat_val_items(val_dir: Path, labels_file: Path, classes: list[str] | None):
    """Items of a flat ILSVRC val folder, and the classes (from the labels when none were given).

    ``labels_file``: ``<filename> <synset or 0-based index>`` lines (file names with or without
    extension); Kaggle's LOC_val_solution.csv; or the devkit's ILSVRC2012_validation_ground_truth.txt,
    one 1-based ILSVRC2012_ID per line for the sorted files, mapped through the meta.mat beside it.
    Files without a label come back with label -1, for the caller to report as skipped.
    """
    if not labels_file.is_file():
        raise DataError(f"label file not found: {labels_file}")
    if not val_dir.is_dir():
        raise DataError(f"input folder not found: {val_dir}")
    rows, files = _label_lines(labels_file), _files_under(val_dir)
    if rows and rows[0][0] is None:
        wnids = _devkit_wnids(labels_file)
        if len(rows) != len(files):
            raise DataError(f"{labels_file}: {len(rows)} labels for {len(files)} files in {val_dir}")
        rows = [(f, wnids.get(int(token), token)) for f, (_, token) in zip(files, rows)]
        classes = classes or sorted(wnids.values())
    classes = classes or sorted({token for _, token in rows})
    file_set, by_stem = set(files), {Path(f).stem: f for f in files}
    labels = {name if name in file_set else by_stem.get(name, name):
              _parse_label(token, classes, f"{labels_file}:{i + 1}") for i, (name, token) in enumerate(rows)}
    # A file named in the labels but absent from the folder fails to open and is reported as skipped.
    return [(f, labels.get(f, -1)) for f in sorted(set(files) | set(labels))], classes


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
            yield from pending.get()
        pending = upcoming
    if pending is not None:
        yield from pending.get()


def write_split(name: str, root: Path, items: list[tuple[str, int]], out: Path,
                cfg: WriterConfig, pool) -> SplitResult:
    """Encode ``items`` (relative path, label; label -1 = unlabelled) in order into ``out/name-*.tar``."""
    result = SplitResult(name)
    counts: dict[str, int] = {}
    jobs = [(str(root / rel), cfg.max_side, cfg.quality) for rel, _ in items]
    encoded = _encoded_in_order(jobs, pool)
    # mtime=0 and fixed user/group make the tar headers, and so the shards, byte-identical across runs.
    sink = wds.ShardWriter(str(out / f"{name}-%06d.tar"), maxcount=cfg.shard_size, maxsize=float("inf"),
                           verbose=0, encoder=False, mtime=0)
    with sink, tqdm(total=len(items), desc=f"{name:5s}", unit="img", dynamic_ncols=True) as bar:
        for index, ((rel, label), (jpeg, reason)) in enumerate(zip(items, encoded)):
            bar.update()
            if label < 0:
                reason = "no label in the label file"
            if reason:
                result.skipped.append((str(root / rel), reason))
                continue
            sink.write({"__key__": f"{index:08d}", IMAGE_KEY: jpeg,
                        LABEL_KEY: str(label).encode(), NAME_KEY: rel.encode()})
            shard = os.path.basename(sink.fname)
            counts[shard] = counts.get(shard, 0) + 1
    if not counts:  # ShardWriter opens its first file up front; an empty split leaves no shard behind
        (out / f"{name}-000000.tar").unlink(missing_ok=True)
    result.filenames, result.shard_lengths = list(counts), list(counts.values())
    return result


# ---------------------------------------------------------------- the whole dataset

def prepare_output(out: Path, overwrite: bool) -> None:
    """Create ``out``; refuse to mix with earlier shards unless ``overwrite``, then remove only ours."""
    if out.exists() and not out.is_dir():
        raise DataError(f"output path exists and is not a folder: {out}")
    ours = [p for p in out.glob("*") if p.name in (INFO_FILE, CLASSES_FILE, SKIPPED_FILE)
            or (p.suffix == ".tar" and p.name.split("-")[0] in SPLITS)] if out.is_dir() else []
    if ours and not overwrite:
        raise OutputExists(f"output folder already holds shards: {out}")
    for p in ours:
        p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def write_info(out: Path, classes: list[str], results: list[SplitResult], cfg: WriterConfig) -> None:
    """Write classes.txt, skipped.txt and, last, _info.json: its presence marks a complete output."""
    (out / CLASSES_FILE).write_text("".join(c + "\n" for c in classes))
    (out / SKIPPED_FILE).write_text("".join(f"{r.name}\t{p}\t{why}\n" for r in results for p, why in r.skipped))
    info = {
        "num_classes": len(classes),
        "keys": {"image": IMAGE_KEY, "label": LABEL_KEY, "filename": NAME_KEY},
        "writer": {"shard_size": cfg.shard_size, "max_side": cfg.max_side, "quality": cfg.quality},
        "splits": {r.name: {"name": r.name, "num_samples": r.num_samples, "filenames": r.filenames,
                            "shard_lengths": r.shard_lengths, "num_skipped": len(r.skipped)}
                   for r in results},
    }
    tmp = out / (INFO_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    tmp.replace(out / INFO_FILE)


def _split_items(train_dir, val_dir, val_labels):
    """The classes and, per split, the (relative path, label) list to write, in output order."""
    train_dir, val_dir = (Path(d) if d else None for d in (train_dir, val_dir))
    if train_dir is None and val_dir is None:
        raise DataError("nothing to do: give train_dir and/or val_dir")
    if val_labels and val_dir is None:
        raise DataError(f"val_labels {val_labels} needs val_dir (the flat folder it labels)")
    classes = list_classes(train_dir) if train_dir else None
    splits = []
    if train_dir:
        items = class_folder_items(train_dir, classes)
        random.Random(TRAIN_ORDER_SEED).shuffle(items)
        splits.append(("train", train_dir, items))
    if val_dir and val_labels:
        items, classes = flat_val_items(val_dir, Path(val_labels), classes)
        splits.append(("val", val_dir, items))
    elif val_dir:
        classes = classes or list_classes(val_dir)
        splits.append(("val", val_dir, class_folder_items(val_dir, classes)))
    return classes, splits


def write_dataset(out, train_dir=None, val_dir=None, val_labels=None, cfg: WriterConfig = WriterConfig(),
                  overwrite: bool = False) -> list[SplitResult]:
    """Write the shards, class list, skipped-file report and manifest of both splits into ``out``."""
    if cfg.shard_size < 1:
        raise DataError(f"shard_size must be at least 1, got {cfg.shard_size}")
    classes, splits = _split_items(train_dir, val_dir, val_labels)
    out = Path(out)
    prepare_output(out, overwrite)
    pool = multiprocessing.Pool(cfg.workers) if cfg.workers > 1 else None
    try:
        results = [write_split(name, root, items, out, cfg, pool) for name, root, items in splits]
        write_info(out, classes, results, cfg)
    except OSError as e:  # reading inputs never raises (bad files are skipped): this is the output side
        raise DataError(f"cannot write to {out}: {e}") from None
    finally:
        if pool:
            pool.terminate()
    return results
