"""engine.config: one declaration per option gives the parser, the recipe keys and the checks."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from conftest import ROOT
from engine.config import build_parser, parse_config
from engine.options import GROUPS


def test_every_flag_is_a_recipe_key_and_every_option_has_help():
    parser = build_parser()
    flags = {a.dest for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    declared = {f.name for group in GROUPS.values() for f in dataclasses.fields(group)}
    assert flags == declared
    assert all(a.help for a in parser._actions if a.dest in declared), "every option says what it does"


def test_each_group_holds_its_options_with_their_defaults():
    cfg = parse_config(["--synthetic", "--lr", "0.4", "--no-channels-last", "--milestones", "2", "4"])
    assert (cfg.optim.lr, cfg.model.channels_last, cfg.schedule.milestones) == (0.4, False, [2, 4])
    assert (cfg.data.image_size, cfg.runtime.precision, cfg.run.output_dir) == (224, None, "runs/default")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0  # a part of the engine cannot change what another part reads


def test_the_written_config_is_a_recipe_that_gives_the_same_configuration(tmp_path):
    cfg = parse_config(["--config", str(ROOT / "launch/configs/digits_demo.yaml"), "--epochs", "3"])
    written = tmp_path / "config.yaml"
    written.write_text(yaml.safe_dump(cfg.flat(), sort_keys=True))
    assert parse_config(["--config", str(written)]) == cfg


@pytest.mark.parametrize("line, message", [
    ("momentum: fast", "momentum must be a number, got 'fast'"),  # was argparse's, naming neither file nor key
    ("epochs: ten", "epochs must be an integer >= 1, got 'ten'"),
    ("momentum: [0.9]", "momentum must be a number, got [0.9]"),
    ("workers: 2.5", "workers must be an integer >= 0, got 2.5"),
    ("channels-last: 1", "channels-last must be true or false, got 1"),
    ("scale: [0.5]", "scale must be a list of floats, got [0.5]"),
    ("train-split: null", "train-split must be a string, got None"),
])
def test_a_recipe_value_of_the_wrong_type_is_one_line_naming_the_file_and_key(tmp_path, capsys, line, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(line + "\n")
    with pytest.raises(SystemExit) as e:
        parse_config(["--synthetic", "--config", str(recipe)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"error: {recipe}: {message} (see --help)" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_a_recipe_that_sets_nothing_is_refused(tmp_path, capsys, text):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    with pytest.raises(SystemExit):
        parse_config(["--synthetic", "--config", str(recipe)])
    err = capsys.readouterr().err
    assert f"error: recipe {recipe} sets nothing (it is empty, or only comments)" in err and err.count("\n") == 1


def test_an_unknown_recipe_key_suggests_the_closest_keys(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epoch: 10\n")
    with pytest.raises(SystemExit):
        parse_config(["--synthetic", "--config", str(recipe)])
    err = capsys.readouterr().err
    assert f"error: {recipe}: unknown key 'epoch'; did you mean epochs? (see --help)\n" in err
    assert "label_smoothing" not in err and err.count("\n") == 1  # not the ~75 keys any more
    recipe.write_text("learning-rate: 0.1\n")  # another trainer's name
    with pytest.raises(SystemExit):
        parse_config(["--synthetic", "--config", str(recipe)])
    assert "unknown key 'learning-rate'; did you mean lr?" in capsys.readouterr().err


def test_batch_size_one_is_refused_for_training_and_allowed_for_evaluation(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--synthetic", "--batch-size", "1"])
    err = capsys.readouterr().err
    assert "--batch-size 1: BatchNorm needs at least 2 images per process in training" in err
    assert parse_config(["--data-dir", "x", "--evaluate", "m.pt", "--batch-size", "1"]).optim.batch_size == 1


def test_a_recipe_that_is_not_a_mapping_is_refused(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- arch: resnet18\n")
    with pytest.raises(SystemExit):
        parse_config(["--synthetic", "--config", str(recipe)])
    assert "a recipe is a mapping of option names to values, not a list" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--evaluate", "model.pt"], "--evaluate needs --data-dir: the shards whose validation split it scores"),
    (["--evaluate", "model.pt", "--synthetic"], "--evaluate needs --data-dir"),
    (["--evaluate", "model.pt", "--synthetic", "--data-dir", "x"], "drop --synthetic"),
])
def test_evaluate_without_shards_is_one_clear_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err


def test_the_evaluation_resolution_defaults_to_the_training_one_and_must_cover_its_crop(capsys):
    cfg = parse_config(["--synthetic", "--image-size", "176"])
    assert (cfg.evaluation.crop(cfg.data.image_size), cfg.evaluation.val_resize) == (176, 0)
    cfg = parse_config(["--synthetic", "--image-size", "176", "--val-crop", "224", "--val-resize", "232"])
    assert cfg.evaluation.crop(cfg.data.image_size) == 224
    with pytest.raises(SystemExit):
        parse_config(["--synthetic", "--val-crop", "224", "--val-resize", "200"])
    assert "--val-resize 200 is smaller than the crop (224)" in capsys.readouterr().err


def test_decode_device_with_an_augmentation_of_decoded_images_is_one_clear_line(capsys):
    assert parse_config(["--synthetic", "--decode", "device"]).data.decode == "device"
    for flag in (["--auto-augment", "rand-m9-mstd0.5"], ["--color-jitter", "0.4"]):
        with pytest.raises(SystemExit):
            parse_config(["--synthetic", "--decode", "device", *flag])
        err = capsys.readouterr().err
        assert "use --decode cpu with them" in err and err.count("\n") == 1, err

