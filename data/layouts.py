"""The input layouts make-shards reads: class-folder trees and flat validation folders with a label file.

Each function returns ``(relative path, class index)`` items; the writer (data/shards.py) encodes them.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import DataError, FlatFolder

LABEL_FORMATS = ("'<filename> <synset or 0-based index>' lines, Kaggle's LOC_val_solution.csv, or the devkit's "
                 "ILSVRC2012_validation_ground_truth.txt with meta.mat beside it")


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _files_under(root: Path) -> list[str]:
    """Every visible file below ``root``, as sorted POSIX paths relative to it."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if _visible(d)]
        rel = Path(dirpath).relative_to(root)
        found += [(rel / f).as_posix() for f in filenames if _visible(f)]
    return sorted(found)


def class_folders(root: Path, keep_empty: bool = False) -> tuple[list[str], list[str]]:
    """Sorted names of the class folders under ``root``, and those left out because they hold no file.

    An empty folder kept as a class would give the network an output no image ever trains, and shift
    nothing visibly: so it is left out (and reported) unless ``keep_empty``.
    """
    if not root.is_dir():
        raise DataError(f"input folder not found: {root}")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p.name))
    if not names:
        loose = [p for p in root.iterdir() if p.is_file() and _visible(p.name)]
        if loose:
            raise FlatFolder(f"no class folders in {root}, only {len(loose)} files (expected {root}/<synset>/<image>)")
        raise DataError(f"no class folders in {root} (expected {root}/<synset>/<image>)")
    empty = [n for n in names if not _files_under(root / n)]
    classes = names if keep_empty else [n for n in names if n not in empty]
    if not classes:
        raise DataError(f"every class folder in {root} is empty (expected {root}/<synset>/<image>)")
    return classes, empty


def class_folder_items(root: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(relative path, class index) for every file in ``root/<class>/``, sorted by path."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = [c for c in class_folders(root, keep_empty=True)[0] if c not in index and _files_under(root / c)]
    if unknown:
        raise DataError(f"{root}: class folders not among the training classes: {', '.join(unknown[:5])}")
    return [(rel, index[rel.split("/", 1)[0]]) for rel in _files_under(root)
            if "/" in rel and rel.split("/", 1)[0] in index]


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
