"""The shard writer (data/shards.py, CLI data/make_shards.py) on small image trees made here with PIL."""

import io
import os
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data import DataError
from data.errors import OutputExists
from data.make_shards import main as make_shards
from data.shards import WriterConfig, write_dataset

CLASSES = ["n01000001", "n01000002", "n01000003"]


def _jpeg(path: Path, colour, size=(40, 30), mode="RGB", fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, format=fmt)


def _tree(root: Path, per_class: int) -> dict[str, int]:
    """root/<synset>/<synset>_<i>.JPEG; returns {relative path: class index}."""
    labels = {}
    for c, synset in enumerate(CLASSES):
        for i in range(per_class):
            rel = f"{synset}/{synset}_{i}.JPEG"
            _jpeg(root / rel, (40 * c, 5 * i, 100))
            labels[rel] = c
    return labels


def read_tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """Independent of webdataset: group tar members by key."""
    samples = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def read_split(out: Path, split: str) -> list[dict[str, bytes]]:
    info = json.loads((out / "_info.json").read_text())["splits"][split]
    samples = []
    for name, n in zip(info["filenames"], info["shard_lengths"]):
        shard = read_tar_samples(out / name)
        assert len(shard) == n, f"{name}: manifest says {n} samples, the tar holds {len(shard)}"
        samples += shard.values()
    assert len(samples) == info["num_samples"]
    return samples


def test_round_trip_counts_labels_and_names(tmp_path):
    train, val = _tree(tmp_path / "train", 7), _tree(tmp_path / "val", 2)
    out = tmp_path / "out"
    results = write_dataset(out, tmp_path / "train", tmp_path / "val", cfg=WriterConfig(shard_size=4))
    assert [(r.name, r.num_samples, len(r.skipped)) for r in results] == [("train", 21, 0), ("val", 6, 0)]
    assert (out / "classes.txt").read_text().split() == CLASSES
    info = json.loads((out / "_info.json").read_text())
    assert info["splits"]["train"]["filenames"] == [f"train-{i:06d}.tar" for i in range(6)]
    assert info["splits"]["train"]["shard_lengths"] == [4, 4, 4, 4, 4, 1]
    for split, expected in (("train", train), ("val", val)):
        got = {s["fname.txt"].decode(): int(s["cls"]) for s in read_split(out, split)}
        assert got == expected
    # the training split is written shuffled (classes mixed within shards), validation in file order
    first_shard = read_tar_samples(out / "train-000000.tar").values()
    assert len({s["cls"] for s in first_shard}) > 1
    assert [s["fname.txt"].decode() for s in read_split(out, "val")] == sorted(val)


def test_same_input_gives_byte_identical_output(tmp_path, monkeypatch):
    monkeypatch.setattr("data.shards.ENCODE_WINDOW", 4)  # several windows of pool work, in order
    _tree(tmp_path / "train", 5)
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        write_dataset(out, tmp_path / "train", cfg=WriterConfig(shard_size=4, workers=workers))
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outs[0] == outs[1]
    with tarfile.open(tmp_path / "out1" / "train-000000.tar") as tar:
        assert {m.mtime for m in tar.getmembers()} == {0}


def test_odd_files_are_converted_or_skipped_and_reported(tmp_path):
    root = tmp_path / "train"
    _tree(root, 1)
    syn = CLASSES[0]
    _jpeg(root / syn / "cmyk.JPEG", (0, 255, 255, 0), mode="CMYK")
    _jpeg(root / syn / "grey.JPEG", 128, mode="L")
    _jpeg(root / syn / "png.JPEG", (255, 0, 0, 128), mode="RGBA", fmt="PNG")
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / syn / "truncated.JPEG").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / syn / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    [result] = write_dataset(out, root, cfg=WriterConfig(shard_size=100))
    samples = {s["fname.txt"].decode(): s for s in read_split(out, "train")}
    for name in ("cmyk.JPEG", "grey.JPEG", "png.JPEG"):
        img = Image.open(io.BytesIO(samples[f"{syn}/{name}"]["jpg"]))
        assert (img.format, img.mode) == ("JPEG", "RGB"), name
    # PNG transparency is flattened onto white: half-transparent red becomes light red
    red = Image.open(io.BytesIO(samples[f"{syn}/png.JPEG"]["jpg"])).getpixel((5, 5))
    assert red[0] > 240 and 110 < red[1] < 145, red
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert sorted(e["path"] for e in skipped) == [str(root / syn / "notes.txt"), str(root / syn / "truncated.JPEG")]
    assert all(e["split"] == "train" for e in skipped)
    assert json.loads((out / "_info.json").read_text())["splits"]["train"]["num_skipped"] == 2
    assert result.num_samples == 3 + 3


