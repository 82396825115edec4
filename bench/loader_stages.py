"""Where the CPU time of bench_loader's (b) goes: each stage alone, in this process, in CPU ms per image."""

from __future__ import annotations

import io
import time
from pathlib import Path

from PIL import Image


def _pil_decode(b: bytes) -> None:
    with Image.open(io.BytesIO(b)) as img:
        img.convert("RGB")


def _region_stages(blobs: list[bytes], tf) -> dict:
    """The stages that data/region_decode.py adds or changes: each image's own box, drawn as the loader does."""
    from data import region_decode
    from data.transforms import jpeg_header, resize_crop, val_transform

    crop = tf.transforms[0]
    drawn = [crop.draw(*jpeg_header(b)[:2])[0] for b in blobs]

    def header_and_draws() -> int:
        for b in blobs:
            crop.draw(*jpeg_header(b)[:2])
        return len(blobs)

    def regions(resize: bool):
        def stage() -> int:
            for b, box in zip(blobs, drawn):
                region = region_decode.decode_region(b, box)
                if resize:
                    resize_crop(region, (0, 0, box[2], box[3]), (224, 224))
            return len(blobs)
        return stage

    def whole_transform() -> int:
        for b in blobs:
            tf(b)
        return len(blobs)

    stages = {"JPEG header and timm's random draws": header_and_draws}
    if region_decode.available():
        stages["nvImageCodec region decode of the drawn box (libjpeg-turbo)"] = regions(resize=False)
        stages["nvImageCodec region decode + resize to 224"] = regions(resize=True)
        stages["whole per-image transform (decode, crop, resize, flip), region decode"] = whole_transform
        val = val_transform(224, 0.875)  # RegionResizeCrop, wrapping the whole-decode transform

        def validation(tf):
            def stage() -> int:
                for b in blobs:
                    tf(b)
                return len(blobs)
            return stage
        stages["validation transform (resize 256, centre crop 224), whole decode"] = validation(val.transform)
        stages["validation transform, region decode"] = validation(val)
    return stages


def stage_costs(shards: Path, reps: int = 3) -> dict[str, float]:
    """CPU milliseconds per image of each stage of (b), alone, in this process (best of ``reps``)."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    from data.shard_reader import read_shard
    from data.transforms import TrainAugment, _decode_jpeg, resize_crop, train_transform

    urls = sorted(str(p) for p in shards.glob("train-*.tar"))
    blobs = [s["jpg"] for u in urls for s in read_shard(u)]
    decoded = [_decode_jpeg(b) for b in blobs[:20]]
    tf = train_transform(224, TrainAugment())
    crop = tf.transforms[0]

    def wds_read():
        for u in urls:
            with open(u, "rb") as f:
                yield from group_by_keys({**m, "__url__": u} for m in tar_file_iterator(f))

    boxes = [crop.get_params(decoded[k % len(decoded)], crop.scale, crop.ratio) for k in range(len(blobs))]
    def resize_all() -> int:  # real random crops, from already decoded images
        for k, box in enumerate(boxes):
            resize_crop(decoded[k % len(decoded)], box, (224, 224))
        return len(boxes)

    whole = train_transform(224, TrainAugment())
    whole.transforms[0].region_decode = False

    def pil_load(b: bytes) -> None:  # (a) without its copy: convert("RGB") copies an RGB image
        with Image.open(io.BytesIO(b)) as img:
            img.load()

    def each(fn):  # results are dropped at once, as in a loader (keeping them all would add page faults)
        def stage() -> int:
            for b in blobs:
                fn(b)
            return len(blobs)
        return stage

    stages = {
        "read tar shards, webdataset's reader (tarfile)": lambda: sum(1 for _ in wds_read()),
        "read tar shards, ours (data/tarstream.py)": lambda: sum(1 for u in urls for _ in read_shard(u)),
        "PIL decode to RGB, as (a) (and torchvision's pil_loader)": each(_pil_decode),
        "PIL decode, load() only": each(pil_load),
        "torchvision decode_jpeg (libjpeg-turbo)": each(_decode_jpeg),
        "crop + antialiased uint8 resize to 224, channels_last (torch)": resize_all,
        "whole per-image transform (decode, crop, resize, flip), whole-image decode": each(whole),
    }
    stages.update(_region_stages(blobs, tf))
    costs = {}
    for name, stage in stages.items():
        best = float("inf")
        for _ in range(reps):
            cpu = time.process_time()
            n = stage()
            best = min(best, (time.process_time() - cpu) / n * 1e3)
        costs[name] = best
    return costs


def _draft_crop(blob: bytes, box: tuple[int, int, int, int], full: tuple[int, int], out: int) -> None:
    """The PIL path of data/transforms.py: a draft decode at the smallest DCT scale the crop allows, resampled
    from the box to the output in one pass."""
    import math

    (i, j, h, w), shrink = box, min(box[2], box[3]) / out
    img = Image.open(io.BytesIO(blob))
    if shrink >= 2:
        img.draft("RGB", (math.ceil(full[0] / shrink), math.ceil(full[1] / shrink)))
    sx, sy = img.size[0] / full[0], img.size[1] / full[1]
    img.convert("RGB").resize((out, out), Image.Resampling.BILINEAR, box=(j * sx, i * sy, (j + w) * sx, (i + h) * sy))


def draft_against_region(photos: list[Path], reps: int = 3) -> list[tuple[str, int, float, float]]:
    """(photos and output size, images, region decode + torch resize, PIL draft decode + resize) in CPU ms per
    image, for crops in each band of crop/output ratio: where PIL's reduced-scale decode still wins."""
    from data import region_decode
    from data.transforms import TrainAugment, jpeg_header, resize_crop, train_transform

    originals = [p.read_bytes() for p in photos[:120]]
    large = []  # the same photos 3x larger (1500x1125 for make_photos'), as the larger ImageNet photos are
    for b in originals[:60]:
        img = Image.open(io.BytesIO(b))
        buf = io.BytesIO()
        img.resize((img.width * 3, img.height * 3), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        large.append(buf.getvalue())
    rows = []
    for name, blobs, out in (("originals at 224", originals, 224), ("originals at 128", originals, 128),
                             ("3x larger at 224", large, 224)):
        crop = train_transform(out, TrainAugment()).transforms[0]
        items = [(b, crop.draw(*jpeg_header(b)[:2])[0], jpeg_header(b)[:2]) for b in blobs]
        for lo, hi in ((0, 2), (2, 4), (4, 99)):
            band = [x for x in items if lo <= min(x[1][2], x[1][3]) / out < hi]
            if not band:
                continue
            region = _best(reps, band, lambda x: resize_crop(region_decode.decode_region(x[0], x[1]),
                                                             (0, 0, x[1][2], x[1][3]), (out, out)))
            draft = _best(reps, band, lambda x: _draft_crop(x[0], x[1], x[2], out))
            rows.append((f"{name}, crop {lo}-{hi}x the output", len(band), region, draft))
    return rows


def _best(reps: int, items: list, fn) -> float:
    best = float("inf")
    for _ in range(reps):
        cpu = time.process_time()
        for x in items:
            fn(x)
        best = min(best, (time.process_time() - cpu) / len(items) * 1e3)
    return best
