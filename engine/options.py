"""Every option of the trainer, declared once, in the group of the part of the engine that reads it.

Each group is a frozen dataclass whose fields are the options: name, type, default, lower bound and help.
engine/config.py makes the command-line parser, the recipe reader and the checks from these declarations;
each part of the engine receives its group (``cfg.optim``), never the whole configuration.
"""

import dataclasses
import typing
from dataclasses import dataclass, fields

from data.remote import redact
from resnet import ARCH_NAMES

MAX_DEFAULT_WORKERS = 8  # more rarely helps one GPU, and each worker holds a shuffle buffer of decoded images
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

    data_dir: str | None = option(None, "directory written by make-shards (holds _info.json and classes.txt), or "
                                        "the URL it was uploaded under: http(s)://, s3://, gs:// (README, \"Data "
                                        "in object storage\")")
    train_split: str = option("train", "split of --data-dir to train on")
    val_split: str = option("val", "split of --data-dir to evaluate on")
    workers: int | None = option(None, "loader worker processes per training process; default: the cores this "
                                       "process may use, shared among the training processes of its node, at most "
                                       f"{MAX_DEFAULT_WORKERS}", low=0)
    image_size: int = option(224, "training crop and evaluation size, pixels", low=8)
    max_bad_fraction: float = option(0.001, "stop when more than this fraction of training samples cannot be "
                                            "decoded", low=0.0)
    decode: str = option("cpu", "where JPEGs are decoded: 'cpu' in the loader workers, or 'device': the workers "
                                "ship the bytes and each batch is decoded in one call on the training device "
                                "(nvJPEG on a GPU), then cropped, resized and flipped there",
                         choices=("cpu", "device"))
    read_retries: int = option(8, "retries of a failed or stalled remote shard read (each continues at the byte "
                                  "where it stopped, after a doubling backoff); then the run checkpoints and exits "
                                  "75 as a data outage", low=0)
    read_timeout: float = option(60.0, "seconds without a byte before a remote read counts as stalled and is "
                                       "retried", low=0.001)
    read_retry_wait: float = option(600.0, "most seconds of backoff one remote read waits in all before it gives "
                                           "up", low=0.0)
    shard_cache: str | None = option(None, "local folder (one per node) for whole, verified copies of remote "
                                           "shards, so later epochs read them from disk", metavar="DIR")
    shard_cache_gb: float = option(100.0, "size cap of --shard-cache, GB; the least recently used shards leave "
                                          "first", low=0.0)
    synthetic: bool = option(False, "random data made on the device: measures the model without the loader")
    synthetic_steps: int = option(100, "steps per epoch with --synthetic", low=1)
    num_classes: int = option(1000, "with --synthetic only; else from classes.txt", low=2)


@dataclass(frozen=True)
class ResolutionConfig:
    """progressive resizing: the training resolution by epoch (FFCV's: low early, high late)"""

    min_res: int = option(0, "training size from the first epoch to --ramp-start-epoch; 0 = --image-size "
                             "throughout", low=0)
    max_res: int = option(0, "training size from --ramp-end-epoch on; 0 = --image-size", low=0)
    ramp_start_epoch: int = option(0, "last epoch (0-based) at --min-res; between the two the size rises "
                                      "linearly, rounded to a multiple of 32", low=0)
    ramp_end_epoch: int = option(0, "first epoch (0-based) at --max-res", low=0)
    res_schedule: list[int] = option([], "the training size of each epoch, explicitly (the last repeats); "
                                         "instead of the ramp")


@dataclass(frozen=True)
class EvalConfig:
    """evaluation"""

    crop_pct: float = option(0.875, "resize the shorter side to crop/crop-pct, then centre-crop (timm's rule)",
                             low=0.01)
    val_crop: int = option(0, "centre-crop size, pixels; 0 = --image-size. Larger than the training size "
                              "evaluates better (random crops make objects look larger in training)", low=0)
    val_resize: int = option(0, "shorter side before the crop, pixels, e.g. 256 or torchvision's 232 for a 224 "
                                "crop; 0 = crop / --crop-pct", low=0)
    eval_flip: bool = option(False, "average the logits of each image and its mirror image")

    def crop(self, image_size: int) -> int:
        return self.val_crop or image_size


@dataclass(frozen=True)
class ModelConfig:
    """model"""

    arch: str = option("resnet50", "one of: " + ", ".join(ARCH_NAMES), choices=ARCH_NAMES, metavar="ARCH")
    cifar_stem: bool = option(False, "3x3 stride-1 stem, no max-pool (32x32 images)")
    zero_init_residual: bool = option(False, "zero the last BatchNorm of each block (Goyal et al. 2017)")
    blurpool: bool = option(False, "blur the input of each strided convolution (Zhang 2019, as FFCV): same "
                                   "parameters; model.json says how to load the weights")
    channels_last: bool = option(True, "NHWC memory for the model and batches (faster convolutions on GPUs)")
    sync_bn: bool = option(False, "synchronise BatchNorm statistics across processes")


@dataclass(frozen=True)
class OptimConfig:
    """optimization"""

    opt: str = option("sgd", "optimizer, from timm's factory: sgd (with --momentum), lars (large batches, many "
                             "nodes), lamb, adamw", choices=("sgd", "lars", "lamb", "adamw"))
    batch_size: int = option(128, "images per process per step", low=1)
    grad_accum: int = option(1, "batches accumulated into one optimizer step", low=1)
    lr: float = option(0.1, "learning rate per 256 images of global batch", low=0.0)
    lr_scaling: str = option("linear", "how the global batch scales --lr: linear (SGD, LARS) or sqrt (LAMB)",
                             choices=("linear", "sqrt"))
    momentum: float = option(0.9, "momentum of sgd and lars")
    nesterov: bool = option(False, "Nesterov momentum (sgd, lars)")
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
    interpolation: str = option("bilinear", "resize interpolation of the training crop and of evaluation's resize "
                                            "(timm's names; random: bilinear or bicubic by turns in training, "
                                            "bilinear in evaluation)")
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
    overwrite: bool = option(False, "replace the run already in --output-dir (its checkpoints, model and logs) "
                                    "instead of refusing to start over it")
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
    precision: str | None = option(None, "mixed precision (Accelerate's autocast; fp16 with a loss scaler); "
                                         "default: what accelerate launch's --mixed_precision (or its config "
                                         "file) says, else no", choices=("no", "bf16", "fp16"))
    compile: bool = option(False, "torch.compile the model (inductor)")
    deterministic: bool = option(False, "deterministic kernels (slower)")
    dist_timeout: int = option(1800, "seconds a collective may wait for the other ranks before the run fails",
                               low=1)


@dataclass(frozen=True)
class Config:
    """The whole configuration, one group per part of the engine."""

    data: DataConfig
    resolution: ResolutionConfig
    evaluation: EvalConfig
    model: ModelConfig
    optim: OptimConfig
    schedule: ScheduleConfig
    augment: AugmentConfig
    run: RunConfig
    runtime: RuntimeConfig

    def flat(self) -> dict:
        """Option name -> value, as a recipe holds them (``config.yaml`` in a run directory is one). What it
        feeds is written down (config.yaml, checkpoints, TensorBoard), so credentials in a URL are hidden."""
        return {k: redact(v) if isinstance(v, str) else v
                for f in fields(self) for k, v in dataclasses.asdict(getattr(self, f.name)).items()}


GROUPS = {f.name: typing.get_type_hints(Config)[f.name] for f in fields(Config)}
