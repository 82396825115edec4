"""Shards and manifests read from a web server or an object store, with reads that survive the network.

``http://`` and ``https://`` go through the standard library's HTTP client (never a shell: a URL is data, not
a command); ``s3://`` and ``gs://`` through fsspec (s3fs / gcsfs, optional: ``pip install .[s3]`` / ``[gcs]``;
credentials and an S3-compatible endpoint come from their usual environment variables); a ``pipe:`` command
runs as the user wrote it (a shell command, as in webdataset) and its standard output is the stream. Local
paths keep webdataset's ``gopen``.

A read that fails or stalls (connection reset, a timeout, a 5xx answer, a body shorter than announced) is
retried after an exponential backoff with jitter, and continues at the byte where it stopped (an HTTP
``Range`` request; a ranged read through fsspec; a ``pipe:`` command that exits non-zero or stalls is run
again and the bytes already read are dropped), so the bytes a reader sees, and the samples of the epoch,
are the same as if nothing had failed. Each retry is a warning naming the shard, the byte, the attempt and
the cause, and is counted (``ShardReads.retries``, shared by a loader's worker processes). When the retries
are exhausted the read raises ``DataOutage``. A skip forward (a reader seeking past samples it does not
need) reads and drops short gaps and opens a new ranged request past long ones.

Credentials in a URL (``user:pass@``, a query token) are used for the request and never shown: every URL
that reaches a message goes through ``redact``.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import logging
import os
import random
import re
import select
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass

from .errors import DataError, DataOutage
from .workers import context

log = logging.getLogger(__name__)

HTTP_SCHEMES = ("http://", "https://")
FSSPEC_SCHEMES = ("s3://", "gs://", "gcs://")
REOPEN_GAP = 4 << 20  # bytes: a skip longer than this opens a new ranged request instead of reading the gap
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@")
_QUERY = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#]*)\?[^\s#'\"]*")


def redact(text: str) -> str:
    """``text`` with the credentials of any URL in it hidden: ``user:pass@`` and query strings (tokens,
    pre-signed signatures) become ``***``."""
    return _QUERY.sub(r"\g<scheme>?***", _USERINFO.sub(r"\g<scheme>***@", text))


def is_remote(url: str) -> bool:
    """Whether ``url`` names an HTTP or object-store location (a URL prefix, a shard, a manifest)."""
    return url.startswith(HTTP_SCHEMES + FSSPEC_SCHEMES)


def is_retried(url: str) -> bool:
    """Whether reads of ``url`` go through ``ResumableStream``, retried and able to end in a DataOutage: remote
    URLs and ``pipe:`` commands (which usually fetch from a store too); local files fail at once."""
    return is_remote(url) or url.startswith("pipe:")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a remote read tries: ``retries`` attempts after the first, backoff doubling from ``first_delay``
    (with jitter) and the backoff of one read capped at ``max_wait`` seconds in all; ``timeout`` seconds
    without a byte make a stalled read fail (and be retried)."""

    retries: int = 8
    timeout: float = 60.0
    max_wait: float = 600.0
    first_delay: float = 1.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Backoff before retry ``attempt`` (1-based): full doubling, jittered into [50 %, 100 %] so that many
        readers failing together do not come back together."""
        return self.first_delay * 2 ** (attempt - 1) * (0.5 + 0.5 * rng.random())


class ShortBody(OSError):
    """The server closed the body before the length it announced."""


class _Permanent(Exception):
    """A failure no retry can mend (404, 403, a bad URL): reported at once as a DataError."""


# ---------------------------------------------------------------- transports: a byte stream from a position

def _http_request(url: str, pos: int) -> urllib.request.Request:
    """A GET from byte ``pos``; ``user:pass@`` in the URL becomes a Basic Authorization header."""
    parts = urllib.parse.urlsplit(url)
    headers = {"User-Agent": "resnet-imagenet-shards"}
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        token = base64.b64encode(urllib.parse.unquote(userinfo).encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    if pos:
        headers["Range"] = f"bytes={pos}-"
    # quote what a user typed unquoted (a space); what is already %-encoded, and the path's own syntax, stays
    path = urllib.parse.quote(parts.path, safe="/%:@!$&'()*+,;=-._~")
    return urllib.request.Request(urllib.parse.urlunsplit((parts.scheme, netloc, path, parts.query, "")),
                                  headers=headers)


def open_http(url: str, pos: int, timeout: float):
    """(body stream positioned at ``pos``, total size or None) of an HTTP(S) URL."""
    try:
        resp = urllib.request.urlopen(_http_request(url, pos), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and pos:  # asked past the end: the stream is at its end
            return io.BytesIO(b""), pos
        if e.code >= 500 or e.code in (408, 429):
            raise OSError(f"HTTP {e.code} {e.reason}") from None
        raise _Permanent(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, ssl.SSLCertVerificationError):  # a retry meets the same certificate
            raise _Permanent(f"TLS certificate: {e.reason}") from None
        raise
    except ValueError as e:  # urllib's word for a URL it cannot parse
        raise _Permanent(str(e)) from None
    total = None
    if resp.status == 206:
        match = re.match(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
        if not match or int(match.group(1)) != pos:
            resp.close()
            raise OSError(f"the server answered the range from byte {pos} with {resp.headers.get('Content-Range')!r}")
        total = int(match.group(2)) if match.group(2) != "*" else None
    else:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if pos:  # the server ignores Range: read the whole body again and drop what was read before
            _drop(resp, pos)
    return resp, total


def open_fsspec(url: str, pos: int, timeout: float):
    """(file positioned at ``pos``, size) of an ``s3://`` or ``gs://`` object, through fsspec."""
    scheme = url.split("://", 1)[0]
    package, extra = {"s3": ("s3fs", "s3")}.get(scheme, ("gcsfs", "gcs"))
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
    except ImportError:
        raise _Permanent(f"reading {scheme}:// needs fsspec and {package}: pip install .[{extra}]") from None
    try:
        f = fs.open(path, "rb")
    except (FileNotFoundError, PermissionError) as e:  # OSErrors no retry mends
        raise _Permanent(f"{type(e).__name__}: {e}") from None
    f.seek(pos)
    return f, f.size


