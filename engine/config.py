"""The configuration of a run: defaults, then the ``--config`` YAML recipe, then the flags, checked.

Everything here is made from the declarations in engine/options.py: the parser (a flag per option, in its
group), the recipe reader (a recipe's keys are the option names, dashes or underscores) and the checks of
every value's type and lower bound, which argparse does not apply to values from a recipe.
"""

import argparse
import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import fields
from pathlib import Path

import yaml

from .options import GROUPS, Config


# ---------------------------------------------------------------------------------------- parsing


class Parser(argparse.ArgumentParser):
    """argparse that answers a bad flag with one line, not the 30-line usage of every option first."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


@functools.cache
def options() -> dict[str, tuple[dataclasses.Field, type]]:
    """Every option by name: its field (default, bound, help) and its declared type."""
    return {f.name: (f, typing.get_type_hints(group)[f.name]) for group in GROUPS.values() for f in fields(group)}


def build_parser(description: str = "") -> Parser:
    p = Parser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML recipe; its keys are these options (dashes or underscores)")
    declared = options()
    for group in GROUPS.values():
        g = p.add_argument_group(*group.__doc__.split(": ", 1))
        for f in fields(group):
            g.add_argument("--" + f.name.replace("_", "-"), **argparse_kwargs(*declared[f.name]))
    return p


def argparse_kwargs(f: dataclasses.Field, kind) -> dict:
    m = f.metadata
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    kw = {"default": default, "help": m["help"] or None}
    if kind is bool:  # real booleans: --flag, and --no-flag for those on by default
        return {**kw, "action": argparse.BooleanOptionalAction if default else "store_true"}
    kw.update(choices=m["choices"], metavar=m["metavar"])
    if typing.get_origin(kind) is list:
        return {**kw, "type": typing.get_args(kind)[0], "nargs": m["nargs"] or "+"}
    return {**kw, "type": scalar_type(kind)}


def scalar_type(kind) -> type:
    """``str | None`` -> str; plain types unchanged."""
    if isinstance(kind, types.UnionType):
        return next(t for t in typing.get_args(kind) if t is not type(None))
    return kind


def parse_config(argv: list[str] | None = None, description: str = "") -> Config:
    """The configuration from the defaults, the ``--config`` recipe and the flags, checked."""
    parser = build_parser(description)
    known, _ = parser.parse_known_args(argv)
    if known.config:
        try:
            parser.set_defaults(**read_recipe(known.config))
        except RecipeProblem as e:
            parser.error(str(e))
    values = vars(parser.parse_args(argv))
    values.pop("config")
    problem = check_values(values) or check_combinations(values)
    if problem:
        parser.error(problem)
    return Config(**{name: group(**{f.name: values[f.name] for f in fields(group)})
                     for name, group in GROUPS.items()})


# Other trainers' names for our options, which no spelling distance finds
SYNONYMS = {"learning_rate": "lr", "num_workers": "workers", "model": "arch", "optimizer": "opt",
            "wd": "weight_decay", "lr_schedule": "schedule", "data": "data_dir", "num_epochs": "epochs"}


class RecipeProblem(Exception):
    """What is wrong with a recipe, in one line naming the file and the key."""


def read_recipe(path: str) -> dict:
    """The recipe's values, each checked here so that a bad one names the file and the key (argparse would
    convert a string like "ten" itself and name only the flag)."""
    try:
        recipe = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RecipeProblem(f"cannot read recipe {path}: {' '.join(str(e).split())}") from None
    if recipe is None or recipe == {}:  # else the run would be the defaults (ResNet-50, 224 px, 90 epochs)
        raise RecipeProblem(f"recipe {path} sets nothing (it is empty, or only comments): give it "
                            "'option: value' lines, or drop --config")
    if not isinstance(recipe, dict):
        raise RecipeProblem(f"{path}: a recipe is a mapping of option names to values, not a {type(recipe).__name__}")
    return {str(key).replace("-", "_"): recipe_value(path, key, value) for key, value in recipe.items()}


def recipe_value(path: str, key, value):
    """``value`` if it fits the option ``key`` names, else the problem, naming the file and the key."""
    declared, name = options(), str(key).replace("-", "_")
    if name not in declared:
        close = [SYNONYMS[name]] if name in SYNONYMS else difflib.get_close_matches(name, declared, n=3, cutoff=0.6)
        if close:
            raise RecipeProblem(f"{path}: unknown key '{key}'; did you mean {' or '.join(close)}?")
        raise RecipeProblem(f"{path}: unknown key '{key}'; valid keys: {', '.join(sorted(declared))}")
    choices = declared[name][0].metadata["choices"]
    if choices and value not in choices and not (value is None and declared[name][0].default is None):
        raise RecipeProblem(f"{path}: {key}: '{value}' is not one of {', '.join(map(str, choices))}")
    problem = value_problem(name, value)
    if problem:
        raise RecipeProblem(f"{path}: {key} {problem}")
    return value


def check_values(values: dict) -> str | None:
    """Types and lower bounds of every option, checked after parsing: argparse does not check the values
    that come from a recipe."""
    for name in options():
        problem = value_problem(name, values[name])
        if problem:
            return f"--{name.replace('_', '-')} {problem}"
    return None


def value_problem(name: str, value) -> str | None:
    """'must be an integer >= 1, got 'ten'' when ``value`` does not fit option ``name``, else None."""
    f, kind = options()[name]
    low = f.metadata["low"]
    if fits(value, kind, f.metadata["nargs"]) and (low is None or value is None or value >= low):
        return None
    what = {int: "an integer", float: "a number", bool: "true or false"}.get(scalar_type(kind), f"a {describe(kind)}")
    bound = f" >= {low}" if low is not None else ""
    return f"must be {what}{bound}, got {value!r}"


def fits(value, kind, nargs) -> bool:
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        return (isinstance(value, list) and (nargs is None or len(value) == nargs)
                and all(fits(v, item, None) for v in value))
    if value is None:
        return isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)
    if isinstance(value, bool) or kind is bool:
        return isinstance(value, bool) and kind is bool
    return isinstance(value, (int, float) if kind is float else scalar_type(kind))


def describe(kind) -> str:
    if typing.get_origin(kind) is list:
        return f"list of {typing.get_args(kind)[0].__name__}s"
    return "string" if scalar_type(kind) is str else scalar_type(kind).__name__


def check_combinations(values: dict) -> str | None:
    """What no single option's declaration can say."""
    problem = check_resolution(values)
    if problem:
        return problem
    if values["overwrite"] and values["resume"]:
        return "--overwrite replaces the run in --output-dir and --resume continues it: give one of them"
    if values["batch_size"] < 2 and not values["evaluate"]:
        return ("--batch-size 1: BatchNorm needs at least 2 images per process in training (it normalises each "
                "batch by the batch's own statistics); use --batch-size 2 or more")
    if values["evaluate"] and not values["data_dir"]:
        return "--evaluate needs --data-dir: the shards whose validation split it scores"
    if values["evaluate"] and values["synthetic"]:
        return "--evaluate scores the validation split of --data-dir; drop --synthetic"
    if values["val_resize"] and values["val_resize"] < (values["val_crop"] or values["image_size"]):
        return (f"--val-resize {values['val_resize']} is smaller than the crop "
                f"({values['val_crop'] or values['image_size']}): resize to at least the crop size")
    if values["nesterov"] and values["opt"] not in ("sgd", "lars"):
        return f"--nesterov applies to --opt sgd or lars, not {values['opt']}"
    if not values["synthetic"] and not values["data_dir"]:
        return "--data-dir is required (or --synthetic)"
    if values["decode"] == "device" and (values["auto_augment"] or values["color_jitter"]):
        return ("--decode device crops, resizes and flips on the device; --auto-augment and --color-jitter "
                "work on decoded images in the workers: use --decode cpu with them")
    if (values["mixup"] > 0 or values["cutmix"] > 0) and values["batch_size"] % 2:
        return f"--mixup/--cutmix need an even --batch-size (timm mixes pairs), got {values['batch_size']}"
    return None


def check_resolution(values: dict) -> str | None:
    low, high = values["min_res"], values["max_res"] or values["image_size"]
    if any(size < 8 for size in values["res_schedule"]):
        return f"--res-schedule sizes must be at least 8 px, got {values['res_schedule']}"
    if values["res_schedule"] and values["min_res"]:
        return "--res-schedule and --min-res are two ways to say the same: give one"
    if low and low > high:
        return f"--min-res {low} is above the final size {high} (--max-res, or --image-size)"
    if values["ramp_start_epoch"] > values["ramp_end_epoch"]:
        return (f"--ramp-start-epoch {values['ramp_start_epoch']} comes after --ramp-end-epoch "
                f"{values['ramp_end_epoch']}")
    if (values["max_res"] or values["ramp_end_epoch"]) and not low:
        return "--max-res and the ramp epochs need --min-res, the size the ramp starts from"
    return None
