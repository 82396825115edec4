"""ImageNet as WebDataset shards: the writer (``data.shards``, CLI ``python -m data.make_shards``) and the
training/validation loaders (``data.pipeline``). Imports nothing from the model or the trainer."""

from .errors import DataError
from .pipeline import TrainLoader, ValLoader, build_train_loader, build_val_loader
from .transforms import TrainAugment

__all__ = ["DataError", "TrainAugment", "TrainLoader", "ValLoader", "build_train_loader", "build_val_loader"]
