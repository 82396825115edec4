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
    ("momentum: fast", "argument --momentum: invalid float value: 'fast'"),  # argparse converts strings
    ("momentum: [0.9]", "--momentum must be a number, got [0.9]"),
    ("workers: 2.5", "--workers must be an integer >= 0, got 2.5"),
    ("channels-last: 1", "--channels-last must be true or false, got 1"),
    ("scale: [0.5]", "--scale must be a list of floats, got [0.5]"),
    ("train-split: null", "--train-split must be a string, got None"),
])
def test_a_recipe_value_of_the_wrong_type_is_one_line_naming_the_option(tmp_path, capsys, line, message):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(line + "\n")
    with pytest.raises(SystemExit) as e:
        parse_config(["--synthetic", "--config", str(recipe)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and err.count("\n") == 1, err


def test_a_recipe_that_is_not_a_mapping_is_refused(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- arch: resnet18\n")
    with pytest.raises(SystemExit, match="a recipe is a mapping of option names to values, not a list"):
        parse_config(["--synthetic", "--config", str(recipe)])


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

