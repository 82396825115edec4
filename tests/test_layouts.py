"""The input layouts make-shards reads (data/layouts.py): empty class folders, flat folders."""

import json

from data.make_shards import main as make_shards
from test_shards import CLASSES, _jpeg, _tree


def test_an_empty_class_folder_is_left_out_with_a_warning_unless_kept(tmp_path, capsys):
    _tree(tmp_path / "train", 2)
    (tmp_path / "train" / "n00000000").mkdir()  # sorts first: as a class it would shift every index
    args = ["--train-dir", str(tmp_path / "train"), "--workers", "1"]
    assert make_shards(args + ["--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert captured.err == (f"warning: class folder {tmp_path / 'train' / 'n00000000'} holds no files: left out "
                            "of the classes (--keep-empty-classes keeps it)\n")
    assert captured.out == "train: 6 written in 1 shards, 0 skipped; 1 empty class folder(s) left out\n"
    assert (tmp_path / "out" / "classes.txt").read_text().split() == CLASSES
    assert make_shards(args + ["--out", str(tmp_path / "kept"), "--keep-empty-classes"]) == 0
    assert json.loads((tmp_path / "kept" / "_info.json").read_text())["num_classes"] == 4


def test_a_flat_val_folder_without_labels_names_the_flag_and_formats(tmp_path, capsys):
    _tree(tmp_path / "train", 1)
    for i in range(3):
        _jpeg(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", (0, 0, 0))
    code = make_shards(["--val-dir", str(tmp_path / "val"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: no class folders in {tmp_path / 'val'}, only 3 files (expected ")
    assert "; a flat folder of images needs --val-labels FILE: '<filename> <synset or 0-based index>' lines" in err
    assert "LOC_val_solution.csv" in err and "ILSVRC2012_validation_ground_truth.txt" in err
