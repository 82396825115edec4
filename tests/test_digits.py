"""The digits demo data (data/digits.py): folders, shards, idempotence, and the demo's loader settings."""

import io
import json
import tarfile

import sklearn  # noqa: F401  (a declared test dependency: missing, it is an error, never a skip)
from PIL import Image

from data import TrainAugment, build_train_loader, build_val_loader
from data.digits import main


def test_digits_demo_data(tmp_path, capsys):
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'shards'}"
    shards = tmp_path / "shards"
    info = json.loads((shards / "_info.json").read_text())["splits"]
    assert (info["train"]["num_samples"], info["val"]["num_samples"]) == (1437, 360)
    assert len(info["train"]["filenames"]) == 12 and info["train"]["shard_lengths"][0] == 128
    assert (shards / "classes.txt").read_text().split() == [str(d) for d in range(10)]
    raw = sorted((tmp_path / "raw" / "val" / "7").iterdir())
    assert len(raw) == 36 and Image.open(raw[0]).mode == "L"  # greyscale in ...
    with tarfile.open(shards / "val-000000.tar") as tar:
        jpg = tar.extractfile(tar.getmember("00000000.jpg")).read()
    assert Image.open(io.BytesIO(jpg)).mode == "RGB"  # ... RGB out
    # the demo trainer's settings: 32 px, no flip, no crop margin
    train = build_train_loader(shards, batch_size=64, num_workers=0, image_size=32,
                               augment=TrainAugment(scale=(0.6, 1.0), hflip=0.0))
    x, y = next(iter(train))
    assert x.shape == (64, 3, 32, 32) and len(train) == 1437 // 64 and set(y.tolist()) <= set(range(10))
    val = build_val_loader(shards, batch_size=100, num_workers=0, image_size=32, crop_pct=1.0)
    assert sum(len(y) for _, y in val) == 360

    before = (shards / "train-000000.tar").stat().st_mtime_ns
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"already complete: {tmp_path / 'shards'}"
    assert (shards / "train-000000.tar").stat().st_mtime_ns == before