class PipeBody:
    """A ``pipe:`` command's standard output, read with a timeout: a read that waits ``timeout`` seconds for a
    byte fails, and so does the end of a command that exits non-zero (a fetch that broke off), so both are
    retried like a reset connection."""

    def __init__(self, command: str, timeout: float):
        # shell=True: a pipe: command is a shell command line the user wrote, as webdataset runs it. Shard names
        # never reach it (a manifest's names with a scheme are refused in data/sources.py).
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,  # noqa: S602
                                     start_new_session=True)
        self.timeout, self.command = timeout, command

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            chunks = list(iter(lambda: self.read(1 << 20), b""))
            return b"".join(chunks)
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            raise TimeoutError(f"no byte from the pipe: command in {self.timeout:g} s")
        data = os.read(self.proc.stdout.fileno(), n)
        if not data:
            code = self.proc.wait(timeout=self.timeout)
            if code:
                raise OSError(f"the pipe: command exited with status {code}")
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the command and what it started (curl | ...)
        self.proc.stdout.close()
        self.proc.wait()


def open_pipe(url: str, pos: int, timeout: float):
    """(stdout of the ``pipe:`` command, positioned at ``pos`` by dropping what the earlier runs gave, None)."""
    body = PipeBody(url[len("pipe:"):], timeout)
    try:
        _drop(body, pos)
    except BaseException:
        body.close()
        raise
    return body, None


def _drop(stream, n: int) -> None:
    while n > 0:
        got = len(stream.read(min(n, 1 << 20)))
        if not got:
            raise ShortBody(f"body ended {n} bytes before the position asked for")
        n -= got


# ---------------------------------------------------------------- a stream that survives its transport

