"""Per-image transforms: timm's, with cheaper JPEG decoding where the output allows it.

Both transforms take the undecoded image bytes of a sample and return a ``torch.uint8`` CHW tensor
(timm's ``use_prefetcher=True`` output); normalisation happens on the device.

Three ways to decode less expensively, all choosing the random crop first, from the header's size:

- the common case (crop less than 4x the output, bilinear/bicubic, no PIL-only transform after it), where
  nvImageCodec is installed: only the crop box is decoded (data/region_decode.py), then an antialiased uint8
  resize in torch; the pixels are those of a full decode cropped to the box;
- the same without nvImageCodec, for crops less than 2x the output: torchvision's libjpeg-turbo decoder
  straight into a tensor, then the same resize, cheaper than timm's PIL crop and resize;
- a larger crop: PIL's ``draft`` decodes at 1/2, 1/4 or 1/8 scale in the DCT domain, a fraction of a full
  decode (large photos, or low-resolution training). Against a region decode it wins only from 4x on.
The measurements behind these limits are in docs/benchmarks.md ("Data loader").
"""

from __future__ import annotations

import io
import math
import random
import warnings
from dataclasses import dataclass

import torch
import torchvision.transforms.functional as F
import torchvision.transforms.v2.functional as F2
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
from torchvision.transforms import CenterCrop, InterpolationMode, RandomHorizontalFlip, Resize

from . import region_decode

try:  # without torchvision's JPEG decoder, every image takes the PIL path below
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:
    decode_jpeg = None

_TORCH_RESIZE = (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
# Where torchvision resizes uint8 bilinear natively on the CPU (its _do_native_uint8_resize_on_cpu: AVX2 and
# up); elsewhere (aarch64 included, to stay on torchvision's path) resize_crop leaves it to torchvision
_NATIVE_UINT8_BILINEAR = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
# Crops this many times the output or more take PIL's draft decode even where a region decode is possible:
# at 1/4 scale and below it does less work (measured, docs/benchmarks.md "Data loader"); at 1/2 it does not
REGION_MAX_SHRINK = 4
_SOF_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame; C4/C8/CC are other tables


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, colour components) from a JPEG's start-of-frame segment, or None if ``data`` is not
    a JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 10 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker in _SOF_MARKERS:
            return (int.from_bytes(data[pos + 7:pos + 9], "big"), int.from_bytes(data[pos + 5:pos + 7], "big"),
                    data[pos + 9])
        else:
            pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame segment, or None if ``data`` is not a JPEG."""
    header = jpeg_header(data)
    return header[:2] if header else None


@dataclass
class TrainAugment:
    """Options passed to ``timm.data.create_transform(is_training=True, use_prefetcher=True)``."""

    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.0  # 0 disables
    auto_augment: str | None = None  # timm string, e.g. "rand-m9-mstd0.5-inc1", or "original" (AutoAugment)
    interpolation: str = "bilinear"


def _decode_jpeg(data: bytes) -> torch.Tensor:
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its codecs in favour of TorchCodec, once per call; they are still
        # there in every torchvision we support (setup.cfg), and the fallback is the PIL path.
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)


def resize_crop(image: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int],
                interpolation=InterpolationMode.BILINEAR) -> torch.Tensor:
    """uint8 ``[3, H, W]`` image, crop ``box`` = (top, left, height, width) -> antialiased resize to ``size``,
    in channels_last memory.

    torch's fast uint8 resize works on a contiguous channels_last crop and returns one; the decoder's
    output is HWC memory already, and the batch keeps that layout; cheaper than resizing the plain crop
    view and making the result contiguous (the A/B is in commit d8513d3; the resize's cost in
    docs/benchmarks.md's stage table).
    """
    i, j, h, w = box
    crop = image[None, :, i:i + h, j:j + w].contiguous(memory_format=torch.channels_last)
    if interpolation != InterpolationMode.BILINEAR or crop.device.type != "cpu" or not _NATIVE_UINT8_BILINEAR:
        return F2.resize(crop, list(size), interpolation=interpolation, antialias=True)[0]
    if (h, w) == tuple(size):
        return crop[0]
    # What torchvision's resize_image does here, step for step, without its dispatch and usage logging, which
    # cost a few percent of the loader's CPU per image (docs/benchmarks.md, "Decoding only the crop"). A batch
    # stride equal to the numel makes torch allocate the output channels_last (pytorch#68430). Pixels and
    # strides tested equal to torchvision's in tests/test_region_decode.py.
    crop = crop.reshape(1, crop.shape[1], h, w)
    strides = crop.stride()
    if crop.is_contiguous(memory_format=torch.channels_last) and crop.numel() != strides[0]:
        crop = crop.as_strided(crop.shape, (crop.numel(), *strides[1:]))
    return torch.nn.functional.interpolate(crop, size=list(size), mode="bilinear", align_corners=False,
                                           antialias=True)[0]


class HorizontalFlip(RandomHorizontalFlip):
    """torchvision's RandomHorizontalFlip (the same one draw from torch's generator, the same pixels) called
    without nn.Module's call machinery and torchvision's per-call usage logging, which cost a few percent of
    the loader's CPU per image (docs/benchmarks.md, "Decoding only the crop")."""

    def __call__(self, img):
        if torch.rand(1) < self.p:
            return img.flip(-1) if isinstance(img, torch.Tensor) else img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img


