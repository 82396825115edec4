"""Training throughput (images/s): train_imagenet.py against timm's training loop, same model and settings.

    python bench/bench_train.py                        # CPU: a smoke test of the harness (resnet18, 64 px), ~2 min
    python3 bench/bench_train.py --out $OUT/bench_train.md   # one GPU: the matrix below, within --budget-s
    python3 bench/bench_train.py --compile on --channels-last on --real-loader none   # a slice of it

On the lent GPU machine webdataset must travel as a wheel: docs/benchmarks.md, "Training throughput".

Cases (GPU defaults): --archs resnet50,resnet18 x --precisions bf16,fp16 x --channels-last on,off x
--compile off,on, in the order of cases() (eager and channels_last first). For each case, in
--rounds interleaved rounds (ours, timm, [ours on the real loader], ours, timm, ...) so drift hits both:

  ours:  `python train_imagenet.py --synthetic ...` in a subprocess (random uint8 batches on the device);
  timm:  a minimal copy of timm's train.py inner loop (timm_loop below), in a subprocess too, so each
         run starts clean (no allocator, cudnn or compile cache state shared in-process);
  real:  ours with --data-dir on shards written by `python -m data.make_shards` from generated
         ImageNet-size JPEGs (bench_loader.make_photos), to give the ratio real/synthetic; with
         --decode device also a run decoding on the device (real-dev), and its ratio to synthetic.

Each run logs every --log-every steps; the first --warmup-intervals intervals (compile, cudnn autotuning,
loader start) are dropped and the median of the rest is the run's img/s; ours is read from the wall times
of its TensorBoard events, which follow a device sync (see _event_rates), with the images_per_s that
it logs itself beside it. The ratios are taken per round. Cases that would not finish
inside --budget-s are skipped and named (a device command is killed at 600 s). The table is printed
and rewritten to --out after every case, so a killed run still leaves the finished rows.

Not a test: it writes a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

COMPILE_GUESS = 4.0  # a first compiled case is budgeted at 4x the slowest uncompiled one (two cold compiles)


# ----------------------------------------------------------------------------------------------------------
# Options


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/bench_train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", help="comma list (default: resnet50,resnet18 on cuda, resnet18 on cpu)")
    p.add_argument("--precisions", help="comma list of no,bf16,fp16 (default: bf16,fp16 on cuda, no,bf16 on cpu)")
    p.add_argument("--channels-last", choices=("on", "off", "both"), help="default: both on cuda; on, on cpu")
    p.add_argument("--compile", choices=("on", "off", "both"), help="default: both on cuda; off, on cpu")
    p.add_argument("--batch-size", type=int, help="default: 256 on cuda, 8 on cpu")
    p.add_argument("--image-size", type=int, help="default: 224 on cuda, 64 on cpu")
    p.add_argument("--steps", type=int, help="training steps per run (default: 70 on cuda, 12 on cpu)")
    p.add_argument("--log-every", type=int, help="steps per measured interval (default: 10 on cuda, 3 on cpu)")
    p.add_argument("--warmup-intervals", type=int, help="intervals dropped per run (default: 2 on cuda, 1 on cpu)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of each side per case")
    p.add_argument("--real-loader", choices=("none", "first", "all"), default="first",
                   help="cases also run on real shards: none, the first case of each arch, or all")
    p.add_argument("--decode", choices=("cpu", "device", "both"), default="both",
                   help="where the real-loader runs decode JPEGs (the trainer's --decode)")
    p.add_argument("--workers", type=int, default=max(1, len(os.sched_getaffinity(0)) - 1),
                   help="loader workers for the real-loader runs (default: CPU count - 1)")
    p.add_argument("--budget-s", type=float, default=540.0, help="start no case that would end after this")
    p.add_argument("--out", help="also write the Markdown table here (e.g. $OUT/bench_train.md)")
    p.add_argument("--work", help="folder for shards and run outputs (default: a new temporary folder)")
    p.add_argument("--timm-loop", help=argparse.SUPPRESS)  # internal: run timm_loop on this JSON case
    return p.parse_args(argv)


def fill_defaults(args: argparse.Namespace, cuda: bool) -> argparse.Namespace:
    """GPU defaults are the standing order's matrix; CPU ones a smoke test of the harness in minutes."""
    gpu = dict(archs="resnet50,resnet18", precisions="bf16,fp16", channels_last="both", compile="both",
               batch_size=256, image_size=224, steps=70, log_every=10, warmup_intervals=2)
    cpu = dict(archs="resnet18", precisions="no,bf16", channels_last="on", compile="off",
               batch_size=8, image_size=64, steps=12, log_every=3, warmup_intervals=1)
    for key, value in (gpu if cuda else cpu).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.steps // args.log_every <= args.warmup_intervals:
        sys.exit("error: --steps / --log-every must leave at least one interval after --warmup-intervals")
    return args