def test_max_side_reencodes_large_images_only(tmp_path):
    root = tmp_path / "train"
    _jpeg(root / "a" / "big.JPEG", (10, 20, 30), size=(200, 100))
    _jpeg(root / "a" / "small.JPEG", (10, 20, 30), size=(50, 40))
    out = tmp_path / "out"
    write_dataset(out, root, cfg=WriterConfig(max_side=64, quality=80))
    samples = {s["fname.txt"].decode(): s for s in read_split(out, "train")}
    assert Image.open(io.BytesIO(samples["a/big.JPEG"]["jpg"])).size == (64, 32)
    assert samples["a/small.JPEG"]["jpg"] == (root / "a" / "small.JPEG").read_bytes()  # stored untouched


@pytest.mark.parametrize("label_style", ["synset", "index", "kaggle_csv"])
def test_flat_val_folder_with_label_file(tmp_path, label_style):
    _tree(tmp_path / "train", 1)
    val = tmp_path / "val"
    truth = {f"ILSVRC2012_val_{i:08d}.JPEG": i % 3 for i in range(1, 8)}
    for name, c in truth.items():
        _jpeg(val / name, (40 * c, 0, 0))
    _jpeg(val / "unlabelled.JPEG", (0, 0, 0))
    if label_style == "kaggle_csv":  # names without extension, the synset first among box coordinates
        text = "ImageId,PredictionString\n" + "".join(
            f"{n.split('.')[0]},{CLASSES[c]} 1 2 30 40 {CLASSES[c]} 5 6 7 8\n" for n, c in truth.items())
    else:
        label = (lambda c: CLASSES[c]) if label_style == "synset" else str
        text = "".join(f"{n} {label(c)}\n" for n, c in truth.items())
    (tmp_path / "val.txt").write_text(text)
    out = tmp_path / "out"
    code = make_shards(["--train-dir", str(tmp_path / "train"), "--val-dir", str(val),
                        "--val-labels", str(tmp_path / "val.txt"), "--out", str(out), "--workers", "1"])
    assert code == 0
    got = {s["fname.txt"].decode(): int(s["cls"]) for s in read_split(out, "val")}
    assert got == truth
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [(e["path"], e["reason"]) for e in skipped] == [(str(val / "unlabelled.JPEG"), "no label in the label file")]


def test_flat_val_folder_with_devkit_ground_truth(tmp_path):
    import scipy.io as sio  # scikit-learn's dependency, so part of the test extras: never a skip
    _tree(tmp_path / "train", 1)
    devkit = tmp_path / "devkit"
    devkit.mkdir()
    # the devkit numbers synsets in its own order, not sorted: id 1 is the last class here
    ids = {CLASSES[2]: 1, CLASSES[0]: 2, CLASSES[1]: 3}
    synsets = np.array([(i, w, 0) for w, i in ids.items()],
                       dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("num_children", "O")])
    sio.savemat(devkit / "meta.mat", {"synsets": synsets})
    truth = {f"ILSVRC2012_val_{i:08d}.JPEG": (i * 2) % 3 for i in range(1, 7)}
    for name, c in truth.items():
        _jpeg(tmp_path / "val" / name, (40 * c, 0, 0))
    gt = devkit / "ILSVRC2012_validation_ground_truth.txt"
    gt.write_text("".join(f"{ids[CLASSES[c]]}\n" for c in truth.values()))
    out = tmp_path / "out"
    write_dataset(out, tmp_path / "train", tmp_path / "val", gt)
    assert {s["fname.txt"].decode(): int(s["cls"]) for s in read_split(out, "val")} == truth


def test_existing_output_is_refused_unless_overwrite(tmp_path, capsys):
    _tree(tmp_path / "train", 2)
    args = ["--train-dir", str(tmp_path / "train"), "--out", str(tmp_path / "out"), "--workers", "1"]
    assert make_shards(args) == 0
    capsys.readouterr()
    assert make_shards(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: output folder already holds train shards: {tmp_path / 'out'} "
                   "(pass --overwrite to replace them)")
    assert make_shards(args + ["--overwrite", "--shard-size", "1"]) == 0
    assert "train: 6 written in 6 shards, 0 skipped" in capsys.readouterr().out


def test_library_errors_name_its_parameters_not_the_cli_flags(tmp_path):
    _tree(tmp_path / "train", 1)
    with pytest.raises(DataError, match="^shard_size must be at least 1, got 0$"):
        write_dataset(tmp_path / "out", tmp_path / "train", cfg=WriterConfig(shard_size=0))
    with pytest.raises(DataError, match="^nothing to do: give train_dir and/or val_dir$"):
        write_dataset(tmp_path / "out")
    with pytest.raises(DataError, match=r"^val_labels \S+ needs val_dir"):
        write_dataset(tmp_path / "out", tmp_path / "train", val_labels=tmp_path / "labels.txt")
    write_dataset(tmp_path / "out", tmp_path / "train", cfg=WriterConfig(workers=1))
    with pytest.raises(OutputExists) as e:
        write_dataset(tmp_path / "out", tmp_path / "train", cfg=WriterConfig(workers=1))
    assert str(e.value) == f"output folder already holds train shards: {tmp_path / 'out'}"


