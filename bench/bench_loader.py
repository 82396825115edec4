"""Data loader throughput: our shard pipeline against torchvision ImageFolder on the same JPEGs.

    python -m bench.bench_loader                        # generated photos (see make_photos), all cores
    python -m bench.bench_loader --folder /data/imagenet/train --images 2000

Measured side by side in one run, in rounds interleaved with each other (so load from other
processes hits all alike), median of the rounds after a warm-up pass; the target ratios are taken
per round, then their median and range over the rounds. Two figures per pipeline:
images/s on the wall clock, and images per CPU-second summed over the main process and its
workers ("per core"; it holds up on a shared machine where the wall clock does not):

  (a) decode only: PIL decodes each JPEG in full and converts to RGB, N processes (the usual limit)
  (b) ours: shards -> train loader (RandomResizedCrop 224 + flip, uint8 batches), N workers, decoding
      only the crop box where nvImageCodec is installed (data/region_decode.py); also without that
      (whole images, as before), with timm's PIL crop in place of ours, with the DataLoader's own
      worker -> main hand-off in place of our batch buffers, on shards re-encoded with --max-side,
      and (a) for those
  (c) torchvision ImageFolder + DataLoader, RandomResizedCrop 224, flip, ToTensor, Normalize, N workers
  (d) ours with decode_on=--device (the trainer's --decode device): the workers plan crops, the main
      process decodes each batch in one call on the device (nvJPEG on a GPU) and crops there
  (e) decode only, batched on --device: the same one-call decode of --batch-size JPEGs, nothing else

Each row also splits its CPU time per image between the main process and the workers: the point of (d)
is to move the decode off the workers, and on a GPU off the CPU. With --decode-procs 1 2 4 (a GPU) it
then runs (d) in that many processes at once, each with workers/N workers, sharing the GPU's decoder, as
training processes on one GPU would, and prints their summed images/s.

With --draft, where PIL's reduced-scale draft decode still beats a region decode (crop / output size bands).
With --stages it also prints where (b)'s CPU time goes: each stage alone, in this process
(bench/loader_stages.py).

Not a test: it prints Markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.loader_stages import draft_against_region, stage_costs  # noqa: E402
from data import build_train_loader  # noqa: E402
from data.shards import WriterConfig, write_dataset  # noqa: E402


def make_photos(root: Path, n: int, classes: int = 10) -> None:
    """ImageNet-like JPEGs: 500x375 crops of scikit-learn's two bundled photographs, randomly rescaled
    by 1-1.4x and flipped, with Gaussian noise (sigma 8, like sensor noise) and saved at quality 95,
    which gives about ImageNet's ~110 KB per file. Real photos matter: noise or flat colour decodes at
    very different speeds."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.RandomState(0)
    for i in range(n):
        img = Image.fromarray(photos[i % len(photos)])
        s = rng.uniform(1.0, 1.4)
        img = img.resize((int(img.width * s), int(img.height * s)), Image.Resampling.BICUBIC)
        x, y = rng.randint(0, img.width - 500), rng.randint(0, img.height - 375)
        pixels = np.asarray(img.crop((x, y, x + 500, y + 375)), dtype=np.float32)
        pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
        if rng.rand() < 0.5:
            pixels = pixels[:, ::-1]
        path = root / f"c{i % classes:02d}" / f"img_{i:05d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=95)


