"""The output folder of make-shards: which splits it holds, and replacing one split without touching the others.

A split is written into a hidden staging folder beside its final place (``OUT/.train.partial/``) and moved
in only once complete, as checkpoints are: an interrupted run never leaves a shard in ``OUT`` that looks
complete, and the split it replaces stays readable until then. ``_info.json`` is rewritten last, atomically,
each time a split lands: its splits are exactly those whose shards are all in place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import DataError, OutputExists

INFO_FILE = "_info.json"
CLASSES_FILE = "classes.txt"
SKIPPED_FILE = "skipped.jsonl"
STAGING = ".{}.partial"


def containing_input(out, inputs: dict) -> str | None:
    """The name of the input folder ``out`` lies in (or is), if any: its shards would be read back as input."""
    target = Path(out).resolve()
    for name, folder in inputs.items():
        if folder and (target == Path(folder).resolve() or Path(folder).resolve() in target.parents):
            return name
    return None


def read_manifest(out: Path) -> dict:
    try:
        return json.loads((out / INFO_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {out / INFO_FILE}: {e}") from None


def existing_shards(out: Path, split: str) -> list[Path]:
    return sorted(out.glob(f"{split}-*.tar")) if out.is_dir() else []


def check_output(out: Path, splits: list[str], overwrite: bool) -> None:
    """Refuse a file in the way, or splits already written, before any work: nothing is touched here."""
    if out.exists() and not out.is_dir():
        raise DataError(f"output path exists and is not a folder: {out}")
    listed = read_manifest(out).get("splits", {}) if out.is_dir() else {}
    held = [s for s in splits if s in listed or existing_shards(out, s)]
    if held and not overwrite:
        raise OutputExists(f"output folder already holds {' and '.join(held)} shards: {out}")


def kept_classes(out: Path, splits: list[str]) -> tuple[list[str] | None, list[str]]:
    """The classes of the splits ``out`` keeps (those not being written), and those splits' names."""
    kept = [s for s in read_manifest(out).get("splits", {}) if s not in splits] if out.is_dir() else []
    if not kept:
        return None, []
    try:
        return (out / CLASSES_FILE).read_text().split(), kept
    except OSError as e:
        raise DataError(f"cannot read {out / CLASSES_FILE}, the classes of the {kept[0]} shards kept: {e}") from None


def create_output(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create output folder {out}: {e.strerror or e}") from None


def staging(out: Path, split: str) -> Path:
    """An empty staging folder for ``split`` (a stale one from an interrupted run is removed)."""
    folder = out / STAGING.format(split)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    return folder


def discard_staging(out: Path, splits) -> None:
    for split in splits:
        shutil.rmtree(out / STAGING.format(split), ignore_errors=True)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _skipped_lines(out: Path, result) -> str:
    """skipped.jsonl with this split's entries in place of its old ones. JSON lines, so any file name
    (a newline in it, bytes that are not UTF-8) reads back exactly as it was."""
    try:
        old = (out / SKIPPED_FILE).read_text().splitlines()
    except FileNotFoundError:
        old = []
    kept = [line for line in old if line.strip() and json.loads(line).get("split") != result.name]
    new = [json.dumps({"split": result.name, "path": p, "reason": why}) for p, why in result.skipped]
    return "".join(line + "\n" for line in kept + new)


def commit_split(out: Path, result, classes: list[str], header: dict) -> None:
    """Move the staged shards of ``result`` into ``out`` in place of that split's old ones; keep the rest."""
    info = read_manifest(out) or {"splits": {}}
    info["splits"].pop(result.name, None)
    _write_atomically(out / INFO_FILE, json.dumps(info, indent=1) + "\n")  # the old split is gone from here first
    for old in existing_shards(out, result.name):
        old.unlink()
    staged = out / STAGING.format(result.name)
    for name in result.filenames:
        (staged / name).replace(out / name)
    shutil.rmtree(staged, ignore_errors=True)
    _write_atomically(out / CLASSES_FILE, "".join(c + "\n" for c in classes))
    _write_atomically(out / SKIPPED_FILE, _skipped_lines(out, result))
    info.update(num_classes=len(classes), **header)  # header: the sample keys and the latest writer settings
    info["splits"][result.name] = {"name": result.name, "num_samples": result.num_samples,
                                   "filenames": result.filenames, "shard_lengths": result.shard_lengths,
                                   "num_skipped": len(result.skipped), "writer": header["writer"]}
    info["splits"] = dict(sorted(info["splits"].items(), key=lambda kv: kv[0] != "train"))
    _write_atomically(out / INFO_FILE, json.dumps(info, indent=1) + "\n")
