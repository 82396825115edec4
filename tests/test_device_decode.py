"""data/device_decode.py (--decode device) against the CPU path, with the CPU as the device: the same code path
that decodes with nvJPEG on a GPU (one batched call, then crop, resize and flip on the device)."""

import io
import json
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import data.device_decode
from conftest import image_shards
from data import build_train_loader, build_val_loader, region_decode
from data.transforms import DecodeRandomResizedCrop, PlanCrop, TrainAugment, train_transform

AUG = TrainAugment(scale=(0.08, 1.0), hflip=0.5)


def photo(seed: int, width: int = 320, height: int = 240) -> Image.Image:
    """A smooth random scene with sensor-like noise: what JPEG decoders and resizers see in real photos."""
    rng = np.random.RandomState(seed)
    scene = Image.fromarray(rng.randint(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(scene, dtype=np.float32) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def photo_shards(tmp_path_factory) -> Path:
    return image_shards(tmp_path_factory.mktemp("photos"), {"train": 32, "val": 12},
                        lambda split, i: photo(i + 1000 * (split == "val")), classes=2, shard_size=8)


def recorded_draws(monkeypatch) -> list:
    """Every crop box timm's random-resized crop draws, in order, as (box, image width, image height)."""
    draws, draw = [], DecodeRandomResizedCrop.draw

    def recording(self, full_w, full_h):
        box, interpolation = draw(self, full_w, full_h)
        draws.append((box, full_w, full_h))
        return box, interpolation

    monkeypatch.setattr(DecodeRandomResizedCrop, "draw", recording)
    return draws


def epoch(loader) -> list:
    return [(x.clone(), y.clone()) for x, y in loader]


def test_device_batches_have_the_cpu_paths_labels_crop_boxes_and_pixels(photo_shards, monkeypatch):
    """Tolerance: where the CPU path decodes in full (crop < 2x the output), the pixels are identical on the
    CPU device; where it decodes at 1/2-1/8 scale in the DCT domain (PIL's draft: crop >= 2x the output), the
    device's full decode and antialiased resize differ by at most 8 levels of 255 per image on average; with
    nvImageCodec installed the CPU path decodes the crop box alone up to 4x the output, the same pixels."""
    draws = recorded_draws(monkeypatch)
    cpu = epoch(build_train_loader(photo_shards, batch_size=8, num_workers=0, image_size=64, augment=AUG, seed=5))
    cpu_draws = list(draws)
    draws.clear()
    device_loader = build_train_loader(photo_shards, batch_size=8, num_workers=0, image_size=64, augment=AUG,
                                       seed=5, decode_on="cpu")
    device = epoch(device_loader)
    assert draws == cpu_draws and len(draws) == 32  # the same crop boxes, drawn from the JPEG headers
    assert device_loader.cpu_fallbacks == 0
    full, reduced = 0, 0
    for (xc, yc), (xd, yd), k in zip(cpu, device, range(0, 32, 8)):
        assert torch.equal(yc, yd) and xd.shape == xc.shape == (8, 3, 64, 64) and xd.dtype == torch.uint8
        assert xd.is_contiguous(memory_format=torch.channels_last)
        for i in range(8):
            (top, left, h, w), _, _ = draws[k + i]
            diff = (xc[i].int() - xd[i].int()).abs()
            if min(h, w) / 64 < 2:
                assert diff.max() == 0, (k + i, draws[k + i])
                full += 1
            else:
                assert diff.float().mean() <= 8, (k + i, draws[k + i], diff.float().mean())
                reduced += 1
    assert full and reduced  # both kinds of crop were compared


@pytest.mark.parametrize("crop, resize", [(224, 256), (64, 73)])
def test_device_validation_matches_the_cpu_resize_and_centre_crop(photo_shards, crop, resize):
    """PIL's and torch's antialiased bilinear resizes differ by at most one level; at 73 px from 240 px the CPU
    path decodes at half scale first (PIL's draft), and the mean difference stays within 8 levels."""
    kw = dict(batch_size=5, num_workers=0, image_size=crop, resize=resize)
    cpu = epoch(build_val_loader(photo_shards, **kw))
    device = epoch(build_val_loader(photo_shards, **kw, decode_on="cpu"))
    assert [len(y) for _, y in device] == [len(y) for _, y in cpu] == [5, 5, 2]  # every image once
    for (xc, yc), (xd, yd) in zip(cpu, device):
        assert torch.equal(yc, yd) and xd.shape == xc.shape and xd.is_contiguous(memory_format=torch.channels_last)
        diff = (xc.int() - xd.int()).abs()
        if resize / 240 > 0.5:
            assert diff.max() <= 1
        else:
            assert diff.float().flatten(1).mean(1).max() <= 8


@pytest.fixture(scope="module")
def awkward_shards(tmp_path_factory) -> Path:
    """One shard whose batch of 6 holds 3 ordinary JPEGs, a CMYK JPEG, PNG bytes stored as .jpg and a JPEG cut
    short, in both splits."""
    def jpeg(img, **kw):
        out = io.BytesIO()
        img.save(out, "JPEG", quality=90, **kw)
        return out.getvalue()

    png = io.BytesIO()
    photo(4, 48, 40).save(png, "PNG")
    images = [jpeg(photo(i, 48, 40)) for i in range(3)] + [jpeg(photo(3, 48, 40).convert("CMYK")), png.getvalue(),
                                                             jpeg(photo(5, 48, 40))[:700]]
    names = ["a.JPEG", "b.JPEG", "c.JPEG", "cmyk.JPEG", "png.JPEG", "truncated.JPEG"]
    root = tmp_path_factory.mktemp("awkward")
    info = {"splits": {}}
    for split in ("train", "val"):
        with wds.TarWriter(str(root / f"{split}-000000.tar"), encoder=False, mtime=0) as sink:
            for k, (data, name) in enumerate(zip(images, names)):
                sink.write({"__key__": f"{k:08d}", "jpg": data, "cls": str(k % 2).encode(),
                            "fname.txt": name.encode()})
        info["splits"][split] = {"num_samples": 6, "filenames": [f"{split}-000000.tar"], "shard_lengths": [6]}
    (root / "_info.json").write_text(json.dumps(info))
    (root / "classes.txt").write_text("n0\nn1\n")
    return root


def test_cmyk_png_and_truncated_images_get_the_cpu_paths_outcome(awkward_shards, caplog, monkeypatch):
    """The CMYK and PNG images are decoded by the worker on the CPU, exactly as with decode='cpu', and counted
    as CPU fallbacks; the truncated one fails there as it does on the CPU path: skipped, counted, named, and its
    place in the training batch taken by another image of the batch."""
    kw = dict(batch_size=6, num_workers=0, image_size=32, augment=AUG, seed=1)
    cpu = epoch(build_train_loader(awkward_shards, **kw))
    device_loader = build_train_loader(awkward_shards, **kw, decode_on="cpu")
    with caplog.at_level(logging.WARNING):
        device = epoch(device_loader)
    assert len(device) == 1 and torch.equal(device[0][0], cpu[0][0]) and torch.equal(device[0][1], cpu[0][1])
    assert device_loader.cpu_fallbacks == 2 and device_loader.bad_samples == 1
    assert [r.getMessage() for r in caplog.records if "truncated.JPEG" in r.getMessage()], caplog.text

    # against the CPU's whole-image decode (the region path's own bound against it: tests/test_region_decode.py)
    monkeypatch.setattr(region_decode, "available", lambda: False)
    val_cpu = epoch(build_val_loader(awkward_shards, batch_size=6, num_workers=0, image_size=32))
    val = build_val_loader(awkward_shards, batch_size=6, num_workers=0, image_size=32, decode_on="cpu")
    val_device = epoch(val)
    assert torch.equal(val_device[0][1], val_cpu[0][1]) and len(val_device[0][1]) == 5  # the truncated one dropped
    assert (val_device[0][0].int() - val_cpu[0][0].int()).abs().max() <= 1  # PIL's resize against torch's
    assert val.bad_samples == 1 and val.cpu_fallbacks == 2


def test_images_the_device_decoder_refuses_are_decoded_on_the_cpu_and_undecodable_ones_skipped(
        tmp_path, monkeypatch, caplog):
    """A device decoder that refuses progressive JPEGs (as nvJPEG's hardware path does) and a JPEG with a header
    but no image data (which passes the workers' checks and no decoder can read)."""
    def jpeg(img, **kw):
        out = io.BytesIO()
        img.save(out, "JPEG", quality=90, **kw)
        return out.getvalue()

    progressive = jpeg(photo(7, 48, 40), progressive=True)
    ordinary = [jpeg(photo(i, 48, 40)) for i in range(3)]
    hollow = ordinary[0][:ordinary[0].index(b"\xff\xda")] + b"\x00" * 64 + b"\xff\xd9"
    shards = tmp_path / "refused"
    shards.mkdir()
    with wds.TarWriter(str(shards / "train-000000.tar"), encoder=False, mtime=0) as sink:
        for k, payload in enumerate([*ordinary, progressive, hollow]):
            sink.write({"__key__": f"{k:08d}", "jpg": payload, "cls": b"0", "fname.txt": f"{k}.JPEG".encode()})
    (shards / "_info.json").write_text(json.dumps({"splits": {"train": {
        "num_samples": 5, "filenames": ["train-000000.tar"], "shard_lengths": [5]}}}))
    (shards / "classes.txt").write_text("n0\n")
    plain = data.device_decode._torchvision_decoder()

    def picky(datas, device):
        if any(b"\xff\xc2" in bytes(d[:2000]) for d in datas):  # a progressive start-of-frame
            raise RuntimeError("nvjpeg: progressive JPEGs are not supported")
        return plain(datas, device)

    monkeypatch.setattr(data.device_decode, "jpeg_decoder", lambda: ("picky", picky))
    kw = dict(batch_size=5, num_workers=0, image_size=32, augment=TrainAugment(scale=(0.5, 1.0), hflip=0.0), seed=2)
    loader = build_train_loader(shards, **kw, decode_on="cpu")
    with caplog.at_level(logging.WARNING):
        (images, labels), = epoch(loader)
    assert loader.cpu_fallbacks == 1 and loader.bad_samples == 1 and images.shape == (5, 3, 32, 32)
    assert any("4.JPEG" in r.getMessage() for r in caplog.records), caplog.text
    # the four decodable images as the CPU path makes them; the hollow one's place taken by the first
    cpu = build_train_loader(shards, **kw)
    (cpu_images, _), = epoch(cpu)
    assert cpu.bad_samples == 1
    assert torch.equal(images, cpu_images)


def _operator_calls(batch) -> int:
    """aten (and torchvision) operator calls that do work, views left out, of decoding ``batch`` on the CPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from data.pipeline import BadSampleCounter

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += not func.is_view
            return func(*args, **(kwargs or {}))

    decoder = data.device_decode.DeviceDecoder("cpu", BadSampleCounter(0.5), train=True)
    with Count():
        decoder(batch)
    return Count.calls


def test_the_tail_after_decoding_is_a_few_calls_per_batch_not_per_image():
    """On a GPU each call is a kernel launched from one Python thread. Per image: the decode (one batched call
    on CUDA, one per image on the CPU), the crop's copy into the resizer's layout, the resize; the flips and the
    copy into the batch are a few calls for the whole batch."""
    from torchvision.transforms import InterpolationMode

    from data.device_decode import EncodedBatch
    from data.transforms import Plan

    def batch(n):
        jpegs = [io.BytesIO() for _ in range(n)]
        for k, out in enumerate(jpegs):
            photo(k, 60, 50).save(out, "JPEG", quality=90)
        plans = [Plan(out.getvalue(), (k % 5, k % 7, 40, 45), k % 2 == 1, InterpolationMode.BILINEAR)
                 for k, out in enumerate(jpegs)]
        return EncodedBatch.pack(plans, [0] * n, [{"__key__": str(k)} for k in range(n)], size=16, resize=0)

    small, large = _operator_calls(batch(8)), _operator_calls(batch(24))
    assert (large - small) / 16 <= 3  # before: 4.5 (a copy into the batch per image, a flip per flipped one)
    assert small <= 8 * 3 + 12  # and about ten for the batch


def test_nvimgcodec_gpu_decoder_that_cannot_load_gives_way_with_one_line_saying_why(monkeypatch, caplog):
    """On the CPU the device decoder is jpeg_decoder's; asked for CUDA where nvImageCodec's GPU backend cannot load
    (here: no GPU, no driver) it falls back to it with one warning, and the run goes on."""
    from data import region_decode

    assert data.device_decode.device_jpeg_decoder(torch.device("cpu"))[0] in ("torchcodec", "torchvision")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: its decoder loads (the nvJPEG test below)")
    monkeypatch.setattr(region_decode, "available", lambda: True)  # installed or not: the GPU part must fail here
    with caplog.at_level(logging.WARNING, logger="data.device_decode"):
        name, decode = data.device_decode.device_jpeg_decoder(torch.device("cuda"))
    assert name == data.device_decode.jpeg_decoder()[0]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "nvImageCodec's GPU decoder is not used" in lines[0] and name in lines[0], lines


def test_the_gpu_decoder_is_checked_on_a_probe_image_against_libjpeg_turbo():
    """nvImageCodec without the nvJPEG of its CUDA version refuses every image; a decoder that returns wrong
    pixels must not be used either."""
    cpu = data.device_decode._torchvision_decoder()
    data.device_decode._probe(cpu, torch.device("cpu"))  # libjpeg-turbo itself passes
    with pytest.raises(RuntimeError, match="differs"):
        data.device_decode._probe(lambda datas, device: [255 - x for x in cpu(datas, device)], torch.device("cpu"))


def test_torchcodec_decodes_where_it_is_installed_and_torchvision_elsewhere(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchcodec", None)  # not installed: its import fails
    assert data.device_decode.jpeg_decoder()[0] == "torchvision"
    calls = []
    fake = types.ModuleType("torchcodec.decoders")
    fake.decode_jpeg = lambda datas, mode, device: calls.append((len(datas), mode, device)) or []
    monkeypatch.setitem(sys.modules, "torchcodec", types.ModuleType("torchcodec"))
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", fake)
    name, decode = data.device_decode.jpeg_decoder()
    decode([torch.zeros(4, dtype=torch.uint8)] * 3, torch.device("cpu"))
    assert name == "torchcodec" and calls == [(3, "RGB", torch.device("cpu"))]  # one call for the whole batch


def test_decode_device_refuses_augmentations_that_need_decoded_images():
    with pytest.raises(ValueError, match="RandAugment"):
        PlanCrop(train_transform(32, TrainAugment(auto_augment="rand-m9-mstd0.5")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a GPU: runs where one is lent")
def test_nvjpeg_batches_match_the_cpu_path_within_the_stated_tolerance(photo_shards):
    """On CUDA: nvJPEG's decode and torch's float resize against libjpeg-turbo and the uint8 resize; the same
    labels, and per image at most 2 levels of 255 on average (8 where the CPU path decodes at reduced scale)."""
    kw = dict(batch_size=8, num_workers=2, image_size=64, augment=AUG, seed=5)
    cpu = epoch(build_train_loader(photo_shards, **kw))
    loader = build_train_loader(photo_shards, **kw, decode_on="cuda")
    device = epoch(loader)
    assert loader.cpu_fallbacks == 0 and len(device) == len(cpu) == 4
    for (xc, yc), (xd, yd) in zip(cpu, device):
        assert xd.is_cuda and torch.equal(yc, yd.cpu()) and xd.is_contiguous(memory_format=torch.channels_last)
        assert (xc.int() - xd.cpu().int()).abs().float().flatten(1).mean(1).max() <= 8
    val_cpu = epoch(build_val_loader(photo_shards, batch_size=5, num_workers=0, image_size=224, resize=256))
    val = epoch(build_val_loader(photo_shards, batch_size=5, num_workers=0, image_size=224, resize=256,
                                 decode_on="cuda"))
    for (xc, yc), (xd, yd) in zip(val_cpu, val):
        assert torch.equal(yc, yd.cpu()) and (xc.int() - xd.cpu().int()).abs().float().flatten(1).mean(1).max() <= 2