def image_files(folder: Path, limit: int) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg"))
    return files[:: max(1, len(files) // limit)][:limit]


def _cpu_seconds(pids) -> float:
    """CPU time used so far by processes ``pids``: their kernel CPU-time clocks (nanoseconds), as
    time.process_time() reads this process's; /proc's utime + stime, counted in 10 ms ticks, would
    put a few percent of noise on a 0.3 s round."""
    total = 0.0
    for pid in pids:
        try:
            total += time.clock_gettime(((~pid) << 3) | 2)  # Linux MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)
        except OSError:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def _decode_chunk(blobs: list[bytes]) -> float:
    cpu = time.process_time()
    for b in blobs:
        with Image.open(io.BytesIO(b)) as img:
            img.convert("RGB")
    return time.process_time() - cpu


def decode_only(pool, blobs: list[bytes], workers: int) -> tuple[float, float, float, float]:
    """(images/s, images per CPU-second, main-process and worker CPU ms per image) of full PIL decodes to
    RGB in ``workers`` processes: the same concurrency as the loaders, since two busy processes on SMT
    siblings each run slower than one."""
    chunks = [blobs[i::workers] for i in range(workers)]
    wall = time.perf_counter()
    cpu = sum(pool.map(_decode_chunk, chunks))
    return len(blobs) / (time.perf_counter() - wall), len(blobs) / cpu, 0.0, cpu / len(blobs) * 1e3


def decode_batched(blobs: list[bytes], device: str, batch: int) -> tuple[float, float, float, float]:
    """(e): the loader's one-call decode (data/device_decode.py) of ``batch`` JPEGs at a time on ``device``."""
    from data.device_decode import device_jpeg_decoder

    _, decode = device_jpeg_decoder(torch.device(device))
    tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(tensors), batch):
        decode(tensors[i:i + batch], torch.device(device))
    _sync(device)
    cpu = time.process_time() - cpu
    return len(blobs) / (time.perf_counter() - wall), len(blobs) / cpu, cpu / len(blobs) * 1e3, 0.0


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def loader_rate(loader, device: str = "cpu") -> tuple[float, float, float, float]:
    """(images/s, images per CPU-second over the main process and its workers, main-process and worker CPU
    ms per image) of one epoch.

    Call once before measuring: the first pass starts the (persistent) workers.
    """
    dl = getattr(loader, "_loader", loader)  # ours wraps a DataLoader
    it = getattr(dl, "_iterator", None)
    pids = [w.pid for w in it._workers] if it is not None else []
    wall, main, workers = time.perf_counter(), time.process_time(), _cpu_seconds(pids)
    n = sum(len(x) for x, _ in loader)
    _sync(device)
    main, workers = time.process_time() - main, _cpu_seconds(pids) - workers
    return n / (time.perf_counter() - wall), n / (main + workers), main / n * 1e3, workers / n * 1e3


def _decode_procs_member(rank: int, procs: int, shards: str, args, out) -> None:
    """One of --decode-procs processes: (d) as rank ``rank`` of ``procs``; puts (images, seconds)."""
    torch.set_num_threads(1)
    loader = build_train_loader(shards, batch_size=args.batch_size, num_workers=max(1, args.workers // procs),
                                rank=rank, world_size=procs, image_size=224, shuffle_buffer=256,
                                decode_on=args.device)
    loader_rate(loader, args.device)  # warm-up: workers, the decoder's state
    n, wall = 0, time.perf_counter()
    while n < args.decode_images // procs:
        n += sum(len(x) for x, _ in loader)
    _sync(args.device)
    out.put((n, time.perf_counter() - wall))


def decode_procs(shards: Path, args) -> dict[int, float]:
    """Summed images/s of (d) in N processes at once, for each N of --decode-procs: each process's own
    images over the longest process's time (they start a little apart, so this errs low)."""
    ctx = multiprocessing.get_context("spawn")
    rates = {}
    for procs in args.decode_procs:
        out = ctx.Queue()
        members = [ctx.Process(target=_decode_procs_member, args=(r, procs, str(shards), args, out))
                   for r in range(procs)]
        for m in members:
            m.start()
        done = [out.get(timeout=600) for _ in members]
        for m in members:
            m.join()
        rates[procs] = sum(n for n, _ in done) / max(t for _, t in done)
    return rates


def torchvision_loader(folder: Path, batch_size: int, workers: int):
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(),
                             transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return torch.utils.data.DataLoader(datasets.ImageFolder(str(folder), tf), batch_size=batch_size,
                                       shuffle=True, num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0)


def _cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _shard_jpegs(shards: Path) -> list[bytes]:
    import tarfile

    blobs = []
    for tar_path in sorted(shards.glob("train-*.tar")):
        with tarfile.open(tar_path) as tar:
            blobs += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    return blobs


def prepare(args, work: Path, workers: int) -> tuple[Path, list[Path]]:
    """The image folder both pipelines read (generated, or links to a sample of --folder), and its files."""
    folder = work / "images"
    if not folder.exists():
        if args.folder:
            for f in image_files(Path(args.folder), args.images):
                link = folder / f.parent.name / f.name
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(f.resolve())
        else:
            make_photos(folder, args.images)
    files = image_files(folder, 10**9)
    shard_size = max(1, len(files) // (4 * workers))
    write_dataset(work / "shards", train_dir=folder, overwrite=True,
                  cfg=WriterConfig(shard_size=shard_size, workers=workers))
    write_dataset(work / "shards_small", train_dir=folder, overwrite=True,
                  cfg=WriterConfig(shard_size=shard_size, workers=workers, max_side=args.max_side, quality=90))
    return folder, files


def _open_pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def _timm_crop(loader):
    """The same loader with timm's own RandomResizedCrop: PIL decodes in full, PIL resizes."""
    from timm.data.transforms import RandomResizedCropAndInterpolation

    tf = loader._loader.dataset.transform(224)  # bench only: reach in (before the workers start) to swap it
    crop = tf.transforms[0]
    tf.transforms[0:1] = [_open_pil, RandomResizedCropAndInterpolation(224, scale=crop.scale, ratio=crop.ratio)]
    return loader


def _without_region_decode(loader):
    """The same loader decoding whole images, as before data/region_decode.py (its crop's switch off)."""
    loader._loader.dataset.transform(224).transforms[0].region_decode = False  # bench only: before the workers start
    return loader


def _without_buffers(loader):
    """The same loader sending batches the DataLoader's way (a new shared-memory segment per batch)."""
    loader._loader.dataset.buffers = None  # bench only: before the workers start
    return loader


A, B, B0, C, D = ("(a) decode only, PIL, full size", "(b) ours: shards -> uint8 batch",
                  "(b) ours without region decoding (before issue 19)", "(c) torchvision ImageFolder + DataLoader",
                  "(d) ours, decoding on the device")


def run(args) -> None:
    torch.set_num_threads(1)
    if args.no_nvimgcodec_gpu:  # bench only: (d) and (e) with the decoders they had before nvImageCodec's
        import data.device_decode

        data.device_decode.device_jpeg_decoder = lambda device: data.device_decode.jpeg_decoder()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_loader_"))
    folder, files = prepare(args, work, args.workers)
    if args.rounds:
        compare(args, work, folder, files)
    if args.decode_procs:
        print("\n| (d) processes sharing the device | images/s, summed |\n|---:|---:|")
        for procs, rate in decode_procs(work / "shards", args).items():
            print(f"| {procs} | {rate:.0f} |")
    if args.stages:
        print("\n| stage of (b), alone, one process | CPU ms per image |")
        print("|---|---:|")
        for name, ms in stage_costs(work / "shards").items():  # bench/loader_stages.py
            print(f"| {name} | {ms:.3f} |")
    if args.draft:
        print("\n| photos, output size, crop / output | images | region decode + resize | PIL draft + resize |")
        print("|---|---:|---:|---:|")
        for name, n, region, draft in draft_against_region(files):
            print(f"| {name} | {n} | {region:.3f} | {draft:.3f} |")


def compare(args, work: Path, folder: Path, files: list[Path]) -> None:
    """The pipelines side by side, in interleaved rounds: the table and the target ratios."""
    workers = args.workers
    originals, smalls = [f.read_bytes() for f in files], _shard_jpegs(work / "shards_small")
    pool = multiprocessing.Pool(workers)
    ours = lambda shards: build_train_loader(shards, batch_size=args.batch_size, num_workers=workers,  # noqa: E731
                                             image_size=224, shuffle_buffer=256)
    cases = {
        A: lambda: decode_only(pool, originals, workers),
        f"(a') decode only, PIL, --max-side {args.max_side}": lambda: decode_only(pool, smalls, workers),
        B: ours(work / "shards"),
        B0: _without_region_decode(ours(work / "shards")),
        "(b) ours with timm's RandomResizedCrop (PIL)": _timm_crop(ours(work / "shards")),
        "(b) ours with the DataLoader's own hand-off": _without_buffers(ours(work / "shards")),
        f"(b) ours, shards with --max-side {args.max_side}": ours(work / "shards_small"),
        C: torchvision_loader(folder, args.batch_size, workers),
        f"{D} ({args.device})": build_train_loader(work / "shards", batch_size=args.batch_size, num_workers=workers,
                                                   image_size=224, shuffle_buffer=256, decode_on=args.device),
        f"(e) decode only, batched on {args.device}": lambda: decode_batched(originals, args.device, args.batch_size),
    }
    for case in cases.values():  # warm-up: start persistent workers, fill caches
        case() if callable(case) else loader_rate(case, args.device)
    rates = {name: [] for name in cases}
    order = [A, B, B0, C] + [k for k in cases if k not in (A, B, B0, C)]  # those of the targets back to back
    for _ in range(args.rounds):
        for name in order:
            case = cases[name]
            rates[name].append(case() if callable(case) else loader_rate(case, args.device))
    median = {k: tuple(statistics.median(r[i] for r in v) for i in range(4)) for k, v in rates.items()}
    report(args, files, originals, smalls, median, workers)
    # Each round's own ratio, then the median and range over rounds: a slow spell of the machine
    # hits the cases of one round alike, where it would skew a ratio of medians taken apart.
    a, b, b0, c = (rates[k] for k in (A, B, B0, C))
    for name, num, den, target in (("(b)/(a)", b, a, 1.0), ("(b)/(c)", b, c, 1.6),
                                   ("(b)/(a) before: no region decoding", b0, a, 0.8),
                                   ("(b)/(c) before: no region decoding", b0, c, 1.6)):
        ratios = [x[1] / y[1] for x, y in zip(num, den)]
        print(f"{name} per core, per round: median {statistics.median(ratios):.2f}, range "
              f"{min(ratios):.2f}-{max(ratios):.2f} (target >= {target})")


def report(args, files, originals, smalls, rate: dict, workers: int) -> None:
    kb = lambda blobs: sum(map(len, blobs)) / len(blobs) / 1e3  # noqa: E731
    sizes = {Image.open(f).size for f in files[:50]}
    print(f"machine: {_cpu_name()}, {len(os.sched_getaffinity(0))} usable cores, load average "
          f"{os.getloadavg()[0]:.1f}; torch {torch.__version__}, Pillow {Image.__version__}, "
          f"Python {platform.python_version()}")
    print(f"command: python -m bench.bench_loader {' '.join(sys.argv[1:])}")
    print(f"images: {len(files)} {'from ' + args.folder if args.folder else 'generated (make_photos)'}, "
          f"{kb(originals):.0f} KB mean (e.g. {sorted(sizes)[0]}); --max-side {args.max_side}: "
          f"{kb(smalls):.0f} KB mean; {workers} workers, batch {args.batch_size}, median of {args.rounds} rounds\n")
    print("| pipeline | images/s (wall) | images per CPU-second (per core) | main process, CPU ms/image | "
          "workers, CPU ms/image |")
    print("|---|---:|---:|---:|---:|")
    for name, (wall, cpu, main, workers) in rate.items():
        print(f"| {name} | {wall:.0f} | {cpu:.0f} | {main:.3f} | {workers:.3f} |")
    print()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bench_loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", help="an ImageNet-style class-folder tree to sample from instead of generated photos")
    p.add_argument("--images", type=int, default=400, help="number of images (default 400)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="loader workers (default: cores)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-side", type=int, default=320, help="re-encoding size to compare (default 320)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the comparison (0: only the extras below)")
    p.add_argument("--work", help="folder for images and shards (default: a new temporary folder)")
    p.add_argument("--stages", action="store_true", help="also time each stage of (b) alone")
    p.add_argument("--draft", action="store_true",
                   help="also time region decoding against PIL's draft decode for crops of 2x and 4x the output")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where (d) and (e) decode (default: cuda when there is a GPU)")
    p.add_argument("--no-nvimgcodec-gpu", action="store_true",
                   help="(d) and (e) decode with TorchCodec or torchvision even where nvImageCodec's GPU decoder loads")
    p.add_argument("--decode-procs", type=int, nargs="*", default=[], metavar="N",
                   help="also run (d) in N processes at once, for each N (e.g. 1 2 4 on a GPU)")
    p.add_argument("--decode-images", type=int, default=8192,
                   help="images the --decode-procs processes decode in all, per N (default 8192)")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
