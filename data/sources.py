"""Find the shards of a split and what the manifest says about them, before any training starts.

A source is one of:

- a directory written by ``data.make_shards``, or the URL prefix it was uploaded under
  (``https://host/in1k``, ``s3://bucket/in1k``: data/remote.py reads those): its ``_info.json`` lists the
  split's shards and their sample counts, ``classes.txt`` the classes;
- a brace pattern (``/data/in1k/train-{000000..001023}.tar``), a ``pipe:`` command or a shard URL, or a
  list of those. ``_info.json`` and ``classes.txt`` are read from beside the first shard (same folder
  or URL prefix); for ``pipe:`` commands, whose folder cannot be guessed, pass ``info=`` (path or URL
  of the ``_info.json``; ``classes.txt`` is read beside it). Each shard's count is looked up by file
  name, so a pattern may select a subset of the split's shards; the split asked for takes only its own
  shards from it, and when the pattern holds none of them (a training pattern, asked for ``val``), the
  split's shards as the manifest lists them, beside the pattern's.

Shard names in a manifest are names, never paths elsewhere: one that is absolute, climbs with ``..`` or
carries a scheme (``pipe:``, ``http:``) is refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass

import webdataset as wds

from .errors import DataError, DataOutage
from .remote import ShardReads, is_remote, redact
from .shards import CLASSES_FILE, INFO_FILE

log = logging.getLogger(__name__)
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


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
    return not url.startswith("pipe:") and not is_remote(url)


def _local_path(url: str) -> str:
    return url[len("file:"):] if url.startswith("file:") else url


def _read_text(url: str, what: str, reads: ShardReads) -> str:
    if _is_local(url) and not os.path.isfile(_local_path(url)):
        raise DataError(f"{what} not found: {_local_path(url)}")
    try:
        return reads.read_text(url)
    except DataOutage:  # the store is down: the trainer requeues on it
        raise
    except DataError as e:
        raise DataError(f"cannot read {what}: {e}") from None
    except Exception as e:  # gopen raises whatever its transport raises (IOError, pipe exit status, ...)
        raise DataError(f"cannot read {what} {redact(url)}: {redact(str(e))}") from None


def _is_prefix(source: str) -> bool:
    """A remote folder (the URL make-shards' output was uploaded under), not one shard or a pattern of them."""
    return is_remote(source) and "{" not in source and not source.endswith(SHARD_SUFFIXES)


def _check_names(manifest: dict, info_url: str) -> None:
    """Refuse shard names that would read outside the manifest's folder, or through another transport."""
    for entry in manifest.get("splits", {}).values():
        for name in entry.get("filenames", []):
            if (not isinstance(name, str) or name.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", name)
                    or _SCHEME.match(name) or "://" in name):
                raise DataError(f"shard manifest {redact(info_url)} lists {name!r}: shard names must be plain "
                                "names inside its folder (no absolute path, '..' or scheme)")


def _beside(url: str, name: str) -> str:
    if url.startswith("pipe:"):
        raise DataError(f"cannot tell where {INFO_FILE} is for {url!r}: pass info=<path or URL of {INFO_FILE}>")
    return url.rsplit("/", 1)[0] + "/" + name if "/" in url else name


def _load_manifest(info_url: str, reads: ShardReads) -> tuple[dict, int]:
    """The parsed _info.json and the number of lines of the classes.txt beside it."""
    try:
        info = json.loads(_read_text(info_url, "shard manifest", reads))
    except json.JSONDecodeError as e:
        raise DataError(f"shard manifest is not valid JSON: {redact(info_url)} ({e})") from None
    _check_names(info, info_url)
    classes = _read_text(_beside(info_url, CLASSES_FILE), "class list", reads).split()
    if not classes:
        raise DataError(f"class list is empty: {redact(_beside(info_url, CLASSES_FILE))}")
    return info, len(classes)


def _expand(source) -> list[str]:
    patterns = [source] if isinstance(source, str) else list(source)
    urls = [u for p in patterns for u in wds.shardlists.expand_urls(p)]
    if not urls:
        raise DataError(f"no shards in source {redact(repr(source))}")
    return urls


def _check_exist(urls) -> None:
    for u in urls:
        if _is_local(u) and not os.path.isfile(_local_path(u)):
            raise DataError(f"shard not found: {_local_path(u)}")


def _split_entry(manifest: dict, split: str, info_url: str) -> dict:
    entry = manifest.get("splits", {}).get(split)
    if entry is None or not entry.get("filenames"):
        raise DataError(f"split {split!r} has no shards in {redact(info_url)}")
    return entry


def _from_folder(root: str, split: str, info: str | None, reads: ShardReads):
    """(urls, lengths, classes) of ``split`` in a make-shards folder or the URL prefix it was uploaded under."""
    join = os.path.join if _is_local(root) else (lambda r, name: r.rstrip("/") + "/" + name)
    info = info or join(root, INFO_FILE)
    manifest, num_classes = _load_manifest(info, reads)
    entry = _split_entry(manifest, split, info)
    return [join(root, f) for f in entry["filenames"]], entry["shard_lengths"], num_classes


def _from_pattern(source, split: str, info: str | None, reads: ShardReads):
    """(urls, lengths, classes) of the shards of ``split`` a pattern or list selects (see the module doc)."""
    urls = _expand(source)
    info = info or _beside(urls[0], INFO_FILE)
    manifest, num_classes = _load_manifest(info, reads)
    known = {f: (name, n) for name, e in manifest.get("splits", {}).items()
             for f, n in zip(e["filenames"], e["shard_lengths"])}
    missing = [u for u in urls if u.rsplit("/", 1)[-1] not in known]
    if missing:
        raise DataError(f"shard {redact(missing[0])} is not listed in {redact(info)}, so its sample count is unknown")
    mine = [u for u in urls if known[u.rsplit("/", 1)[-1]][0] == split]
    if not mine:  # a training pattern, asked for the validation split: never evaluate on training shards
        entry = _split_entry(manifest, split, info)
        mine = [_beside(urls[0], f) for f in entry["filenames"]]
        log.warning("split %r: the pattern holds none of its shards; reading the %d that %s lists for it",
                    split, len(mine), redact(info))
    return mine, [known[u.rsplit("/", 1)[-1]][1] for u in mine], num_classes


def resolve_shards(source, split: str, info: str | None = None, reads: ShardReads | None = None) -> ShardSet:
    """The ShardSet of ``split`` in ``source``; raises DataError naming any missing file. ``reads``: how remote
    manifests are read (data/remote.py; default: the default RetryPolicy)."""
    reads = reads or ShardReads()
    single = os.fspath(source) if isinstance(source, (str, os.PathLike)) else None
    if single and _is_local(single) and "{" not in single and "::" not in single \
            and not os.path.exists(_local_path(single)):
        raise DataError(f"no such shard folder or file: {_local_path(single)} (expected the output of make-shards)")
    if single and (os.path.isdir(single) or _is_prefix(single)):
        urls, lengths, num_classes = _from_folder(single, split, info, reads)
    else:
        urls, lengths, num_classes = _from_pattern(single or source, split, info, reads)
    _check_exist(urls)
    return ShardSet(split, tuple(urls), tuple(lengths), num_classes)