@dataclass(frozen=True)
class Case:
    arch: str
    precision: str
    channels_last: bool
    compile: bool

    def label(self) -> str:
        return (f"{self.arch} {self.precision} {'channels_last' if self.channels_last else 'NCHW'} "
                f"{'compile' if self.compile else 'eager'}")


def cases(args) -> list[Case]:
    """Most telling first, so the budget cuts the rest: eager before compiled (cheap, and the basis of the
    comparison), channels_last before NCHW, then the given order of archs and precisions."""
    onoff = {"on": [True], "off": [False], "both": [True, False]}
    compiles = sorted(onoff[args.compile])  # False before True
    grid = itertools.product(compiles, onoff[args.channels_last], args.archs.split(","),
                             args.precisions.split(","))
    return [Case(arch, prec, cl, comp) for comp, cl, arch, prec in grid]


# ----------------------------------------------------------------------------------------------------------
# timm's loop


def timm_loop(case: dict) -> dict:
    """A faithful minimal copy of the inner loop of timm's train.py (train_one_epoch), which the pip wheel
    does not ship. Kept: timm.create_model(arch); SGD with momentum 0.9 and weight decay (timm's optimizer
    factory, so no decay on norms and biases, like ours); channels_last model and input; torch.compile after
    the model is built (timm's --torchcompile); uint8 batch on the device, normalised there as timm's
    PrefetchLoader does; torch.autocast(dtype), with timm.utils.NativeScaler for fp16 only (no scaler for
    bf16); backward via the scaler; zero_grad(set_to_none=True); no .item() per step. Left out, as they
    cost nothing measurable: the LR scheduler, loss meters, EMA, checkpoints. Timed like ours: the clock
    is read after a device sync at each interval boundary."""
    import torch
    import timm
    from timm.optim import create_optimizer_v2
    from timm.utils import NativeScaler

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = True  # as timm's train.py and ours do
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    fmt = torch.channels_last if case["channels_last"] else torch.contiguous_format
    model = timm.create_model(case["arch"], num_classes=1000).to(dev, memory_format=fmt).train()
    opt = create_optimizer_v2(model, "momentum", lr=0.1 * case["batch_size"] / 256, weight_decay=1e-4,
                              momentum=0.9)
    scaler = _native_scaler(NativeScaler, dev) if case["precision"] == "fp16" else None
    if case["compile"]:
        model = torch.compile(model, backend="inductor")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(case["precision"])
    return {"rates": _timed_steps(case, model, opt, scaler, dtype, dev, fmt)}


def _native_scaler(cls, dev):
    try:
        return cls(device=dev.type)
    except TypeError:  # timm before ~1.0.10: CUDA only, no device argument
        return cls()


def _timed_steps(case: dict, model, opt, scaler, dtype, dev, fmt) -> list[float]:
    import torch

    b, s = case["batch_size"], case["image_size"]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=g).to(dev)
    labels = torch.randint(0, 1000, (b,), generator=g).to(dev)
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1) * 255
    loss_fn, rates = torch.nn.CrossEntropyLoss(), []
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for step in range(1, case["steps"] + 1):
        x = images.float().sub_(mean).div_(std).contiguous(memory_format=fmt)  # PrefetchLoader + train.py
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_fn(model(x), labels)
        if scaler is not None:
            scaler(loss, opt)  # scale, backward, step, update
        else:
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        if step % case["log_every"] == 0:
            sync()
            t1 = time.perf_counter()
            rates.append(b * case["log_every"] / (t1 - t0))
            t0 = t1
    return rates


# ----------------------------------------------------------------------------------------------------------
# Runs


@dataclass
class Run:
    rate: float | None = None  # median img/s after warm-up, sync to sync
    logged: float | None = None  # ours: median of images_per_s as metrics.jsonl has it
    error: str = ""


