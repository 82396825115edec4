"""The loaders (data/pipeline.py, data/validation.py, data/sources.py, data/transforms.py) on tiny shards
written by our writer.

Every image is one flat colour that encodes its sample id, so the id survives JPEG, random crops and
resizing, and the tests can tell exactly which samples each rank and worker produced.
"""

import io
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

import data.pipeline
from data import DataError, TrainAugment, build_train_loader, build_val_loader
from data.shards import WriterConfig, write_dataset
from data.transforms import jpeg_size, train_transform, val_transform

NUM_CLASSES = 3
TRAIN_IDS = range(0, 60)  # 12 shards of 5
VAL_IDS = range(100, 123)  # 5 shards of 5, the last one 3: fewer shards than 3 ranks x 2 workers
SIZE = 16
AUG = TrainAugment(scale=(0.3, 1.0), hflip=0.5)


def _colour(i: int):
    return ((i % 16) * 16 + 8, (i // 16) * 16 + 8, 128)


def _ids(images: torch.Tensor) -> list[int]:
    mean = images[:, :2].float().mean(dim=(2, 3))
    return [int(round((r - 8) / 16)) + 16 * int(round((g - 8) / 16)) for r, g in mean.tolist()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    for split, ids in (("train", TRAIN_IDS), ("val", VAL_IDS)):
        for i in ids:
            path = root / split / f"c{i % NUM_CLASSES}" / f"{i:03d}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (24, 20), _colour(i)).save(path, quality=95)
    write_dataset(root / "out", root / "train", root / "val", cfg=WriterConfig(shard_size=5))
    return root / "out"


def _train(source, **kw):
    args = dict(batch_size=4, num_workers=0, image_size=SIZE, augment=AUG, seed=0) | kw
    return build_train_loader(source, **args)


def _epoch(loader, epoch=None, start=0):
    if epoch is not None:
        loader.set_epoch(epoch, start)
    return [(x.clone(), y.clone()) for x, y in loader]


# decode_on="cpu": decode='device' with the CPU as the device (data/device_decode.py), which must keep every
# guarantee of the loaders: the tests below run both ways
DECODE = pytest.mark.parametrize("decode_on", [None, "cpu"], ids=["workers-decode", "device-decode"])


@DECODE
@pytest.mark.parametrize("workers", [0, 2])
def test_batches_are_uint8_images_with_the_right_labels(shards, workers, decode_on):
    loader = _train(shards, num_workers=workers, decode_on=decode_on)
    assert (len(loader), loader.num_samples, loader.num_classes, loader.batch_size) == (15, 60, 3, 4)
    batches = _epoch(loader)
    assert len(batches) == 15
    for x, y in batches:
        assert x.dtype == torch.uint8 and x.shape == (4, 3, SIZE, SIZE) and y.dtype == torch.int64
        assert x.is_contiguous(memory_format=torch.channels_last)  # as the transforms make them: no transpose
        assert [i % NUM_CLASSES for i in _ids(x)] == y.tolist()
    ids = [i for x, _ in batches for i in _ids(x)]
    assert sorted(ids) == list(TRAIN_IDS)  # 60 samples, 15 x 4: one full pass, nothing repeated


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_rank_gets_the_same_number_of_full_training_batches(shards, world_size, workers):
    expected = len(TRAIN_IDS) // (4 * world_size)
    counts, ids = [], []
    for rank in range(world_size):
        loader = _train(shards, num_workers=workers, rank=rank, world_size=world_size)
        batches = _epoch(loader)
        assert len(loader) == expected
        counts.append(len(batches))
        assert all(x.shape[0] == 4 for x, _ in batches)
        ids += [i for x, _ in batches for i in _ids(x)]
    assert counts == [expected] * world_size
    assert len(set(ids)) == len(ids) == expected * 4 * world_size  # no sample twice in an epoch


def shards_of(root: Path, split: str) -> list[str]:
    return json.loads((root / "_info.json").read_text())["splits"][split]["filenames"]


@DECODE
@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_validation_sample_is_read_by_exactly_one_rank(shards, world_size, workers, decode_on):
    per_rank = []
    for rank in range(world_size):
        loader = build_val_loader(shards, batch_size=4, num_workers=workers, rank=rank, world_size=world_size,
                                  image_size=SIZE, crop_pct=1.0, decode_on=decode_on)
        batches = _epoch(loader)
        assert len(batches) == len(loader)
        assert loader.num_samples == len(VAL_IDS)
        ids = [i for x, _ in batches for i in _ids(x)]
        assert [y for _, ys in batches for y in ys.tolist()] == [i % NUM_CLASSES for i in ids]
        assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in batches)
        per_rank.append(ids)
    everything = [i for ids in per_rank for i in ids]
    assert sorted(everything) == list(VAL_IDS)  # union is the split, and no id twice


@pytest.mark.parametrize("world_size, workers", [(4, 2), (3, 1), (2, 2)])
def test_validation_is_dealt_in_equal_shares_whatever_the_shard_count(shards, world_size, workers):
    """23 images in 5 shards for 4 ranks x 2 workers: dealing whole shards gave the ranks 10, 10, 3 and 0."""
    counts = []
    for rank in range(world_size):
        loader = build_val_loader(shards, batch_size=4, num_workers=workers, rank=rank, world_size=world_size,
                                  image_size=SIZE, crop_pct=1.0)
        batches = _epoch(loader)
        assert len(batches) == len(loader)
        counts.append(sum(len(y) for _, y in batches))
    assert sum(counts) == len(VAL_IDS) and max(counts) - min(counts) <= 1, counts


def test_shard_order_changes_every_epoch_and_repeats_for_the_same_seed(shards):
    loader = _train(shards, num_workers=2)  # persistent workers: the epoch must still reach them
    first = [_ids(x) for x, _ in _epoch(loader, 0)]
    second = [_ids(x) for x, _ in _epoch(loader, 1)]
    assert first != second
    assert sorted(sum(first, [])) == sorted(sum(second, []))
    again = _train(shards, num_workers=2)
    assert [_ids(x) for x, _ in _epoch(again, 1)] == second
    other_seed = _train(shards, num_workers=2, seed=1)
    assert [_ids(x) for x, _ in _epoch(other_seed, 1)] != second
    # without set_epoch, the next iteration is the next epoch
    assert [_ids(x) for x, _ in _epoch(again)] == [_ids(x) for x, _ in _epoch(_train(shards, num_workers=2), 2)]


def test_same_seed_gives_identical_batches_including_augmentation(shards):
    a = _epoch(_train(shards, num_workers=2, world_size=2, rank=1, augment=TrainAugment(color_jitter=0.4)), 3)
    b = _epoch(_train(shards, num_workers=2, world_size=2, rank=1, augment=TrainAugment(color_jitter=0.4)), 3)
    assert len(a) == len(b) == 7
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


@DECODE
@pytest.mark.parametrize("workers, start", [(0, 5), (2, 3), (2, 6), (2, 14), (2, 15)])
def test_set_epoch_with_start_batch_yields_the_tail_of_the_full_epoch(shards, workers, start, decode_on):
    # a real crop and colour jitter (a flip on the device, which takes no jitter), so the check covers
    # augmentation too
    aug = TrainAugment(scale=(0.08, 1.0), **({"color_jitter": 0.4} if decode_on is None else {"hflip": 0.5}))
    full = _epoch(_train(shards, num_workers=workers, augment=aug, decode_on=decode_on), 4)
    resumed = _train(shards, num_workers=workers, augment=aug, decode_on=decode_on)
    tail = _epoch(resumed, 4, start)
    assert len(tail) == len(full) - start
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(full[start:], tail))
    assert len(_epoch(resumed)) == len(full)  # the resume applies to that one iteration only


def _write_shard(path: Path, samples: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False, mtime=0) as sink:
        for s in samples:
            sink.write(s)


@pytest.fixture
def corrupt_shards(shards, tmp_path) -> Path:
    """Our shards, with a garbage image and a sample without 'cls' added to the first training shard."""
    out = tmp_path / "corrupt"
    shutil.copytree(shards, out)
    first = out / shards_of(shards, "train")[0]
    with wds.WebDataset(str(first), shardshuffle=False) as ds:
        samples = [{k: v for k, v in s.items() if k != "__url__"} for s in ds]
    samples += [{"__key__": "bad-jpeg", "jpg": b"not a jpeg", "cls": b"1"},
                {"__key__": "no-cls", "jpg": samples[0]["jpg"]}]
    _write_shard(first, samples)
    info = json.loads((out / "_info.json").read_text())
    info["splits"]["train"]["shard_lengths"][0] += 2
    info["splits"]["train"]["num_samples"] += 2
    (out / "_info.json").write_text(json.dumps(info))
    return out


@DECODE
def test_corrupt_samples_are_skipped_with_a_warning_and_counted(corrupt_shards, caplog, decode_on):
    loader = _train(corrupt_shards, batch_size=2, decode_on=decode_on)  # 62 samples: 31 batches, all read
    with caplog.at_level(logging.WARNING, logger="data.pipeline"):
        batches = _epoch(loader)
    assert len(batches) == 31 and all(x.shape[0] == 2 for x, _ in batches)
    assert loader.bad_samples == 2
    shard = str(corrupt_shards / shards_of(corrupt_shards, "train")[0])
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert any("bad-jpeg" in w and shard in w for w in warnings)
    assert any("no-cls" in w and shard in w for w in warnings)


@DECODE
def test_corrupt_samples_are_counted_across_worker_processes(corrupt_shards, decode_on):
    loader = _train(corrupt_shards, batch_size=2, num_workers=2, decode_on=decode_on)
    assert len(_epoch(loader)) == 31
    assert loader.bad_samples == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_too_many_corrupt_samples_stop_the_run_naming_the_shard(corrupt_shards, monkeypatch, workers):
    monkeypatch.setattr(data.pipeline, "MIN_SAMPLES_FOR_BAD_RATE", 10)
    loader = _train(corrupt_shards, batch_size=2, num_workers=workers, max_bad_fraction=0.01)
    with pytest.raises(DataError) as err:
        _epoch(loader)
    message = str(err.value)
    assert "\n" not in message and message.startswith("too many corrupt samples")
    assert str(corrupt_shards / shards_of(corrupt_shards, "train")[0]) in message


def test_source_as_brace_pattern_reads_the_manifest_beside_the_shards(shards):
    loader = _train(str(shards / "train-{000000..000003}.tar"), num_workers=0)
    assert (loader.num_samples, len(loader)) == (20, 5)
    assert len(_epoch(loader)) == 5
    val = build_val_loader(f"pipe:cat {shards}/val-{{000000..000004}}.tar", info=str(shards / "_info.json"),
                           batch_size=8, num_workers=0, image_size=SIZE)
    assert sorted(i for x, _ in _epoch(val) for i in _ids(x)) == list(VAL_IDS)


def test_missing_files_raise_before_training_naming_the_file(shards, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    (broken / shards_of(shards, "train")[3]).unlink()
    with pytest.raises(DataError, match=f"shard not found: {broken}/train-000003.tar"):
        _train(broken)
    (broken / "classes.txt").unlink()
    with pytest.raises(DataError, match=f"class list not found: {broken}/classes.txt"):
        build_val_loader(broken, batch_size=4, num_workers=0)
    (broken / "_info.json").unlink()
    with pytest.raises(DataError, match=f"shard manifest not found: {broken}/_info.json"):
        _train(broken)
    with pytest.raises(DataError, match=f"shard manifest not found: {tmp_path}/_info.json"):
        _train(str(tmp_path / "train-{000000..000001}.tar"))
    with pytest.raises(DataError, match="pass info="):
        _train("pipe:cat train-000000.tar")


def test_a_missing_folder_is_named_as_such_not_as_a_missing_manifest_inside_it(tmp_path):
    """The one rule for "is this a local path" is data.sources'; the trainer relies on it for --data-dir."""
    for source in (tmp_path / "nowhere", str(tmp_path / "nowhere"), f"file:{tmp_path}/nowhere"):
        with pytest.raises(DataError, match=f"^no such shard folder or file: {tmp_path}/nowhere "):
            _train(source)
    with pytest.raises(DataError, match="shard manifest not found"):  # a pattern: its shards may be remote
        _train(str(tmp_path / "nowhere" / "train-{000000..000001}.tar"))


def test_fewer_shards_than_ranks_times_workers_still_gives_equal_steps_without_repeats(shards):
    source = str(shards / "train-{000000..000001}.tar")  # 2 shards, 10 samples, for 2 ranks x 2 workers
    ids = []
    for rank in range(2):
        batches = _epoch(_train(source, batch_size=2, num_workers=2, world_size=2, rank=rank))
        assert len(batches) == 2
        ids += [i for x, _ in batches for i in _ids(x)]
    assert len(set(ids)) == len(ids) == 8


def test_fewer_samples_than_one_global_batch_is_refused(shards):
    with pytest.raises(DataError, match="fewer than one global batch"):
        _train(shards, batch_size=32, world_size=2)


def _encoded(img: Image.Image, fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_jpeg_header_size_matches_pil():
    img = Image.new("RGB", (37, 23), (1, 2, 3))
    exif = Image.Exif()
    exif[0x010E] = "x" * 3000  # a large APP1 segment before the frame header
    for data in (_encoded(img), _encoded(img, progressive=True), _encoded(img, exif=exif.tobytes()),
                 _encoded(img.convert("L")), _encoded(img.convert("CMYK"))):
        assert jpeg_size(data) == (37, 23)
    assert jpeg_size(_encoded(img, "PNG")) is None


def test_train_transform_paths_agree_and_accept_non_jpeg():
    import random

    photo = Image.radial_gradient("L").resize((300, 200)).convert("RGB")  # smooth: compares resamplers
    data = _encoded(photo, quality=95)
    fast, plain = train_transform(64, TrainAugment()), train_transform(64, TrainAugment())
    assert fast.transforms[0].tensor_output
    plain.transforms[0].tensor_output = False  # PIL decode and resize, same random crop
    for seed in range(5):
        random.seed(seed), torch.manual_seed(seed)
        a = fast(data)
        random.seed(seed), torch.manual_seed(seed)
        b = plain(data)
        assert a.shape == b.shape == (3, 64, 64) and a.dtype == b.dtype == torch.uint8
        assert (a.float() - b.float()).abs().mean() < 2
    png = train_transform(64, TrainAugment())(_encoded(photo, "PNG"))
    assert png.shape == (3, 64, 64) and png.dtype == torch.uint8


@pytest.mark.parametrize("resize, crop", [(256, 224), (232, 224), (36, 32), (73, 64)])
def test_val_transform_resizes_to_exactly_the_size_asked_then_centre_crops(resize, crop):
    import torchvision.transforms.v2.functional as F2

    photo = Image.radial_gradient("L").resize((400, 300)).convert("RGB")
    data = _encoded(photo, "PNG")  # lossless: the reference sees the same pixels
    tf = val_transform(crop, 0.875, resize)
    assert (tf.transforms[0].size, tf.transforms[1].size) == (resize, resize)  # the decoder's draft, timm's Resize
    expected = F2.pil_to_tensor(F2.center_crop(F2.resize(photo, [resize], antialias=True), [crop]))
    assert torch.equal(tf(data), expected)


WORKERS_UNDER_SIGNALS = """
import signal, subprocess, sys
import psutil
from data import build_train_loader, TrainAugment
loader = build_train_loader(sys.argv[1], batch_size=4, num_workers=2, image_size=16, augment=TrainAugment())
it = iter(loader)
next(it)
workers = psutil.Process().children()
for sig in ("TERM", "INT", "USR1"):  # from another process, as SLURM or a terminal sends them
    subprocess.run(["kill", f"-{sig}", *(str(w.pid) for w in workers)], check=True)
print("batches after the signals:", 1 + sum(1 for _ in it), flush=True)
it = iter(loader)
next(it)  # left mid-epoch: interpreter exit must still end the workers (multiprocessing SIGTERMs them)
"""


def test_loader_workers_leave_stop_signals_to_their_process_and_still_end_with_it(shards):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", WORKERS_UNDER_SIGNALS, str(shards)], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr
    assert "batches after the signals: 15" in proc.stdout and "killed by signal" not in proc.stderr


@pytest.mark.parametrize("interpolation, expected", [("bicubic", "BICUBIC"), ("bilinear", "BILINEAR"),
                                                     ("random", "BILINEAR")])
def test_evaluation_resizes_with_the_training_interpolation_as_timm_does(interpolation, expected):
    """It resized bilinear whatever --interpolation said."""
    import torchvision.transforms.v2.functional as F2
    from torchvision.transforms import InterpolationMode

    photo = Image.radial_gradient("L").resize((400, 300)).convert("RGB")
    tf = val_transform(64, 0.875, 73, interpolation)
    mode = getattr(InterpolationMode, expected)
    assert tf.transforms[1].interpolation == mode
    reference = F2.pil_to_tensor(F2.center_crop(F2.resize(photo, [73], interpolation=mode, antialias=True), [64]))
    assert torch.equal(tf(_encoded(photo, "PNG")), reference)
