"""What progressive resizing saves: training cost per image at each size of a recipe's schedule.

    python bench/bench_resolution.py            # FFCV's ResNet-18 and ResNet-50 16-epoch recipes, CPU, ~6 min
    python bench/bench_resolution.py --recipes launch/configs/resnet50_88ep.yaml --device cuda --batch-size 256

For each recipe: its network as the recipe builds it (BlurPool, memory format) and every size its schedule
trains at; per size, training steps (forward, label-smoothed loss,
backward, SGD step) on random batches, the sizes taking turns in rounds so drift hits all alike. On the CPU
each step is timed by the process's CPU time with one thread (on a shared machine the wall clock of parallel
regions measures the neighbours: docs/benchmarks.md, "Model step"); on CUDA by wall time after a synchronize,
in the recipe's precision.

Prints per size the images per CPU-second (per second on CUDA) and the cost relative to the largest size,
then the schedule's epoch-weighted cost of the model's steps against every epoch at its largest size.
The loader's cost per image hardly depends on the output size (JPEG decoding dominates it), so on a
machine whose loader keeps up this is the saving in time per epoch. Not a test: figures for
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from engine.batches import ResolutionSchedule  # noqa: E402
from engine.config import parse_config  # noqa: E402
from engine.recipe import build_network  # noqa: E402

DEFAULT_RECIPES = ["launch/configs/resnet18_16ep.yaml", "launch/configs/resnet50_16ep.yaml"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/bench_resolution.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", nargs="+", default=DEFAULT_RECIPES, metavar="YAML")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=6, help="timed steps per size (one per round)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per size first")
    return p.parse_args(argv)


class StepTimer:
    """One training step of ``model`` at a given size; returns its seconds (CPU time, or CUDA wall time)."""

    def __init__(self, model, device: torch.device, batch_size: int, dtype, label_smoothing: float,
                 channels_last: bool):
        self.model, self.device, self.batch_size, self.dtype = model.train(), device, batch_size, dtype
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        self.loss = torch.nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, size: int) -> float:
        x = torch.randn(self.batch_size, 3, size, size, device=self.device).to(memory_format=self.memory_format)
        y = torch.randint(0, 1000, (self.batch_size,), device=self.device)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter() if cuda else time.process_time()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = self.loss(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return (time.perf_counter() if cuda else time.process_time()) - start


def measure(recipe: str, args: argparse.Namespace) -> None:
    cfg = parse_config(["--config", recipe, "--synthetic"])
    schedule = ResolutionSchedule(cfg.resolution, cfg.data.image_size, cfg.schedule.epochs)
    epochs_at = Counter(schedule.at(e) for e in range(cfg.schedule.epochs))
    sizes = sorted(epochs_at)
    device = torch.device(args.device)
    model = build_network(cfg.model, num_classes=1000, world_size=1).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.runtime.precision) if device.type == "cuda" \
        else None
    step = StepTimer(model, device, args.batch_size, dtype, cfg.optim.label_smoothing, cfg.model.channels_last)
    for size in sizes:
        for _ in range(args.warmup):
            step(size)
    times = {s: [] for s in sizes}
    for _ in range(args.rounds):
        for size in sizes:
            times[size].append(step(size))
    per_image = {s: statistics.median(t) / args.batch_size for s, t in times.items()}
    report(recipe, cfg, epochs_at, per_image, args)


def report(recipe: str, cfg, epochs_at: Counter, per_image: dict, args) -> None:
    unit = "img/CPU-s" if args.device == "cpu" else "img/s"
    largest = max(epochs_at)
    print(f"\n{Path(recipe).name}: {cfg.model.arch}{' + BlurPool' if cfg.model.blurpool else ''}, "
          f"{'channels_last' if cfg.model.channels_last else 'NCHW'}, batch {args.batch_size}, "
          f"median of {args.rounds} steps per size")
    print(f"| size | epochs at it | {unit} | cost per image vs {largest} px |")
    print("|---:|---:|---:|---:|")
    for size, t in sorted(per_image.items()):
        print(f"| {size} | {epochs_at[size]} | {1 / t:.1f} | {t / per_image[largest]:.3f} |")
    total = sum(n * per_image[s] for s, n in epochs_at.items())
    flat = sum(epochs_at.values()) * per_image[largest]
    print(f"schedule {dict(sorted(epochs_at.items()))}: model time {total / flat:.3f} x training every epoch "
          f"at {largest} px (saves {100 * (1 - total / flat):.1f} %)")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(1)
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}")
    for recipe in args.recipes:
        measure(recipe, args)


if __name__ == "__main__":
    main()
