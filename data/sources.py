"""Find the shards of a split and what the manifest says about them, before any training starts.

A source is one of:

- a directory written by ``data.make_shards``: its ``_info.json`` lists the split's shards and their
  sample counts, ``classes.txt`` the classes;
- a brace pattern (``/data/in1k/train-{000000..001023}.tar``), a ``pipe:`` / ``http(s)://`` URL, or a
  list of those. ``_info.json`` and ``classes.txt`` are read from beside the first shard (same folder
  or URL prefix); for ``pipe:`` commands, whose folder cannot be guessed, pass ``info=`` (path or URL
  of the ``_info.json``; ``classes.txt`` is read beside it). Each shard's count is looked up by file
  name, so a pattern may select a subset of the split's shards.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import webdataset as wds

from .errors import DataError
from .shards import CLASSES_FILE, INFO_FILE


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split with their sample counts (from the manifest) and the class count."""

    split: str
    urls: tuple[str, ...]
    lengths: tuple[int, ...]
    num_classes: int

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)


def _is_local(url: str) -> bool:
    return not url.startswith(("pipe:", "http://", "https://", "gs://", "s3://"))


def _local_path(url: str) -> str:
    return url[len("file:"):] if url.startswith("file:") else url


def _read_text(url: str, what: str) -> str:
    if _is_local(url) and not os.path.isfile(_local_path(url)):
        raise DataError(f"{what} not found: {_local_path(url)}")
    try:
        with wds.gopen(url, "rb") as f:
            return f.read().decode("utf-8")
    except Exception as e:  # gopen raises whatever its transport raises (IOError, curl exit status, ...)
        raise DataError(f"cannot read {what} {url}: {e}") from None


def _beside(url: str, name: str) -> str:
    if url.startswith("pipe:"):
        raise DataError(f"cannot tell where {INFO_FILE} is for {url!r}: pass info=<path or URL of {INFO_FILE}>")
    return url.rsplit("/", 1)[0] + "/" + name if "/" in url else name


def _load_manifest(info_url: str) -> tuple[dict, int]:
    """The parsed _info.json and the number of lines of the classes.txt beside it."""
    try:
        info = json.loads(_read_text(info_url, "shard manifest"))
    except json.JSONDecodeError as e:
        raise DataError(f"shard manifest is not valid JSON: {info_url} ({e})") from None
    classes = _read_text(_beside(info_url, CLASSES_FILE), "class list").split()
    if not classes:
        raise DataError(f"class list is empty: {_beside(info_url, CLASSES_FILE)}")
    return info, len(classes)


def _expand(source) -> list[str]:
    patterns = [source] if isinstance(source, str) else list(source)
    urls = [u for p in patterns for u in wds.shardlists.expand_urls(p)]
    if not urls:
        raise DataError(f"no shards in source {source!r}")
    return urls


def _check_exist(urls) -> None:
    for u in urls:
        if _is_local(u) and not os.path.isfile(_local_path(u)):
            raise DataError(f"shard not found: {_local_path(u)}")


def resolve_shards(source, split: str, info: str | None = None) -> ShardSet:
    """The ShardSet of ``split`` in ``source``; raises DataError naming any missing file."""
    single = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    if single and _is_local(single) and "{" not in single and "::" not in single \
            and not os.path.exists(_local_path(single)):
        raise DataError(f"no such shard folder or file: {_local_path(single)} (expected the output of make-shards)")
    if isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
        root = os.fspath(source)
        manifest, num_classes = _load_manifest(info or os.path.join(root, INFO_FILE))
        entry = manifest.get("splits", {}).get(split)
        if entry is None or not entry.get("filenames"):
            raise DataError(f"split {split!r} has no shards in {os.path.join(root, INFO_FILE)}")
        urls = [os.path.join(root, f) for f in entry["filenames"]]
        lengths = entry["shard_lengths"]
    else:
        urls = _expand(os.fspath(source) if isinstance(source, os.PathLike) else source)
        info = info or _beside(urls[0], INFO_FILE)
        manifest, num_classes = _load_manifest(info)
        known = {f: n for e in manifest.get("splits", {}).values()
                 for f, n in zip(e["filenames"], e["shard_lengths"])}
        missing = [u for u in urls if u.rsplit("/", 1)[-1] not in known]
        if missing:
            raise DataError(f"shard {missing[0]} is not listed in {info}, so its sample count is unknown")
        lengths = [known[u.rsplit("/", 1)[-1]] for u in urls]
    _check_exist(urls)
    return ShardSet(split, tuple(urls), tuple(lengths), num_classes)