class ResumableStream(io.RawIOBase):
    """The bytes of one remote object, read forward: on a failure the transport is opened again at the byte
    where the read stopped, after a backoff, until the policy gives up (``DataOutage``). ``seek`` forward only
    (all a tar reader needs), and lazily: the next read drops a short gap or reopens past a long one."""

    def __init__(self, url: str, reads: "ShardReads"):
        super().__init__()
        self.url, self.reads, self.name = url, reads, redact(url)
        self.transport = (open_http if url.startswith(HTTP_SCHEMES) else open_pipe if url.startswith("pipe:")
                          else open_fsspec)
        self.pos, self.target, self.total, self.body = 0, 0, None, None
        self._rng = random.Random()  # jitter only: the global generators belong to augmentation

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.target

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self.target + offset}.get(whence)
        if target is None or target < self.pos:
            raise OSError(f"{self.name}: only forward seeks are supported")
        self.target = target
        return target

    def read(self, n: int = -1) -> bytes:
        attempt, waited = 0, 0.0
        while True:
            try:
                return self._read_once(n)
            except _Permanent as e:
                raise DataError(f"cannot read {self.name}: {e}") from None
            except (OSError, http.client.HTTPException) as e:  # resets, timeouts, 5xx, short bodies
                attempt += 1
                waited += self._back_off(attempt, waited, e)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def _read_once(self, n: int) -> bytes:
        if self.body is None or self.target - self.pos > REOPEN_GAP:
            self._close_body()
            self.body, self.total = self.transport(self.url, self.target, self.reads.policy.timeout)
            self.pos = self.target
        if self.target > self.pos:
            _drop(self.body, self.target - self.pos)
            self.pos = self.target
        data = self.body.read(n) if n is not None and n >= 0 else self.body.read()
        if not data and n != 0 and self.total is not None and self.pos < self.total:
            raise ShortBody(f"the body ended at byte {self.pos} of {self.total}")
        self.pos = self.target = self.pos + len(data)
        return data

    def _back_off(self, attempt: int, waited: float, cause: Exception) -> float:
        """Sleep before retry ``attempt``, warn and count it; raise DataOutage when the policy is spent."""
        self._close_body()
        policy, why = self.reads.policy, _cause(cause)
        delay = policy.delay(attempt, self._rng)
        if attempt > policy.retries or waited + delay > policy.max_wait:
            raise DataOutage(f"data outage: shard {self.name} unreadable at byte {self.target} after "
                             f"{attempt} attempts ({waited:.0f} s of backoff): {why}")
        log.warning("shard %s: read failed at byte %d (%s); retry %d of %d in %.1f s", self.name, self.target,
                    why, attempt, policy.retries, delay)
        self.reads.count_retry()
        time.sleep(delay)
        return delay

    def _close_body(self) -> None:
        if self.body is not None:
            try:
                self.body.close()
            except (OSError, http.client.HTTPException):
                pass  # a broken connection may fail to close: it is being dropped anyway
            self.body = None

    def close(self) -> None:
        self._close_body()
        super().close()


def _cause(e: Exception) -> str:
    text = redact(str(e)) or "no detail"
    return text if isinstance(e, (ShortBody,)) or text.startswith("HTTP ") else f"{type(e).__name__}: {text}"


# ---------------------------------------------------------------- what the loaders hold

class ShardReads:
    """How a loader opens shards: the retry policy for remote ones, an optional local cache of them
    (data/shard_cache.py), and the count of retries, in shared memory so that it sums over the loader's worker
    processes and is readable in the main one."""

    def __init__(self, policy: RetryPolicy = RetryPolicy(), cache=None):
        self.policy, self.cache = policy, cache  # cache: a data.shard_cache.ShardCache, or None
        self._retries = context().Value("q", 0)

    @property
    def retries(self) -> int:
        return self._retries.value

    def count_retry(self) -> None:
        with self._retries.get_lock():
            self._retries.value += 1

    @contextmanager
    def open(self, url: str):
        """A binary stream of the shard or file at ``url``: remote ones and pipe: commands resumable, local
        files through gopen."""
        if is_retried(url) and self.cache is not None:
            stream = self.cache.open(url, lambda: ResumableStream(url, self))
        elif is_retried(url):
            stream = ResumableStream(url, self)
        else:
            import webdataset as wds

            stream = wds.gopen(url, "rb")
        try:
            yield stream
        finally:
            stream.close()

    def read_text(self, url: str) -> str:
        """A small file (a manifest), whole; remote ones retried, never cached."""
        if not is_retried(url):
            with self.open(url) as f:
                return f.read().decode("utf-8")
        with ResumableStream(url, self) as f:
            return f.read().decode("utf-8")