class DecodeRandomResizedCrop(RandomResizedCropAndInterpolation):
    """Image bytes -> timm's RandomResizedCrop (same random draws), decoding only as much as the crop needs.

    With ``tensor_output`` the common case returns a uint8 CHW tensor decoded and resized by
    torchvision/torch (antialiased like PIL); leave it off when a PIL-only transform (AutoAugment,
    RandAugment) follows. Otherwise, and for non-JPEG data, it returns a PIL image.
    """

    tensor_output = False
    region_decode = True  # decode only the crop box where data/region_decode.py can (off: bench and tests A/B)

    def draw(self, full_w: int, full_h: int) -> tuple[tuple[int, int, int, int], InterpolationMode]:
        """timm's random draws for an image of this size: the crop box (top, left, height, width) and the
        interpolation (drawn only when timm's is 'random')."""
        # timm's get_params only asks for the size: a zero-stride tensor view has it without any pixels
        box = self.get_params(torch.empty(1, 1, 1).expand(3, full_h, full_w), self.scale, self.ratio)
        interpolation = self.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        return box, interpolation

    def __call__(self, data: bytes):
        header = jpeg_header(data)
        img = None if header else Image.open(io.BytesIO(data))
        full_w, full_h = header[:2] if header else img.size
        box, interpolation = self.draw(full_w, full_h)
        (i, j, h, w), (out_h, out_w) = box, self.size
        shrink = min(w / out_w, h / out_h)  # how far the crop could be scaled down and still cover the output
        if header and self.tensor_output and interpolation in _TORCH_RESIZE:
            decoded = self._decode_tensor(data, header, box, shrink)
            if decoded is not None:
                return resize_crop(*decoded, (out_h, out_w), interpolation)
        img = img or Image.open(io.BytesIO(data))
        if shrink >= 2 and img.format == "JPEG":
            img.draft("RGB", (math.ceil(full_w / shrink), math.ceil(full_h / shrink)))
        sx, sy = img.size[0] / full_w, img.size[1] / full_h
        if img.mode != "RGB":  # convert() copies even when there is nothing to convert
            img = img.convert("RGB")
        # One resample from the (drafted) image straight to the output size: crop and resize in one pass.
        box = (j * sx, i * sy, (j + w) * sx, (i + h) * sy)
        return img.resize((out_w, out_h), F.pil_modes_mapping[interpolation], box=box)

    def _decode_tensor(self, data: bytes, header: tuple[int, int, int], box: tuple[int, int, int, int],
                       shrink: float) -> tuple[torch.Tensor, tuple[int, int, int, int]] | None:
        """(decoded image, the crop box in it) for the torch resize, or None for the PIL path: the crop box
        alone where nvImageCodec takes the image, else the whole image from torchvision's decoder."""
        if self.region_decode and shrink < REGION_MAX_SHRINK and region_decode.takes(header, data):
            region = region_decode.decode_region(data, box)
            if region is not None:
                return region, (0, 0, box[2], box[3])
        if decode_jpeg and shrink < 2:
            return _decode_jpeg(data), box
        return None


class DecodeForResize:
    """Image bytes -> PIL image, for a shorter-side resize to ``size``: JPEGs are decoded at the
    smallest DCT scale that is still at least that large."""

    def __init__(self, size: int):
        self.size = size

    def drafts(self, short_side: int) -> bool:
        """Whether a JPEG with this shorter side is decoded at a reduced DCT scale (1/2 or less)."""
        return self.size / short_side <= 0.5

    def __call__(self, data: bytes) -> Image.Image:
        img = Image.open(io.BytesIO(data))
        scale = self.size / min(img.size)
        if self.drafts(min(img.size)) and img.format == "JPEG":
            img.draft("RGB", (math.ceil(img.size[0] * scale), math.ceil(img.size[1] * scale)))
        return img if img.mode == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def train_transform(image_size: int, augment: TrainAugment):
    """timm's training transform for ``augment``, taking image bytes: its random-resized crop replaced
    by the decoding one, and its flip by the same flip called more cheaply."""
    tf = create_transform(
        input_size=image_size, is_training=True, use_prefetcher=True, re_prob=0.0,
        scale=tuple(augment.scale), ratio=tuple(augment.ratio), hflip=augment.hflip, vflip=0.0,
        color_jitter=augment.color_jitter or None, auto_augment=augment.auto_augment,
        interpolation=augment.interpolation,
    )
    for k, t in enumerate(tf.transforms):
        if type(t) is RandomResizedCropAndInterpolation:
            crop = DecodeRandomResizedCrop(image_size, scale=t.scale, ratio=t.ratio,
                                            interpolation=augment.interpolation)
            # auto-augment needs PIL images, and colour jitter is faster on them (measured); a flip
            # alone is as cheap on a tensor
            crop.tensor_output = not augment.auto_augment and not augment.color_jitter
            tf.transforms[k] = crop
        elif type(t) is RandomHorizontalFlip:
            tf.transforms[k] = HorizontalFlip(t.p)
    return tf


