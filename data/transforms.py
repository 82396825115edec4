"""Per-image transforms: timm's, with JPEG decoding at reduced size where the output allows it.

Both transforms take a PIL image that is opened but not yet decoded and return a ``torch.uint8``
CHW tensor (timm's ``use_prefetcher=True`` output); normalisation happens on the device.

The speed-up over decoding at full size comes from PIL's ``draft``: libjpeg can decode at 1/2, 1/4
or 1/8 scale in the DCT domain, which costs a fraction of a full decode. A random crop that will be
shrunk to 224 px anyway rarely needs all of a 500x375 image's pixels, so the crop is chosen first
(on the header's size) and the image decoded at the smallest scale that still covers it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as F
import torchvision.transforms.v2.functional as F2
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import InterpolationMode

_TORCH_RESIZE = (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)


@dataclass
class TrainAugment:
    """Options passed to ``timm.data.create_transform(is_training=True, use_prefetcher=True)``."""

    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.0  # 0 disables
    auto_augment: str | None = None  # timm string, e.g. "rand-m9-mstd0.5-inc1", or "original" (AutoAugment)
    interpolation: str = "bilinear"


class DraftRandomResizedCrop(RandomResizedCropAndInterpolation):
    """timm's RandomResizedCrop with the same random draws, decoding JPEGs only as large as the crop needs.

    With ``tensor_output`` it returns a uint8 CHW tensor resized by torch (antialiased like PIL; the
    whole transform ~10% faster on 500x375 JPEGs) for bilinear/bicubic; leave it off when a PIL-only
    transform (AutoAugment, RandAugment) follows.
    """

    tensor_output = False

    def __call__(self, img: Image.Image):
        i, j, h, w = self.get_params(img, self.scale, self.ratio)  # reads the header's size only
        interpolation = self.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        out_h, out_w = self.size
        full_w, full_h = img.size
        shrink = min(w / out_w, h / out_h)  # how far the crop could be scaled down and still cover the output
        if shrink >= 2 and img.format == "JPEG":
            img.draft("RGB", (math.ceil(full_w / shrink), math.ceil(full_h / shrink)))
        sx, sy = img.size[0] / full_w, img.size[1] / full_h
        box = (j * sx, i * sy, (j + w) * sx, (i + h) * sy)
        if img.mode != "RGB":  # convert() copies even when there is nothing to convert
            img = img.convert("RGB")
        if self.tensor_output and interpolation in _TORCH_RESIZE:
            region = img.crop(tuple(round(v) for v in box))
            x = torch.frombuffer(bytearray(region.tobytes()), dtype=torch.uint8)
            x = x.view(region.height, region.width, 3).permute(2, 0, 1)  # channels-last view: torch's fast path
            # left channels-last: stacking the batch copies it into CHW order anyway
            return F2.resize(x, [out_h, out_w], interpolation=interpolation, antialias=True)
        # One resample from the drafted image straight to the output size: crop and resize in one pass.
        return img.resize((out_w, out_h), F.pil_modes_mapping[interpolation], box=box)


class DraftForResize:
    """Before a shorter-side resize to ``size``: decode JPEGs at the smallest scale still at least that large."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        scale = self.size / min(img.size)
        if scale <= 0.5 and img.format == "JPEG":
            img.draft("RGB", (math.ceil(img.size[0] * scale), math.ceil(img.size[1] * scale)))
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def train_transform(image_size: int, augment: TrainAugment):
    """timm's training transform for ``augment``, its random-resized crop replaced by the drafting one."""
    tf = create_transform(
        input_size=image_size, is_training=True, use_prefetcher=True, re_prob=0.0,
        scale=tuple(augment.scale), ratio=tuple(augment.ratio), hflip=augment.hflip, vflip=0.0,
        color_jitter=augment.color_jitter or None, auto_augment=augment.auto_augment,
        interpolation=augment.interpolation,
    )
    for k, t in enumerate(tf.transforms):
        if type(t) is RandomResizedCropAndInterpolation:
            crop = DraftRandomResizedCrop(image_size, scale=t.scale, ratio=t.ratio,
                                          interpolation=augment.interpolation)
            # auto-augment needs PIL images, and colour jitter is faster on them (measured); a flip
            # alone is as cheap on a tensor
            crop.tensor_output = not augment.auto_augment and not augment.color_jitter
            tf.transforms[k] = crop
    return tf


def val_transform(image_size: int, crop_pct: float):
    """Resize the shorter side to image_size / crop_pct, centre-crop image_size (timm's eval transform)."""
    tf = create_transform(input_size=image_size, is_training=False, use_prefetcher=True,
                          crop_pct=crop_pct, interpolation="bilinear")
    tf.transforms.insert(0, DraftForResize(math.floor(image_size / crop_pct)))
    return tf
