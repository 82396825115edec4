"""Every option of the trainer, declared once: its group, type, default, lower bound and help.

Each group is a frozen dataclass whose fields are the options; the command-line parser, the YAML recipe
reader and the checks of types and ranges are all made from these declarations. A recipe's keys are the
option names (dashes or underscores); flags override the recipe, which overrides the defaults. Each part
of the engine receives the group it reads (``cfg.optim``), never the whole configuration.
"""

import argparse
import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from resnet import ARCH_NAMES

from .console import fatal

STOP_CHECK_EVERY = 10  # steps between agreeing on a stop request: one tiny all-reduce, not one per step


def option(default, help: str = "", *, low=None, choices=None, nargs=None, metavar=None):
    """A field that is also a command-line option and a recipe key; ``low`` is its inclusive lower bound."""
    meta = {"help": help, "low": low, "choices": choices, "nargs": nargs, "metavar": metavar}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class DataConfig:
    """data"""

    data_dir: str | None = option(None, "directory written by make-shards (holds _info.json and classes.txt)")
    train_split: str = option("train", "split of --data-dir to train on")
    val_split: str = option("val", "split of --data-dir to evaluate on")
    workers: int = option(8, "loader worker processes per training process", low=0)
    image_size: int = option(224, "training crop and evaluation size, pixels", low=8)
    crop_pct: float = option(0.875, "evaluation: resize to size/crop-pct, centre crop", low=0.01)
    max_bad_fraction: float = option(0.001, "stop when more than this fraction of training samples cannot be "
                                            "decoded", low=0.0)
    synthetic: bool = option(False, "random data made on the device: measures the model without the loader")
    synthetic_steps: int = option(100, "steps per epoch with --synthetic", low=1)
    num_classes: int = option(1000, "with --synthetic only; else from classes.txt", low=2)


@dataclass(frozen=True)
class ModelConfig:
    """model"""

    arch: str = option("resnet50", "one of: " + ", ".join(ARCH_NAMES), choices=ARCH_NAMES, metavar="ARCH")
    cifar_stem: bool = option(False, "3x3 stride-1 stem, no max-pool (32x32 images)")
    zero_init_residual: bool = option(False, "zero the last BatchNorm of each block (Goyal et al. 2017)")
    channels_last: bool = option(True, "NHWC memory for the model and batches (faster convolutions on GPUs)")
    sync_bn: bool = option(False, "synchronise BatchNorm statistics across processes")


@dataclass(frozen=True)
class OptimConfig:
    """optimization"""

    batch_size: int = option(128, "images per process per step", low=1)
    grad_accum: int = option(1, "batches accumulated into one optimizer step", low=1)
    lr: float = option(0.1, "learning rate per 256 images of global batch", low=0.0)
    momentum: float = option(0.9, "SGD momentum")
    nesterov: bool = option(False, "Nesterov momentum")
    weight_decay: float = option(1e-4, "not applied to norm weights and biases", low=0.0)
    label_smoothing: float = option(0.0, "of the cross-entropy targets (and of Mixup's)", low=0.0)
    max_nonfinite_steps: int = option(3, "stop after this many consecutive batches with a NaN/inf loss (checked "
                                         f"every {STOP_CHECK_EVERY} steps); weights that are no longer finite "
                                         "are never saved", low=1)
    clip_grad: float = option(0.0, "max gradient norm; 0 disables", low=0.0)
    ema_decay: float = option(0.0, "timm ModelEmaV3 decay; 0 disables", low=0.0)


@dataclass(frozen=True)
class ScheduleConfig:
    """schedule"""

    epochs: int = option(90, "passes over the training split", low=1)
    schedule: str = option("cosine", "after warmup; linear decays to 0 (with warmup: FFCV's triangular "
                                     "schedule)", choices=("cosine", "linear", "step", "multistep", "constant"))
    warmup_epochs: float = option(0.0, "linear LR warmup from ~0, in epochs (fractions allowed)", low=0.0)
    step_size: int = option(30, "epochs between decays for --schedule step", low=1)
    milestones: list[int] = option([30, 60, 80], "epochs, multistep")
    gamma: float = option(0.1, "decay factor for step and multistep")
    min_lr_ratio: float = option(0.0, "cosine floor as a fraction of the peak")


