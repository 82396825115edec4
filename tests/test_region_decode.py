"""Region decoding (data/region_decode.py) and its use by the training crop (data/transforms.py): the pixels are
those of a full decode cropped to the box, the images it does not take go today's way with the same draws,
and the loader's batches do not change."""

import io
import platform
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from data import TrainAugment, build_train_loader, region_decode
from data.shards import WriterConfig, write_dataset
from data.transforms import (REGION_MAX_SHRINK, DecodeRandomResizedCrop, _decode_jpeg, jpeg_header, resize_crop,
                             train_transform)

# Where setup.cfg installs it (Linux x86_64/aarch64) these tests run, and fail if it does not load: a skip there
# would hide a broken install. Elsewhere no wheel exists and the workers decode as before.
WHEELS = sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64")
needs_nvimgcodec = pytest.mark.skipif(not WHEELS, reason="nvImageCodec has no wheel for this platform")


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Smooth gradients with noise: every 8x8 block has detail in all three channels, as photos do."""
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(w, 1), yy * 255 / max(h, 1), (xx + yy) % 256], axis=-1)
    pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def _jpeg(img: Image.Image, fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _edge_boxes(w: int, h: int) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width): the whole image, each corner, each edge, single rows and columns, one pixel,
    and a few random boxes."""
    rng = random.Random(w * 1000 + h)
    boxes = [(0, 0, h, w), (0, 0, (h + 1) // 2, (w + 1) // 2), (h // 2, w // 2, h - h // 2, w - w // 2),
             (0, w - 1, h, 1), (h - 1, 0, 1, w), (0, 0, 1, 1), (h - 1, w - 1, 1, 1), (h // 3, 0, h // 3 + 1, w),
             (0, w // 3, h, w // 3 + 1)]
    for _ in range(6):
        i, j = rng.randrange(h), rng.randrange(w)
        boxes.append((i, j, rng.randint(1, h - i), rng.randint(1, w - j)))
    return boxes


# sizes: odd widths and heights, smaller than one MCU, not a multiple of 8 or 16; PIL's subsampling 0/1/2 is
# 4:4:4/4:2:2/4:2:0; restart markers every 3 MCUs or every MCU row
ENCODINGS = [((500, 375), dict(subsampling=2)), ((333, 251), dict(subsampling=1)), ((97, 61), dict(subsampling=0)),
             ((17, 9), dict(subsampling=2)), ((201, 143), dict(subsampling=2, restart_marker_blocks=3)),
             ((160, 99), dict(subsampling=1, restart_marker_rows=1)), ((123, 77), dict(subsampling=0, quality=60))]


@needs_nvimgcodec
@pytest.mark.parametrize("size, options", ENCODINGS, ids=lambda v: str(v))
def test_a_region_is_the_full_decode_cropped(size, options):
    data = _jpeg(_photo(*size), **{"quality": 90, **options})
    full = _decode_jpeg(data)
    pil = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
    assert torch.equal(full, pil)  # the reference itself: torchvision's and PIL's libjpeg-turbo agree
    for i, j, h, w in _edge_boxes(*size):
        region = region_decode.decode_region(data, (i, j, h, w))
        assert region is not None and region.dtype == torch.uint8
        assert torch.equal(region, full[:, i:i + h, j:j + w]), (i, j, h, w)


def _crop(size: int, region: bool) -> DecodeRandomResizedCrop:
    crop = train_transform(size, TrainAugment(hflip=0.0)).transforms[0]
    assert isinstance(crop, DecodeRandomResizedCrop) and crop.tensor_output
    crop.region_decode = region
    return crop


def _seeded(fn, seed: int):
    random.seed(seed)
    torch.manual_seed(seed)
    return fn()


@needs_nvimgcodec
@pytest.mark.parametrize("photo, out", [((500, 375), 224), ((333, 251), 96), ((500, 375), 64)],
                         ids=["shrink<2", "up-to-3.5x", "up-to-8x"])
def test_the_crop_is_a_full_decode_cropped_then_resized_where_the_region_decoder_runs(photo, out, monkeypatch):
    """Same draws as without it; where it runs the output is a full decode, cropped, resized; crops at least
    REGION_MAX_SHRINK times the output keep PIL's draft decode."""
    data = _jpeg(_photo(*photo), quality=90)
    crop, calls = _crop(out, region=True), []
    decode = region_decode.decode_region
    monkeypatch.setattr(region_decode, "decode_region", lambda d, box: calls.append(box) or decode(d, box))
    for seed in range(12):
        image = _seeded(lambda: crop(data), seed)
        box, interpolation = _seeded(lambda: crop.draw(*photo), seed)
        shrink = min(box[2], box[3]) / out
        assert (box in calls) == (shrink < REGION_MAX_SHRINK)
        if shrink < REGION_MAX_SHRINK:
            assert torch.equal(image, resize_crop(_decode_jpeg(data), box, (out, out), interpolation))
        else:
            today = _seeded(lambda: _crop(out, region=False)(data), seed)  # PIL's draft decode, a PIL image
            assert np.array_equal(np.asarray(image), np.asarray(today))


def _fallbacks() -> dict[str, bytes]:
    photo = _photo(120, 90)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display: neither PIL, torchvision nor we apply it
    return {
        "greyscale": _jpeg(photo.convert("L")),
        "cmyk": _jpeg(photo.convert("CMYK")),
        "png-named-jpg": _jpeg(photo, "PNG"),
        "progressive": _jpeg(photo, progressive=True),
        "truncated": _jpeg(photo, quality=95)[:-600],
        "exif-rotated": _jpeg(photo, exif=exif),
    }


def _outcome(crop, data: bytes, seed: int):
    """(output or None, exception type or None, the next python and torch draws) of ``crop(data)`` at ``seed``."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        out, error = crop(data), None
    except Exception as e:  # the truncated file: today's path fails it, so must the new one, the same way
        out, error = None, type(e)
    return out, error, random.random(), torch.rand(1).item()


# which of them the region decoder takes: the others go today's way before it is asked
TAKEN = {"greyscale": False, "cmyk": False, "png-named-jpg": False, "progressive": True, "truncated": False,
         "exif-rotated": True}


@needs_nvimgcodec
@pytest.mark.parametrize("case", list(TAKEN))
def test_what_the_region_decoder_does_not_take_goes_todays_way_with_the_same_draws(case, monkeypatch):
    data = _fallbacks()[case]
    assert region_decode.takes(jpeg_header(data), data) == TAKEN[case]
    calls = []
    decode = region_decode.decode_region
    monkeypatch.setattr(region_decode, "decode_region", lambda d, box: calls.append(box) or decode(d, box))
    for seed in range(4):
        today, new = _outcome(_crop(64, region=False), data, seed), _outcome(_crop(64, region=True), data, seed)
        assert new[1:] == today[1:]  # the same draws were used up, and the same exception, if any
        assert today[0] is None or np.array_equal(np.asarray(new[0]), np.asarray(today[0]))  # tensor or PIL
    assert bool(calls) == TAKEN[case]


@needs_nvimgcodec
def test_a_truncated_stream_is_refused_not_invented():
    """Asked anyway, it returns None (nvImageCodec's answer to a failed decode), never a half-made image."""
    data = _fallbacks()["truncated"]
    assert region_decode.decode_region(data, (0, 0, 90, 120)) is None
    assert region_decode.decode_region(b"not a jpeg", (0, 0, 1, 1)) is None


def test_nothing_is_printed_on_import_or_on_a_refused_image():
    """No "failed to load nvjpeg" lines on a machine without the GPU wheels, no log line per bad image."""
    # the module alone, not the data package (timm, webdataset): a fresh process, as quick as it can be
    code = ("import importlib.util as u, sys; s = u.spec_from_file_location('r', sys.argv[1]); "
            "r = u.module_from_spec(s); s.loader.exec_module(r); r.available(); "
            "print(r.decode_region(sys.stdin.buffer.read(), (80, 110, 10, 10)), r.describe())")
    proc = subprocess.run([sys.executable, "-c", code, region_decode.__file__], capture_output=True,
                          input=_fallbacks()["truncated"], timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stderr == b""
    assert proc.stdout.startswith(b"None ") and b"nvImageCodec" in proc.stdout
    assert (b"region decode" in proc.stdout) == region_decode.available()


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory):
    """24 small textured RGB photos, under twice the training size, so every crop takes the tensor path."""
    root = tmp_path_factory.mktemp("region")
    for k in range(24):
        path = root / "train" / f"c{k % 2}" / f"{k:02d}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        _photo(40 + k % 7, 33 + k % 5, seed=k).save(path, quality=90, subsampling=k % 3)
    write_dataset(root / "out", train_dir=root / "train", cfg=WriterConfig(shard_size=6))
    return root / "out"


def _epoch(shards, workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = build_train_loader(shards, batch_size=4, num_workers=workers, image_size=32, seed=3,
                                augment=TrainAugment(scale=(0.3, 1.0)))
    return [(x.clone(), y.clone()) for x, y in loader]


@needs_nvimgcodec
def test_the_loaders_batches_are_the_same_with_and_without_the_region_decoder(photo_shards, monkeypatch):
    calls = []
    decode = region_decode.decode_region
    monkeypatch.setattr(region_decode, "decode_region", lambda d, box: calls.append(box) or decode(d, box))
    batches = {}
    for region in (False, True):
        monkeypatch.setattr(DecodeRandomResizedCrop, "region_decode", region)
        # the batches depend on the worker count (data/pipeline.py): compare like with like; 2 workers: a decoder
        # in each forked worker
        batches[region] = _epoch(photo_shards, workers=0), _epoch(photo_shards, workers=2)
        assert len(calls) == 24 * region  # the workers' calls are in their own processes
    for without, with_region in zip(batches[False], batches[True]):
        assert len(without) == len(with_region) == 6
        for (xa, ya), (xb, yb) in zip(without, with_region):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("crop, out", [((375, 500), (224, 224)), ((97, 61), (224, 224)), ((224, 224), (224, 224)),
                                       ((301, 177), (160, 128)), ((1, 1), (32, 32)), ((400, 3), (64, 64))])
def test_the_crops_resize_is_torchvisions(crop, out):
    """resize_crop calls torch's kernel without torchvision's dispatch: the pixels and the channels_last memory
    of torchvision's resize, from a decoder's HWC memory and from a plain CHW tensor alike."""
    import torchvision.transforms.v2.functional as F2

    h, w = crop
    hwc = torch.from_numpy(np.array(_photo(w + 7, h + 5, seed=h * w))).permute(2, 0, 1)
    for image in (hwc, hwc.contiguous()):
        box = (3, 5, h, w)
        want = F2.resize(image[None, :, 3:3 + h, 5:5 + w].contiguous(memory_format=torch.channels_last), list(out),
                         antialias=True)[0]
        got = resize_crop(image, box, out)
        assert torch.equal(got, want)
        assert got.stride() == want.stride()  # the same memory layout: HWC, as the batch keeps it


def test_the_flip_is_torchvisions_flip_with_the_same_draw():
    from torchvision.transforms import RandomHorizontalFlip

    from data.transforms import HorizontalFlip

    tf = train_transform(64, TrainAugment(hflip=0.3))
    flips = [t for t in tf.transforms if isinstance(t, RandomHorizontalFlip)]
    assert [type(t) for t in flips] == [HorizontalFlip] and flips[0].p == 0.3
    tensor, pil = torch.arange(2 * 3 * 4, dtype=torch.uint8).view(2, 3, 4), _photo(9, 5)
    for image, same in ((tensor, torch.equal), (pil, lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)))):
        torch.manual_seed(0)
        ours = [HorizontalFlip(0.3)(image) for _ in range(40)]
        after_ours = torch.rand(1)
        torch.manual_seed(0)
        theirs = [RandomHorizontalFlip(0.3)(image) for _ in range(40)]
        assert torch.rand(1) == after_ours  # one draw per call, as torchvision's
        assert all(same(a, b) for a, b in zip(ours, theirs))
        assert 0 < sum(not same(a, image) for a in ours) < 40  # some flipped, some not


def _val_pair(crop: int, resize: int | None, interpolation: str):
    """(validation transform with the region path, today's whole-decode transform it wraps)."""
    from data.transforms import RegionResizeCrop, val_transform

    tf = val_transform(crop, 0.875, resize, interpolation)
    assert isinstance(tf, RegionResizeCrop) and tf.taken
    return tf, tf.transform


@needs_nvimgcodec
@pytest.mark.parametrize("photo, options", [((500, 375), {}), ((375, 500), dict(subsampling=1)),
                                            ((333, 251), dict(subsampling=0)), ((17, 9), {}),
                                            ((201, 143), dict(restart_marker_blocks=3)), ((512, 256), {})],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("crop, resize, interpolation", [(224, None, "bilinear"), (96, 120, "bicubic"),
                                                         (64, 64, "bilinear"), (128, None, "random")])
def test_validation_from_the_region_is_within_one_level_of_the_whole_decode(photo, options, crop, resize,
                                                                            interpolation, monkeypatch):
    """The centre crop resampled from the decoded region only: within 1 level of resizing the whole image and
    cropping, on few values, and it really ran (photos drafted by DecodeForResize, 2x the resize, excepted)."""
    data = _jpeg(_photo(*photo, seed=sum(photo)), **{"quality": 90, **options})
    tf, today = _val_pair(crop, resize, interpolation)
    calls = []
    decode = region_decode.decode_region
    monkeypatch.setattr(region_decode, "decode_region", lambda d, box: calls.append(box) or decode(d, box))
    new, old = tf(data), today(data)
    assert new.shape == old.shape == (3, crop, crop) and new.dtype == torch.uint8
    diff = (new.int() - old.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
    drafted = tf.resize / min(photo) <= 0.5
    assert bool(calls) != drafted
    if calls:
        (i, j, h, w), = calls
        assert h * w < photo[0] * photo[1] or min(photo) < 2 * crop  # a region, unless the crop needs it all


@needs_nvimgcodec
@pytest.mark.parametrize("case", list(TAKEN))
def test_validation_takes_todays_path_for_what_the_region_decoder_does_not_take(case, monkeypatch):
    data = _fallbacks()[case]
    tf, today = _val_pair(64, None, "bilinear")
    if case == "truncated":
        with pytest.raises(Exception) as new:
            tf(data)
        with pytest.raises(Exception) as old:
            today(data)
        assert type(new.value) is type(old.value)
        return
    new, old = tf(data), today(data)
    assert (new.int() - old.int()).abs().max() <= (1 if TAKEN[case] else 0)


def test_validation_without_nvimgcodec_is_todays_transform(monkeypatch):
    from torchvision.transforms import Compose

    from data.transforms import DecodeForResize, val_transform

    monkeypatch.setattr(region_decode, "available", lambda: False)
    tf = val_transform(64, 0.875)
    assert type(tf) is Compose and isinstance(tf.transforms[0], DecodeForResize)
