"""ImageNet as WebDataset shards: the writer (``data.shards``, CLI ``python -m data.make_shards``), the training
loader (``data.pipeline``), the validation loader (``data.validation``), decoding only the crop box in the
workers (``data.region_decode``) and decoding on the device (``data.device_decode``). Imports nothing from
the model or the trainer."""

from .errors import DataError

_LAZY = {"TrainAugment": "transforms", "TrainLoader": "pipeline", "build_train_loader": "pipeline",
         "ValLoader": "validation", "build_val_loader": "validation", "ShardSet": "sources",
         "resolve_shards": "sources"}
__all__ = ["DataError", *_LAZY]


def __getattr__(name):
    # The loaders pull in timm and torchvision; loading them on first use keeps the writer CLIs
    # (make-shards, python -m data.digits) from paying several seconds of imports they never use.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'data' has no attribute {name!r}")