@dataclass(frozen=True)
class AugmentConfig:
    """augmentation"""

    scale: list[float] = option([0.08, 1.0], "RandomResizedCrop area range", nargs=2)
    ratio: list[float] = option([3 / 4, 4 / 3], "RandomResizedCrop aspect-ratio range", nargs=2)
    hflip: float = option(0.5, "probability of a horizontal flip")
    color_jitter: float = option(0.0, "timm colour-jitter strength; 0 disables")
    auto_augment: str | None = option(None, "timm policy, e.g. rand-m9-mstd0.5-inc1 or original")
    interpolation: str = option("bilinear", "resize interpolation of the training crop (timm's names)")
    re_prob: float = option(0.0, "random erasing probability (on the device)", low=0.0)
    mixup: float = option(0.0, "Mixup alpha; 0 disables", low=0.0)
    cutmix: float = option(0.0, "CutMix alpha; 0 disables", low=0.0)

    @property
    def mixes(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


@dataclass(frozen=True)
class RunConfig:
    """run"""

    output_dir: str = option("runs/default", "checkpoints, TensorBoard events, metrics.jsonl, config.yaml, model.pt")
    resume: str | None = option(None, "'auto' (newest complete checkpoint, if any) or a path")
    evaluate: str | None = option(None, "evaluate this model.pt or checkpoint directory and exit",
                                  metavar="CHECKPOINT")
    seed: int = option(0, "same seed, same run: initial weights, shard order, augmentation")
    max_steps: int = option(0, "stop after this global step; 0 = run all epochs", low=0)
    log_every: int = option(50, "steps between log lines and scalars", low=1)
    checkpoint_every: int = option(0, "steps between checkpoints; 0 = per epoch", low=0)
    keep_checkpoints: int = option(3, "newest checkpoints kept (the best is kept too)", low=1)
    eval_every: int = option(1, "epochs between evaluations", low=1)
    progress: bool = option(True, "progress bar")


@dataclass(frozen=True)
class RuntimeConfig:
    """runtime: processes, devices and numerics"""

    cpu: bool = option(False, "train on the CPU even when a GPU is present")
    precision: str = option("no", "mixed precision (Accelerate's autocast; fp16 with a loss scaler)",
                            choices=("no", "bf16", "fp16"))
    compile: bool = option(False, "torch.compile the model (inductor)")
    deterministic: bool = option(False, "deterministic kernels (slower)")
    dist_timeout: int = option(1800, "seconds a collective may wait for the other ranks before the run fails",
                               low=1)


@dataclass(frozen=True)
class Config:
    """The whole configuration, one group per part of the engine."""

    data: DataConfig
    model: ModelConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    augment: AugmentConfig
    run: RunConfig
    runtime: RuntimeConfig

    def flat(self) -> dict:
        """Option name -> value, as a recipe holds them (``config.yaml`` in a run directory is one)."""
        return {k: v for f in fields(self) for k, v in dataclasses.asdict(getattr(self, f.name)).items()}


GROUPS = {f.name: typing.get_type_hints(Config)[f.name] for f in fields(Config)}


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
        parser.set_defaults(**read_recipe(known.config))
    values = vars(parser.parse_args(argv))
    values.pop("config")
    problem = check_values(values) or check_combinations(values)
    if problem:
        parser.error(problem)
    return Config(**{name: group(**{f.name: values[f.name] for f in fields(group)})
                     for name, group in GROUPS.items()})


def read_recipe(path: str) -> dict:
    try:
        recipe = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        fatal(f"cannot read recipe {path}: {e}")
    if not isinstance(recipe, dict):
        fatal(f"{path}: a recipe is a mapping of option names to values, not a {type(recipe).__name__}")
    declared, values = options(), {}
    for key, value in recipe.items():
        name = str(key).replace("-", "_")
        if name not in declared:
            fatal(f"{path}: unknown key '{key}'; valid keys: {', '.join(sorted(declared))}")
        choices = declared[name][0].metadata["choices"]
        if choices and value not in choices:
            fatal(f"{path}: {key}: '{value}' is not one of {', '.join(map(str, choices))}")
        values[name] = value
    return values


def check_values(values: dict) -> str | None:
    """Types and lower bounds of every option, checked after parsing: argparse does not check the values
    that come from a recipe."""
    for name, (f, kind) in options().items():
        value, low, flag = values[name], f.metadata["low"], "--" + name.replace("_", "-")
        if not fits(value, kind, f.metadata["nargs"]) or low is not None and value < low:
            what = {int: "an integer", float: "a number", bool: "true or false"}.get(kind, f"a {describe(kind)}")
            bound = f" >= {low}" if low is not None else ""
            return f"{flag} must be {what}{bound}, got {value!r}"
    return None


def fits(value, kind, nargs) -> bool:
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        return (isinstance(value, list) and len(value) >= 1 and (nargs is None or len(value) == nargs)
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
    if values["evaluate"] and not values["data_dir"]:
        return "--evaluate needs --data-dir: the shards whose validation split it scores"
    if values["evaluate"] and values["synthetic"]:
        return "--evaluate scores the validation split of --data-dir; drop --synthetic"
    if not values["synthetic"] and not values["data_dir"]:
        return "--data-dir is required (or --synthetic)"
    if (values["mixup"] > 0 or values["cutmix"] > 0) and values["batch_size"] % 2:
        return f"--mixup/--cutmix need an even --batch-size (timm mixes pairs), got {values['batch_size']}"
    return None
