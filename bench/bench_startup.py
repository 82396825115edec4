"""Start-up and resume on several processes: wall time, and the file-system operations each process makes on
the shards and the checkpoints, counted with strace.

    python -m bench.bench_startup                          # 1, 2 and 4 CPU processes, this checkout
    python -m bench.bench_startup --repo /tmp/before       # and another checkout of the trainer, side by side

Each case trains one step from scratch (start-up: the manifest, the shards, the loaders) and then resumes from
that run's checkpoint (resume: verifying and loading it), on generated shards of many small files so that
per-shard costs show. Per process it counts the system calls naming a path under the shard folder or the
checkpoint folder (open, stat and the like) and the bytes read from the checkpoint's files; the figure that
grows with the number of ranks on a shared file system is their sum. Needs strace (`apt-get install strace`).
Not a test: it prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from PIL import Image

from data.shards import WriterConfig, write_dataset

PATH_CALL = re.compile(r'^(\w+)\(.*?"([^"]+)"')  # a file system call and the first path it names
READ_CALL = re.compile(r'^(?:read|pread64)\(\d+<([^>]+)>.*= (\d+)$')  # strace -y: the fd's path in <>


def make_shards(root: Path, train_shards: int, val_shards: int) -> Path:
    """Tiny images, 4 per shard, in two classes."""
    for split, shards in (("train", train_shards), ("val", val_shards)):
        for i in range(shards * 4):
            path = root / split / f"c{i % 2}" / f"{i:05d}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 40), (i % 256, 40 * (i % 2), 90)).save(path, quality=90)
    out = root / "shards"
    write_dataset(out, root / "train", root / "val", cfg=WriterConfig(shard_size=4, workers=1))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(repo: Path, procs: int, shards: Path, out: Path, resume: bool) -> list[str]:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    launch += ["--multi_gpu", "--num_processes", str(procs)] if procs > 1 else ["--cpu", "--num_processes", "1"]
    args = ["--data-dir", str(shards), "--arch", "resnet20", "--image-size", "32", "--batch-size", "2",
            "--workers", "0", "--epochs", "1", "--no-progress", "--output-dir", str(out),
            "--max-steps", "2" if resume else "1"]
    return [*launch, str(repo / "train_imagenet.py"), *args, *(["--resume", "auto"] if resume else [])]


def traced(cmd: list[str], repo: Path, trace: Path) -> float:
    """Run ``cmd`` under strace (one file per process); its wall time."""
    shutil.rmtree(trace, ignore_errors=True)
    trace.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(["strace", "-f", "-ff", "-y", "-s", "300", "-e", "trace=file,read,pread64",
                           "-o", str(trace / "t"), *cmd], cwd=repo, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return seconds


def counts(trace: Path, shards: Path, ckpts: Path) -> list[tuple[int, int, int]]:
    """Per traced process that touched them: (calls naming a shard-folder path, calls naming a checkpoint
    path, bytes read from checkpoint files)."""
    rows = []
    for f in sorted(trace.iterdir()):
        data_ops, ckpt_ops, ckpt_bytes = 0, 0, 0
        for line in f.read_text(errors="replace").splitlines():
            m = PATH_CALL.match(line)
            if m and m.group(2).startswith(str(shards)):
                data_ops += 1
            elif m and m.group(2).startswith(str(ckpts)):
                ckpt_ops += 1
            r = READ_CALL.match(line)
            if r and r.group(1).startswith(str(ckpts)):
                ckpt_bytes += int(r.group(2))
        if data_ops or ckpt_ops or ckpt_bytes:
            rows.append((data_ops, ckpt_ops, ckpt_bytes))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, action="append", default=[], help="another checkout to measure too")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--train-shards", type=int, default=256)
    p.add_argument("--val-shards", type=int, default=50)
    p.add_argument("--work", type=Path)
    args = p.parse_args()
    here = Path(__file__).resolve().parents[1]
    repos = [here, *[r.resolve() for r in args.repo]]
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_startup_"))
    shards = work / "shards"
    if not (shards / "_info.json").exists():
        shards = make_shards(work, args.train_shards, args.val_shards)
    print(f"{args.train_shards} training and {args.val_shards} validation shards of 4 images; ResNet-20, one step; "
          f"{os.cpu_count()} cores; strace on every process (it slows each system call)\n")
    print("| checkout | processes | phase | wall s | shard-path calls, sum (max per process) | checkpoint-path "
          "calls, sum (max) | checkpoint MiB read, sum (max) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for procs in args.procs:
        for repo in repos:
            out = work / f"run-{repo.name}-{procs}"
            shutil.rmtree(out, ignore_errors=True)
            for phase, resume in (("start-up", False), ("resume", True)):
                seconds = traced(command(repo, procs, shards, out, resume), repo, work / "trace")
                rows = counts(work / "trace", shards, out / "checkpoints")
                per = defaultdict(list)
                for d, c, b in rows:
                    per["d"].append(d), per["c"].append(c), per["b"].append(b / 2**20)
                cell = {k: f"{sum(v):.0f} ({max(v):.0f})" if v else "0" for k, v in per.items()}
                print(f"| {repo.name} | {procs} | {phase} | {seconds:.1f} | {cell.get('d', '0')} | "
                      f"{cell.get('c', '0')} | {cell.get('b', '0')} |", flush=True)


if __name__ == "__main__":
    main()