def train_decoder(decode: str, pil_only: bool, device_decoder: str | None = None) -> str:
    """Which decoder the training images go through, in words, for the run's record (engine's run_info.json).
    ``decode``: 'cpu' or 'device'; ``pil_only``: a PIL-only transform (auto-augment, colour jitter) follows
    the crop, so the workers decode with PIL; ``device_decoder``: the loader's, with decode='device'."""
    workers = ("PIL (draft for large crops), for the PIL-only transforms after the crop" if pil_only
               else region_decode.describe())
    if decode != "device":
        return f"in the loader workers: {workers}"
    if device_decoder is None:
        from .device_decode import jpeg_decoder  # it imports this module

        device_decoder = jpeg_decoder()[0]
    return f"on the device: {device_decoder}, one call per batch; what it does not take: {workers}"


def val_transform(image_size: int, crop_pct: float, resize: int | None = None, interpolation: str = "bilinear"):
    """Image bytes -> resize the shorter side to ``resize`` (default image_size / crop_pct) with the training's
    ``interpolation`` ('random', which trains with bilinear and bicubic by turns, evaluates bilinear), centre-crop
    image_size (timm's eval transform, which follows its interpolation argument too)."""
    if resize:
        # timm takes the resize as floor(image_size / crop_pct); aiming half a pixel above lands on it exactly
        crop_pct = image_size / (resize + 0.5)
    tf = create_transform(input_size=image_size, is_training=False, use_prefetcher=True, crop_pct=crop_pct,
                          interpolation="bilinear" if interpolation == "random" else interpolation)
    tf.transforms.insert(0, DecodeForResize(math.floor(image_size / crop_pct)))
    return RegionResizeCrop(tf) if region_decode.available() else tf


# PIL's filter support, in source pixels at scale 1: how far outside the crop its resampling reads
_PIL_SUPPORT = {InterpolationMode.BILINEAR: 1.0, InterpolationMode.BICUBIC: 2.0, InterpolationMode.LANCZOS: 3.0}


