"""Data loader throughput over loopback HTTP against the local folder: the same shards, side by side in one run.

    python -m bench.bench_remote                       # 2,000 generated photos, 2 workers
    python -m bench.bench_remote --images 4000 --workers 8

The shards (bench_loader's generated photos, ~110 KB JPEGs like ImageNet's) are served by the standard
library's HTTP server on 127.0.0.1 in a thread of this process; the loaders read them through data/remote.py
exactly as ``--data-dir http://...`` does. Rounds alternate between the two sources (so load from other
processes hits both alike); medians over the rounds after a warm-up pass. Two figures per source: the
training loader's images/s (RandomResizedCrop 224 + flip, uint8 batches: what the trainer waits on), and
the raw shard bytes read per second by one reader without decoding (what the transport alone costs).
Loopback has no network latency or bandwidth limit: this measures our client's overhead, not a store's.

Not a test: it prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from bench.bench_loader import _cpu_name, loader_rate, make_photos
from data import build_train_loader
from data.remote import ShardReads
from data.shard_reader import read_shard
from data.shards import WriterConfig, write_dataset
from data.sources import resolve_shards


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # a reader done with its samples closes the connection mid-body: expected, not news


def serve(folder: Path) -> tuple[ThreadingHTTPServer, str]:
    server = _Server(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def bytes_rate(urls) -> float:
    """MB/s of one reader going through every shard, samples split out of the tar but not decoded."""
    wall, n = time.perf_counter(), 0
    for url in urls:
        n += sum(len(s["jpg"]) for s in read_shard(url, ShardReads()))
    return n / (time.perf_counter() - wall) / 1e6


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_photos(work / "photos", args.images)
        write_dataset(work / "shards", train_dir=work / "photos",
                      cfg=WriterConfig(shard_size=max(1, args.images // (4 * args.workers)), workers=args.workers))
        server, url = serve(work / "shards")
        sources = {"local folder": str(work / "shards"), "loopback HTTP": url}
        loaders = {name: build_train_loader(src, batch_size=args.batch_size, num_workers=args.workers,
                                            image_size=224) for name, src in sources.items()}
        urls = {name: resolve_shards(src, "train").urls for name, src in sources.items()}
        for loader in loaders.values():
            loader_rate(loader)  # warm-up: starts the persistent workers, fills the page cache
        rates = {name: [] for name in sources}
        raw = {name: [] for name in sources}
        for _ in range(args.rounds):
            for name in sources:
                rates[name].append(loader_rate(loaders[name])[0])
                raw[name].append(bytes_rate(urls[name]))
        server.shutdown()
    print(f"{args.images} images, {args.workers} workers, batch {args.batch_size}, median of {args.rounds} "
          f"rounds; {_cpu_name()}\n")
    print("| source | loader images/s | raw shard read, MB/s (one reader, no decode) |\n|---|---:|---:|")
    for name in sources:
        print(f"| {name} | {statistics.median(rates[name]):.0f} | {statistics.median(raw[name]):.0f} |")


if __name__ == "__main__":
    main()
