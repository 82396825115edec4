"""ImageNet as WebDataset shards: the writer (``data.shards``, CLI ``python -m data.make_shards``) and the
training/validation loaders (``data.pipeline``). Imports nothing from the model or the trainer."""

from .errors import DataError

__all__ = ["DataError", "TrainAugment", "TrainLoader", "ValLoader", "build_train_loader", "build_val_loader"]


def __getattr__(name):
    # The loaders pull in timm and torchvision; loading them on first use keeps the writer CLIs
    # (make-shards, python -m data.digits) from paying several seconds of imports they never use.
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