class RegionResizeCrop:
    """val_transform's shorter-side resize and centre crop, computed from only the region of the JPEG that the
    crop's resampling reads, where nvImageCodec takes the image; ``transform`` (the whole decode) otherwise.

    The centre crop keeps ~77 % of the resized image (224 of 256 px a side), and the rows below it need no
    entropy decoding: on bench_loader's photos this path takes about a quarter less CPU per image
    (docs/benchmarks.md, "Decoding only the crop"). PIL resamples the crop's box straight from the region
    (``resize(box=...)``: the same filter centres and support as resizing the whole image, then cropping), so
    the output is today's up to the rounding of the box's coordinates: within 1 level, on ~0.1 % of values
    (tested in tests/test_region_decode.py). Photos that DecodeForResize draft-decodes (short side 2x the
    resize or more) keep that path: it is cheaper.
    """

    def __init__(self, transform):
        self.transform, self.transforms = transform, transform.transforms  # PlanResize reads the steps
        steps = [type(t) for t in transform.transforms]
        self.taken = steps == [DecodeForResize, Resize, CenterCrop, MaybePILToTensor]
        if self.taken:
            resize, crop = transform.transforms[1], transform.transforms[2]
            self.resize = resize.size if isinstance(resize.size, int) else resize.size[0]
            self.taken = (isinstance(resize.size, int) or len(resize.size) == 1) and resize.max_size is None \
                and resize.interpolation in _PIL_SUPPORT
            self.interpolation, (self.crop_h, self.crop_w) = resize.interpolation, crop.size

    def __call__(self, data: bytes):
        image = self.region_resized(data) if self.taken else None
        return self.transform(data) if image is None else F.pil_to_tensor(image)

    def region_resized(self, data: bytes) -> Image.Image | None:
        """The resized centre crop from the decoded region, or None where the image goes the usual way."""
        header = jpeg_header(data)
        if header is None or not region_decode.takes(header, data):
            return None
        w, h = header[:2]
        short, long = min(w, h), max(w, h)
        if self.transform.transforms[0].drafts(short):
            return None  # DecodeForResize decodes it at a reduced DCT scale: cheaper
        # torchvision's Resize and CenterCrop, in numbers: the resized size, the crop's place in it
        new_short, new_long = self.resize, int(self.resize * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if new_w < self.crop_w or new_h < self.crop_h:
            return None  # CenterCrop pads
        top, left = int(round((new_h - self.crop_h) / 2.0)), int(round((new_w - self.crop_w) / 2.0))
        sx, sy = w / new_w, h / new_h
        x0, y0, x1, y1 = left * sx, top * sy, (left + self.crop_w) * sx, (top + self.crop_h) * sy
        # the region: the crop's box in the photo, widened by the filter's reach (and a pixel for rounding)
        support = _PIL_SUPPORT[self.interpolation]
        mx, my = math.ceil(support * max(sx, 1.0)) + 1, math.ceil(support * max(sy, 1.0)) + 1
        rx0, ry0 = max(0, math.floor(x0) - mx), max(0, math.floor(y0) - my)
        rx1, ry1 = min(w, math.ceil(x1) + mx), min(h, math.ceil(y1) + my)
        pixels = region_decode.decode_region(data, (ry0, rx0, ry1 - ry0, rx1 - rx0))
        if pixels is None:
            return None
        region = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        return region.resize((self.crop_w, self.crop_h), F.pil_modes_mapping[self.interpolation],
                             box=(x0 - rx0, y0 - ry0, x1 - rx0, y1 - ry0))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"


# ---------------------------------------------------------------- --decode device: what the workers ship


@dataclass
class Plan:
    """An image for the device to decode: its JPEG bytes and what to do with it there. ``box`` is the crop
    (top, left, height, width) resized to the output; None for validation's shorter-side resize and centre
    crop."""

    data: bytes
    box: tuple[int, int, int, int] | None = None
    flip: bool = False
    interpolation: InterpolationMode = InterpolationMode.BILINEAR


def device_header(data: bytes) -> tuple[int, int, int] | None:
    """The JPEG header of ``data`` if the device gets it: a three-component (YCbCr) JPEG that ends with its
    end-of-image marker. The rest (greyscale, CMYK, PNG bytes named .jpg, truncated files) the workers decode
    on the CPU as before: nvJPEG refuses or misreads some of them, and a truncated file then fails exactly
    where the CPU path fails it, with the same random draws."""
    header = jpeg_header(data)
    return header if header is not None and header[2] == 3 and b"\xff\xd9" in data[-64:] else None


class PlanCrop:
    """Training with --decode device: image bytes -> Plan, with exactly the random draws of ``transform``
    (train_transform's output) in its order: timm's crop box, then the flip. Images the device does not get
    go through ``transform`` here, on the CPU, and come back decoded."""

    resize = 0  # no shorter-side resize: the crop box goes straight to the output size

    def __init__(self, transform):
        self.transform, self.crop, self.flip = transform, None, None
        for t in transform.transforms:
            if isinstance(t, DecodeRandomResizedCrop):
                self.crop = t
            elif isinstance(t, RandomHorizontalFlip):
                self.flip = t
            elif not isinstance(t, MaybePILToTensor):
                raise ValueError(f"decode='device' does the random-resized crop and the flip on the device, not "
                                 f"{type(t).__name__}: use decode='cpu' for it")
        modes = self.crop.interpolation if isinstance(self.crop.interpolation, (tuple, list)) else \
            (self.crop.interpolation,)
        if any(m not in _TORCH_RESIZE for m in modes):
            raise ValueError(f"decode='device' resizes bilinear or bicubic, not {modes}")
        self.size = self.crop.size[0]

    def __call__(self, data: bytes):
        header = device_header(data)
        if header is None:
            return self.transform(data)
        box, interpolation = self.crop.draw(header[0], header[1])
        flip = self.flip is not None and bool(torch.rand(1) < self.flip.p)  # RandomHorizontalFlip's one draw
        return Plan(data, box, flip, interpolation)


class PlanResize:
    """Validation with --decode device: image bytes -> Plan for ``transform``'s (val_transform's) shorter-side
    resize and centre crop on the device; the images the device does not get are decoded here by
    ``transform``."""

    def __init__(self, transform):
        self.transform = transform
        resize = next(t for t in transform.transforms if isinstance(t, Resize))
        self.resize, self.interpolation = resize.size, resize.interpolation
        if self.interpolation not in _TORCH_RESIZE:
            raise ValueError(f"decode='device' resizes bilinear or bicubic, not {self.interpolation}")
        self.size = next(t for t in transform.transforms if isinstance(t, CenterCrop)).size[0]

    def __call__(self, data: bytes):
        if device_header(data) is None:
            return self.transform(data)
        return Plan(data, None, False, self.interpolation)