@pytest.mark.parametrize("args, named", [
    (["--train-dir", "{tmp}/nowhere"], "{tmp}/nowhere"),
    (["--train-dir", "{tmp}/train", "--val-labels", "{tmp}/labels.txt"], "--val-labels {tmp}/labels.txt"),
    (["--train-dir", "{tmp}/train", "--shard-size", "0"], "--shard-size must be at least 1, got 0"),
    ([], "nothing to do: give --train-dir and/or --val-dir"),
    (["--train-dir", "{tmp}/train", "--val-dir", "{tmp}/train", "--val-labels", "{tmp}/labels.txt"],
     "{tmp}/labels.txt"),
])
def test_missing_input_is_one_line_naming_the_path(tmp_path, capsys, args, named):
    _tree(tmp_path / "train", 1)
    code = make_shards([a.format(tmp=tmp_path) for a in args] + ["--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and named.format(tmp=tmp_path) in err
    assert not (tmp_path / "out").exists()


def test_timm_wds_reader_reads_our_shards(tmp_path):
    from timm.data.readers.reader_wds import ReaderWds

    train = _tree(tmp_path / "train", 4)
    out = tmp_path / "out"
    write_dataset(out, tmp_path / "train", cfg=WriterConfig(shard_size=5))
    reader = ReaderWds(str(out), split="train", is_training=False)
    assert reader.num_samples == len(train)
    got = [(img.mode, img.size, target) for img, target in reader]
    assert len(got) == len(train)
    assert sorted(t for _, _, t in got) == sorted(train.values())
    assert {(m, s) for m, s, _ in got} == {("RGB", (40, 30))}


@pytest.mark.parametrize("flag, value, expected", [
    ("--max-side", "0", "--max-side must be at least 1, got 0"),  # was a ZeroDivisionError in the pool
    ("--max-side", "-5", "--max-side must be at least 1, got -5"),  # was "0 written ... 200 skipped", exit 0
    ("--quality", "150", "--quality must be between 1 and 100, got 150"),
    ("--workers", "0", "--workers must be at least 1, got 0"),
])
def test_numeric_options_out_of_range_are_one_line_and_write_nothing(tmp_path, capsys, flag, value, expected):
    _tree(tmp_path / "train", 1)
    code = make_shards(["--train-dir", str(tmp_path / "train"), "--out", str(tmp_path / "out"), flag, value])
    assert (code, capsys.readouterr().err) == (2, f"error: {expected}\n")
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="^max_side must be at least 1, got 0$"):
        write_dataset(tmp_path / "out", tmp_path / "train", cfg=WriterConfig(max_side=0))


def test_a_split_of_which_nothing_could_be_written_is_an_error(tmp_path, capsys):
    for i in range(3):
        (tmp_path / "train" / "a" / f"{i}.txt").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / "a" / f"{i}.txt").write_text("not an image")
    out = tmp_path / "out"
    code = make_shards(["--train-dir", str(tmp_path / "train"), "--out", str(out), "--workers", "1"])
    first = tmp_path / "train" / "a" / "0.txt"
    assert (code, capsys.readouterr().err) == (
        2, f"error: no train sample written from {tmp_path / 'train'}: all 3 files were skipped, the first: "
           f"{first}: not an image file PIL can read\n")
    assert sorted(p.name for p in out.iterdir()) == []  # no shard, no manifest: nothing looks complete


def test_skipped_list_round_trips_any_file_name(tmp_path):
    root = tmp_path / "train"
    _tree(root, 1)
    odd = root / CLASSES[0] / "two\nlines.JPEG"
    odd.write_text("not an image")
    # a name that is not UTF-8: a real image, written (its name's own bytes in fname.txt), and a bad one
    folder = os.fsencode(root / CLASSES[1])
    Image.new("RGB", (8, 8)).save(folder + b"/\xff.JPEG", format="JPEG")
    with open(folder + b"/\xfe.JPEG", "wb") as f:
        f.write(b"not an image")
    out = tmp_path / "out"
    write_dataset(out, root, cfg=WriterConfig(workers=1))
    paths = [json.loads(line)["path"] for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert sorted(map(os.fsencode, paths)) == sorted([os.fsencode(odd), folder + b"/\xfe.JPEG"])
    assert CLASSES[1].encode() + b"/\xff.JPEG" in {
        s["fname.txt"] for s in read_split(out, "train")}