def ours_command(args, case: Case, out: Path, data_dir: Path | None, decode: str = "cpu") -> list[str]:
    cmd = [sys.executable, str(ROOT / "train_imagenet.py"), "--arch", case.arch, "--batch-size",
           str(args.batch_size), "--image-size", str(args.image_size), "--precision", case.precision,
           "--epochs", "1", "--log-every", str(args.log_every), "--no-progress", "--output-dir", str(out),
           "--keep-checkpoints", "1", "--max-steps", str(args.steps)]
    cmd += [] if case.channels_last else ["--no-channels-last"]
    cmd += ["--compile"] if case.compile else []
    if data_dir is None:
        return cmd + ["--synthetic", "--synthetic-steps", str(args.steps)]
    return cmd + ["--data-dir", str(data_dir), "--workers", str(args.workers), "--decode", decode]


def run_ours(args, case: Case, out: Path, timeout: float, data_dir: Path | None = None, decode: str = "cpu") -> Run:
    try:
        error = _subprocess(ours_command(args, case, out, data_dir, decode), timeout)
        if error:
            return Run(error=error)
        return Run(rate=_median_after_warmup(_event_rates(out, args.batch_size), args.warmup_intervals - 1),
                   logged=_median_after_warmup(_jsonl_rates(out), args.warmup_intervals))
    except (OSError, ValueError, statistics.StatisticsError) as e:
        return Run(error=f"no rates in {out}: {e}")
    finally:
        shutil.rmtree(out, ignore_errors=True)  # checkpoints: up to 200 MB a run


def _event_rates(out: Path, batch: int) -> list[float]:
    """img/s per logging interval from the TensorBoard events' wall times. The trainer writes them just after
    the loss .item() of the interval, so they mark device-synchronised boundaries; the images_per_s it logs
    reads the clock before that sync, and in bf16 (no scaler sync per step) leaves out the GPU's queued
    work. Consecutive events give interval 2 onwards: the first has no start mark."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    marks = []
    for path in sorted((out / "tensorboard").glob("events.out.tfevents.*")):
        for e in EventFileLoader(str(path)).Load():
            if e.HasField("summary") and any(v.tag == "train/images_per_s" for v in e.summary.value):
                marks.append((e.step, e.wall_time))
    marks.sort()
    return [(s1 - s0) * batch / (t1 - t0) for (s0, t0), (s1, t1) in zip(marks, marks[1:])]


def _jsonl_rates(out: Path) -> list[float]:
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln]
    return [ln["images_per_s"] for ln in lines if ln["kind"] == "train"]


def _median_after_warmup(rates: list[float], drop: int) -> float:
    return statistics.median(rates[max(0, drop):])


def run_timm(args, case: Case, timeout: float) -> Run:
    spec = dict(vars(case), batch_size=args.batch_size, image_size=args.image_size, steps=args.steps,
                log_every=args.log_every)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--timm-loop", json.dumps(spec)]
    out_file = Path(args.work) / "timm.json"
    out_file.unlink(missing_ok=True)  # never read the previous run's figures
    error = _subprocess(cmd + ["--out", str(out_file)], timeout)
    if error:
        return Run(error=error)
    rates = json.loads(out_file.read_text())["rates"]
    return Run(rate=_median_after_warmup(rates, args.warmup_intervals))


def _subprocess(cmd: list[str], timeout: float) -> str:
    """Run ``cmd`` from the repository root; '' on success, else one line saying why not."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if not _cuda():
        # One thread: on a small CPU machine shared with other jobs, every parallel region waits for a
        # descheduled thread (2 threads on 2 busy cores gave 7-80 img/s per interval; 1 thread 46-55).
        env.setdefault("OMP_NUM_THREADS", "1")
    # A session of its own, so that on timeout its loader and compile workers go with it.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return f"killed after {max(1.0, timeout):.0f} s (budget)"
    if proc.returncode != 0:
        tail = (stderr or stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"  failed: {' '.join(cmd)}\n{stderr[-3000:]}", flush=True)
        return f"exit {proc.returncode}: {tail[0][:200]}"
    return ""


# ----------------------------------------------------------------------------------------------------------
# Real shards


