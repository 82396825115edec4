"""Forward+backward time of our ResNets against torchvision's, with the same weights and input.

    python bench/bench_model.py                      # CPU: resnet18 and resnet50, batch 8, a few minutes on 2 cores
    python bench/bench_model.py --threads 1 --clock cpu --reps 16   # on a CPU machine shared with other jobs
    python bench/bench_model.py --device cuda --batch-size 64 --reps 30

Each repetition times one training step (forward, loss, backward) of ours, then of
torchvision's, in alternating order (AB, BA, ...) so that drift in the machine's speed
(thermal, other jobs) hits both alike. Prints per arch and memory format the median
time of each, the median, quartiles and min/max of the per-repetition ratio ours/torchvision,
and the ratio of the two fastest steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from resnet import build_model  # noqa: E402
from resnet.model import IMAGENET_ARCHS  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"], choices=IMAGENET_ARCHS,
                   metavar="ARCH", help="torchvision names (the CIFAR networks have no torchvision twin)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--reps", type=int, default=10, help="timed steps of each model, per arch and format")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's); 1 is steadier on a machine shared with other jobs")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: CPU time of this process, which neighbours on a shared machine barely change "
                        "(CPU device only; use with --threads 1, as waiting threads spin)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each model first")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clock=time.perf_counter) -> float:
    """Seconds for one forward + cross-entropy + backward."""
    model.zero_grad(set_to_none=True)
    sync(x.device)
    start = clock()
    nn.functional.cross_entropy(model(x), y).backward()
    sync(x.device)
    return clock() - start


def compare(arch: str, memory_format: torch.memory_format, args: argparse.Namespace) -> dict:
    """Time ours and torchvision's ``arch`` alternately; returns both lists of times."""
    device = torch.device(args.device)
    theirs = getattr(torchvision.models, arch)(weights=None)
    ours = build_model(arch)
    ours.load_state_dict(theirs.state_dict(), strict=True)  # same weights, so the same work
    models = {name: m.to(device, memory_format=memory_format).train() for name, m in (("ours", ours), ("tv", theirs))}
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen)
    x = x.to(device, memory_format=memory_format)
    y = torch.randint(0, 1000, (args.batch_size,), generator=gen).to(device)

    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for _ in range(args.warmup):
        for m in models.values():
            step_time(m, x, y)
    times = {"ours": [], "tv": []}
    for rep in range(args.reps):
        order = ("ours", "tv") if rep % 2 == 0 else ("tv", "ours")
        for name in order:
            times[name].append(step_time(models[name], x, y, clock))
    return times


def summary(arch: str, fmt: str, times: dict) -> str:
    """One row: median times, then the paired ratio ours/tv (median [quartiles] [min, max]) and
    the ratio of the fastest steps, which other jobs on the machine can only slow down."""
    ratios = sorted(a / b for a, b in zip(times["ours"], times["tv"]))
    q1, med, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return (f"{arch:<10} {fmt:<14} {statistics.median(times['ours']) * 1e3:8.1f} "
            f"{statistics.median(times['tv']) * 1e3:8.1f}   {med:.3f} [{q1:.3f}, {q3:.3f}] "
            f"[{ratios[0]:.3f}, {ratios[-1]:.3f}]   {min(times['ours']) / min(times['tv']):.3f}")


def main() -> None:
    args = parse_args()
    if args.clock == "cpu" and args.device != "cpu":
        raise SystemExit("--clock cpu measures CPU work; time a GPU with the wall clock")
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.image_size
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, device {args.device}, "
          f"threads {torch.get_num_threads()}, {args.clock} clock, batch {args.batch_size}x3x{size}x{size}, "
          f"{args.reps} reps")
    print(f"{'arch':<10} {'format':<14} {'ours ms':>8} {'tv ms':>8}   ratio [IQR]            [min, max]         "
          "min/min")
    formats = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
    for arch in args.archs:
        for fmt, memory_format in formats.items():
            print(summary(arch, fmt, compare(arch, memory_format, args)), flush=True)


if __name__ == "__main__":
    main()