def make_real_shards(args, work: Path) -> Path:
    """Shards of generated ImageNet-size JPEGs, enough that one epoch holds every step of a run: a few hundred
    distinct photos, hard-linked to as many names as needed (decoding cost depends on the content, not
    on the file), written by our writer as a user would."""
    from bench.bench_loader import make_photos

    images = args.steps * args.batch_size + args.batch_size
    unique, train, val = work / "unique", work / "train", work / "val"
    make_photos(unique, min(images, 256))
    photos = sorted(unique.rglob("*.JPEG"))
    for i in range(images):
        for root, n in ((train, images), (val, args.batch_size)):
            if i < n:
                dst = root / f"c{i % 10:02d}" / f"img_{i:06d}.JPEG"
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.link(photos[i % len(photos)], dst)
    shard_size = max(1, images // (4 * args.workers))  # several shards per worker, as make_shards advises
    cmd = [sys.executable, "-m", "data.make_shards", "--train-dir", str(train), "--val-dir", str(val),
           "--out", str(work / "shards"), "--shard-size", str(shard_size), "--overwrite"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: make_shards failed:\n{proc.stderr[-3000:]}")
    return work / "shards"


# ----------------------------------------------------------------------------------------------------------
# The matrix


@dataclass
class Result:
    case: Case
    ours: list[Run] = field(default_factory=list)
    timm: list[Run] = field(default_factory=list)
    real: list[Run] = field(default_factory=list)  # --decode cpu
    real_dev: list[Run] = field(default_factory=list)  # --decode device
    seconds: float = 0.0


def run_case(args, case: Case, data_dir: Path | None, deadline: float) -> Result:
    """Rounds of ours, timm[, ours on real shards], in that order, so drift hits every side alike."""
    res, start = Result(case), time.monotonic()
    for rnd in range(args.rounds):
        sides = [("ours", res.ours), ("timm", res.timm)]
        sides += [("real", res.real)] if data_dir and args.decode in ("cpu", "both") else []
        sides += [("real-dev", res.real_dev)] if data_dir and args.decode in ("device", "both") else []
        for side, runs in sides:
            left = deadline - time.monotonic()
            out = Path(args.work) / f"run-{side}-{rnd}"
            run = (run_timm(args, case, left) if side == "timm" else
                   run_ours(args, case, out, left, data_dir if side.startswith("real") else None,
                            "device" if side == "real-dev" else "cpu"))
            runs.append(run)
            print(f"  round {rnd + 1} {side:<4} " + (f"{run.rate:9.1f} img/s" if run.rate else run.error),
                  flush=True)
            if run.error.startswith("killed"):
                res.seconds = time.monotonic() - start
                return res
    res.seconds = time.monotonic() - start
    return res


def estimate(done: list[Result], case: Case, real: bool) -> float:
    """Seconds the case should take: the longest finished case like it; 0 (just run it) with no history."""
    def longest(like) -> float:
        return max((r.seconds for r in done if like(r)), default=0.0)

    same = longest(lambda r: r.case.compile == case.compile and bool(r.real or r.real_dev) == real)
    same = same or longest(lambda r: r.case.compile == case.compile)
    eager = longest(lambda r: not r.case.compile and bool(r.real or r.real_dev) == real)
    return same or (COMPILE_GUESS * eager if case.compile else 0.0)


def run_matrix(args, header: list[str], data_dir: Path | None, started: float):
    results, skipped = [], []
    deadline = started + args.budget_s
    firsts = {}  # the first case of each arch gets the real-loader runs under --real-loader first
    for case in cases(args):
        first = firsts.setdefault(case.arch, case) == case
        real = args.real_loader == "all" or (args.real_loader == "first" and first)
        if time.monotonic() + estimate(results, case, real) > deadline:
            skipped.append(case)
            print(f"skipped (budget): {case.label()}", flush=True)
            continue
        print(f"{case.label()}{' + real loader' if real else ''}", flush=True)
        results.append(run_case(args, case, data_dir if real else None, deadline))
        write_table(args, header, results, skipped, started)
    return results, skipped


# ----------------------------------------------------------------------------------------------------------
# Report


def _median(runs: list[Run], attr: str = "rate") -> float | None:
    values = [getattr(r, attr) for r in runs if getattr(r, attr)]
    return statistics.median(values) if values else None


def _ratio(num: list[Run], den: list[Run]) -> str:
    """Per-round ratio: median (min-max) over the rounds where both sides produced a figure."""
    ratios = sorted(a.rate / b.rate for a, b in zip(num, den) if a.rate and b.rate)
    if not ratios:
        return "-"
    return f"{statistics.median(ratios):.3f} ({ratios[0]:.3f}–{ratios[-1]:.3f})"


def _fmt(value: float | None, runs: list[Run]) -> str:
    if value is not None:
        return f"{value:.0f}"
    errors = [r.error for r in runs if r.error]
    return f"failed: {errors[0]}" if errors else "-"


def table_rows(results: list[Result]) -> list[str]:
    rows = ["| case | ours img/s | timm img/s | ours/timm, median (min–max) | ours as logged | "
            "real loader img/s | real/synthetic, median (min–max) | real, --decode device, img/s | "
            "real device/synthetic |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rows.append(f"| {r.case.label()} | {_fmt(_median(r.ours), r.ours)} | {_fmt(_median(r.timm), r.timm)} | "
                    f"{_ratio(r.ours, r.timm)} | {_fmt(_median(r.ours, 'logged'), r.ours)} | "
                    f"{_fmt(_median(r.real), r.real)} | {_ratio(r.real, r.ours)} | "
                    f"{_fmt(_median(r.real_dev), r.real_dev)} | {_ratio(r.real_dev, r.ours)} |")
    return rows


def target_lines(results: list[Result]) -> list[str]:
    """The standing order's targets, for ResNet-50 with AMP and channels_last (GPU runs only)."""
    lines = []
    for r in results:
        ours, theirs = _median(r.ours), _median(r.timm)
        if r.case.arch != "resnet50" or not r.case.channels_last or r.case.precision == "no" or not ours:
            continue
        ok = lambda c: "✔" if c else "✘"  # noqa: E731
        text = f"- {r.case.label()}: {ours:.0f} img/s (≥ 3000 {ok(ours >= 3000)})"
        text += f", ours/timm {ours / theirs:.3f} (≥ 1 {ok(ours >= theirs)})" if theirs else ""
        for name, runs in (("real/synthetic", r.real), ("real (--decode device)/synthetic", r.real_dev)):
            real = _median(runs)
            text += f", {name} {real / ours:.3f} (≥ 0.9 {ok(real >= 0.9 * ours)})" if real else ""
        lines.append(text)
    return lines


def write_table(args, header: list[str], results: list[Result], skipped: list[Case], started: float) -> str:
    lines = [f"- {h}" for h in header] + [""] + table_rows(results)  # a list, so Markdown keeps the lines
    if args.device == "cuda" and results:
        lines += ["", "Targets (median img/s of the rounds):"] + target_lines(results)
    if skipped:
        lines += ["", "Skipped to stay inside --budget-s: " + "; ".join(c.label() for c in skipped)]
    lines += ["", f"Elapsed: {time.monotonic() - started:.0f} s of a {args.budget_s:.0f} s budget."]
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    return text


def device_header(args, command: str) -> list[str]:
    """Device, versions and the exact command; the GPU name comes from a child process so that this one
    never opens a CUDA context (memory the measured runs would not have)."""
    probe = ("import platform, torch, timm; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() "
             "else 'CPU'); print(torch.__version__, timm.__version__, platform.python_version())")
    name, versions = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                    check=True).stdout.split("\n")[:2]
    from bench.bench_loader import _cpu_name

    torch_v, timm_v, py = versions.split()
    return [f"device: {name} ({args.device}); CPU: {_cpu_name()}, {len(os.sched_getaffinity(0))} cores, "
            f"load average {os.getloadavg()[0]:.1f}; torch {torch_v}, timm {timm_v}, Python {py}",
            f"command: `{command}`",
            f"settings: batch {args.batch_size}, image {args.image_size}, {args.steps} steps per run, "
            f"img/s per {args.log_every}-step interval, first {args.warmup_intervals} dropped, median of the "
            f"rest; {args.rounds} interleaved rounds; real loader: {args.workers} workers on shards of "
            f"generated 500x375 JPEGs (bench_loader.make_photos)"
            + ("; OMP_NUM_THREADS=1 per process (a shared CPU machine)" if args.device == "cpu" else "")]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()  # no CUDA context: NVML answers this


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.timm_loop:  # child process: one timm run
        Path(args.out).write_text(json.dumps(timm_loop(json.loads(args.timm_loop))))
        return
    args.device = "cuda" if _cuda() else "cpu"
    fill_defaults(args, args.device == "cuda")
    started = time.monotonic()
    own_work = args.work is None  # a temporary folder of ours: removed at the end (shards: ~2 GB on a GPU)
    args.work = str(Path(args.work or tempfile.mkdtemp(prefix="bench_train_")).resolve())
    Path(args.work).mkdir(parents=True, exist_ok=True)
    header = device_header(args, f"{Path(sys.executable).name} bench/bench_train.py " + " ".join(sys.argv[1:]))
    print("\n".join(header), flush=True)
    data_dir = make_real_shards(args, Path(args.work)) if args.real_loader != "none" else None
    if data_dir:
        print(f"shards ready after {time.monotonic() - started:.0f} s", flush=True)
    results, skipped = run_matrix(args, header, data_dir, started)
    print("\n" + write_table(args, header, results, skipped, started), flush=True)
    if own_work:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
