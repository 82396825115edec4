"""``decode='device'``: the JPEGs of a batch decoded in one call on the training device, then cropped, resized
and flipped there.

The workers still read, shuffle and batch the shards (data/pipeline.py) and draw each image's crop box and
flip from its JPEG header with the same per-batch seeding as the CPU path (``transforms.PlanCrop``); they
ship the undecoded bytes and those draws as an ``EncodedBatch``. ``DeviceDecoder`` decodes all of a
batch's JPEGs in one call (nvJPEG on a GPU, through nvImageCodec where its GPU backend loads, else TorchCodec or
torchvision; libjpeg-turbo on the CPU: one code path, which is how the CPU-only test suite checks it), cuts
each crop, resizes it with antialiasing and flips it, into the same uint8 ``[B, 3, H, W]`` channels_last batch
that the CPU path makes. ``decode_ahead`` runs that one to two batches
ahead of the training step in a thread (the decoders release the GIL), on a side CUDA stream.

Images the device does not get (greyscale or CMYK JPEGs, PNG bytes named .jpg, truncated files) are decoded by
the worker on the CPU exactly as in ``decode='cpu'`` and travel decoded; an image the device decoder
refuses is decoded here on the CPU. Both are counted in ``DeviceDecoder.cpu_fallbacks``. An image neither can
decode is corrupt: skipped with a warning and counted like the workers' (``BadSampleCounter``); in a
training batch its place is taken by another image of the batch, as the workers do.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import islice

import torch
import torchvision.transforms.v2.functional as F2

from .errors import DataError
from .shards import describe
from .transforms import Plan, resize_crop

log = logging.getLogger(__name__)

_MODES = ("bilinear", "bicubic")  # InterpolationMode values, by their index in an EncodedBatch
REFUSED = (RuntimeError, ValueError)  # what torchvision's and TorchCodec's decoders raise for data they cannot take


def _torchvision_decoder():
    from torchvision.io import ImageReadMode, decode_jpeg

    def decode(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates its codecs in favour of TorchCodec; they are still in every
            # torchvision that setup.cfg admits
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)

    return decode


def jpeg_decoder():
    """(name, decode(list of 1-D uint8 CPU tensors, device) -> list of uint8 [3, H, W] RGB tensors on device).

    TorchCodec's where it is installed (torchvision 0.29 deprecates its decoders in favour of it; its
    ``decode_jpeg`` takes a list and decodes it in one nvJPEG call on CUDA), torchvision's otherwise (the
    same batched nvJPEG call since 0.19). Verified: torchcodec 0.17.0 on torch 2.14.1 (CPU: the same pixels as
    torchvision's), torchvision 0.29.1 (torch 2.14.1) and 0.26 (torch 2.11).
    """
    try:
        from torchcodec.decoders import decode_jpeg
    except Exception:  # not installed, or built for another torch: its import fails in several ways
        return "torchvision", _torchvision_decoder()
    return "torchcodec", lambda datas, device: decode_jpeg(datas, mode="RGB", device=device)


def _nvimgcodec_gpu_decoder(device: torch.device):
    """nvImageCodec's batched GPU decoder (nvJPEG: its hardware engine where the GPU has one, else CUDA) as a
    ``decode`` like jpeg_decoder's, checked on a probe image; raises RuntimeError saying why it cannot be used."""
    from . import region_decode

    nv = region_decode.nvimgcodec()
    backends = [nv.Backend(kind) for kind in (nv.BackendKind.HW_GPU_ONLY, nv.BackendKind.GPU_ONLY,
                                                nv.BackendKind.HYBRID_CPU_GPU)]
    decoder = nv.Decoder(device_id=device.index if device.index is not None else torch.cuda.current_device(),
                         backends=backends)
    params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB,
                             sample_format=nv.SampleFormat.I_RGB)

    def decode(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        stream = torch.cuda.current_stream(device)
        images = decoder.decode([nv.CodeStream(d.numpy()) for d in datas], params=params,
                                cuda_stream=stream.cuda_stream)
        if any(image is None for image in images):  # what it cannot decode: one by one, then on the CPU
            raise RuntimeError("nvImageCodec could not decode an image of the batch")
        return [torch.from_dlpack(image).permute(2, 0, 1) for image in images]  # HWC memory, as nvJPEG's

    _probe(decode, device)
    return decode


def _probe(decode, device: torch.device) -> None:
    """Decode a small photo-like JPEG with ``decode`` and compare it with libjpeg-turbo's decode on the CPU: its
    GPU backend needs the nvJPEG library of the CUDA major version its wheel was built for, and without it every
    image comes back refused."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    pixels = np.clip(np.linspace(0, 255, 64 * 48 * 3).reshape(48, 64, 3) + rng.normal(0, 8, (48, 64, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "JPEG", quality=90)
    data = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
    expected = _torchvision_decoder()([data], torch.device("cpu"))[0]
    try:
        got = decode([data], device)[0].cpu()
    except RuntimeError as e:
        raise RuntimeError(f"it refused a probe image ({e}); is the nvJPEG wheel of its CUDA version installed?")
    if got.shape != expected.shape or (got.float() - expected.float()).abs().mean() > 2:
        raise RuntimeError("its decode of a probe image differs from libjpeg-turbo's")


def device_jpeg_decoder(device: torch.device):
    """(name, decode) for ``device``: on a GPU nvImageCodec's batched decoder where it is installed and its GPU
    backend loads (one line says why not otherwise), then jpeg_decoder's."""
    from . import region_decode

    if device.type == "cuda" and region_decode.available():
        try:
            return "nvimgcodec", _nvimgcodec_gpu_decoder(device)
        except Exception as e:  # no nvJPEG for its CUDA version, no driver...: each raises its own way
            name, decode = jpeg_decoder()
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            log.warning("--decode device: nvImageCodec's GPU decoder is not used (%s); decoding with %s", reason, name)
            return name, decode
    return jpeg_decoder()


@dataclass
class EncodedBatch:
    """One batch as a worker ships it in decode='device': the JPEGs end to end with what to do with each, and
    the images the worker decoded itself. ``size`` is the output side; ``resize`` the shorter side before
    validation's centre crop (0 in training, where each crop box is resized to ``size``)."""

    labels: torch.Tensor  # int64 [B]
    jpegs: torch.Tensor  # uint8 [total bytes]
    offsets: torch.Tensor  # int64 [n + 1]: JPEG k is jpegs[offsets[k]:offsets[k + 1]]
    index: torch.Tensor  # int64 [n]: JPEG k's place in the batch
    boxes: torch.Tensor  # int64 [n, 4]: (top, left, height, width) of each crop (training)
    flips: torch.Tensor  # bool [n]
    modes: torch.Tensor  # int64 [n]: index into _MODES
    decoded: torch.Tensor  # uint8 [k, 3, size, size]: decoded by the worker
    decoded_index: torch.Tensor  # int64 [k]
    names: list  # "key (file) in shard url" of each JPEG, for the warning if it is corrupt
    shards: list  # the shard of each JPEG, for the bad-sample count
    size: int
    resize: int

    @classmethod
    def pack(cls, items: list, labels: list[int], samples: list[dict], *, size: int, resize: int) -> "EncodedBatch":
        """``items``: a Plan or a decoded uint8 [3, size, size] tensor per image, made from ``samples``."""
        plans = [(k, x) for k, x in enumerate(items) if isinstance(x, Plan)]
        done = [(k, x) for k, x in enumerate(items) if not isinstance(x, Plan)]
        lengths = torch.tensor([0] + [len(p.data) for _, p in plans], dtype=torch.int64)
        return cls(
            labels=torch.tensor(labels, dtype=torch.int64),
            jpegs=torch.frombuffer(bytearray().join(p.data for _, p in plans) or bytearray(1), dtype=torch.uint8),
            offsets=lengths.cumsum(0), index=torch.tensor([k for k, _ in plans], dtype=torch.int64),
            boxes=torch.tensor([p.box or (0, 0, 0, 0) for _, p in plans], dtype=torch.int64).view(-1, 4),
            flips=torch.tensor([p.flip for _, p in plans], dtype=torch.bool),
            modes=torch.tensor([_MODES.index(p.interpolation.value) for _, p in plans], dtype=torch.int64),
            decoded=(torch.stack([x for _, x in done]) if done else torch.empty(0, 3, size, size, dtype=torch.uint8)),
            decoded_index=torch.tensor([k for k, _ in done], dtype=torch.int64),
            names=[describe(samples[k]) for k, _ in plans], shards=[samples[k].get("__url__") for k, _ in plans],
            size=size, resize=resize)

    def __len__(self) -> int:
        return len(self.labels)

    def pin_memory(self) -> "EncodedBatch":
        """The DataLoader's pin-memory thread calls this: the bytes reach the decoder from pinned memory."""
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{k: v.pin_memory() for k, v in tensors.items() if torch.is_tensor(v)})

    def jpeg_list(self) -> list[torch.Tensor]:
        o = self.offsets.tolist()
        return [self.jpegs[o[k]:o[k + 1]] for k in range(len(o) - 1)]


class DeviceDecoder:
    """EncodedBatch -> (uint8 [B, 3, size, size] channels_last images, int64 labels), both on ``device``.

    ``train``: a corrupt image's place is taken by another of the batch (batch stays full, resume exact);
    otherwise it is dropped (validation: the batch is shorter, as on the CPU path)."""

    def __init__(self, device, counter, *, train: bool):
        self.device, self.counter, self.train = torch.device(device), counter, train
        self.backend, self._decode = device_jpeg_decoder(self.device)
        self.cpu_fallbacks = 0  # images decoded on the CPU: by a worker, or here after the device refused them

    def __call__(self, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        n, s = len(batch), batch.size
        out = torch.empty((n, s, s, 3), dtype=torch.uint8, device=self.device).permute(0, 3, 1, 2)
        good = torch.ones(n, dtype=torch.bool)
        if len(batch.decoded_index):
            out[batch.decoded_index.to(self.device)] = batch.decoded.to(self.device, non_blocking=True)
            self.cpu_fallbacks += len(batch.decoded_index)
        plans = zip(batch.index.tolist(), batch.boxes.tolist(), batch.flips.tolist(), batch.modes.tolist())
        crops, places, flips = [], [], []
        for image, (place, box, flip, mode) in zip(self.decode_all(batch), plans):
            if image is None:
                good[place] = False
            else:
                crops.append(self.finish(image, batch, box, _MODES[mode]))
                places.append(place)
                flips.append(flip)
        if crops:
            self.place(out, crops, places, flips)
        labels = batch.labels.to(self.device, non_blocking=True)
        if good.all():
            return out, labels
        keep = good.nonzero().flatten()
        if not len(keep):
            raise DataError(f"every sample of a batch is corrupt ({batch.names[0] if batch.names else '?'})")
        # as the workers refill a training batch: place i takes the (i mod good)-th good image
        keep = keep[torch.arange(n) % len(keep)] if self.train else keep
        keep = keep.to(self.device)
        return out[keep].contiguous(memory_format=torch.channels_last), labels[keep]

    def decode_all(self, batch: EncodedBatch) -> list[torch.Tensor | None]:
        """Every JPEG of the batch in one call; if that fails, one by one, each the device refuses on the CPU,
        and None for what cannot be decoded at all."""
        jpegs = batch.jpeg_list()
        if not jpegs:
            return []
        try:
            return self._decode(jpegs, self.device)
        except REFUSED:
            return [self.decode_one(data, batch, k) for k, data in enumerate(jpegs)]

    def decode_one(self, data: torch.Tensor, batch: EncodedBatch, k: int) -> torch.Tensor | None:
        try:
            return self._decode([data], self.device)[0]
        except REFUSED:
            pass
        try:
            image = _torchvision_decoder()([data.cpu()], torch.device("cpu"))[0]
        except REFUSED as e:
            log.warning("skipping corrupt sample %s: %s: %s", batch.names[k], type(e).__name__,
                        str(e).strip().splitlines()[-1])
            self.counter.add(1, 0, batch.shards[k])
            return None
        self.cpu_fallbacks += 1
        return image.to(self.device)

    @staticmethod
    def finish(image: torch.Tensor, batch: EncodedBatch, box: list[int], mode: str) -> torch.Tensor:
        """One decoded image -> its [3, size, size] crop, resized as the CPU path does (flipped in ``place``)."""
        s, mode = batch.size, F2.InterpolationMode(mode)
        if batch.resize:  # validation: shorter side to `resize`, then the centre crop
            return F2.center_crop(F2.resize(image, [batch.resize], interpolation=mode, antialias=True), [s, s])
        return resize_crop(image, tuple(box), (s, s), mode)

    def place(self, out: torch.Tensor, crops: list[torch.Tensor], places: list[int], flips: list[bool]) -> None:
        """The crops into their places in ``out``, those drawn so flipped, in a handful of calls for the batch
        rather than a few per image: on a GPU each call is a kernel launched from one Python thread."""
        stacked = torch.stack(crops)
        if any(flips):
            flipped = torch.tensor([k for k, f in enumerate(flips) if f], device=self.device)
            stacked.index_copy_(0, flipped, stacked.index_select(0, flipped).flip(-1))
        if places == list(range(len(out))):
            out.copy_(stacked)
        else:
            out[torch.tensor(places, device=self.device)] = stacked


def decode_ahead(batches, decoder: DeviceDecoder, depth: int = 2):
    """Yield ``decoder(b)`` for each EncodedBatch of ``batches``, decoded up to ``depth`` batches ahead by one
    thread, so that decoding overlaps the training step; on CUDA on a side stream, each batch handed over
    behind an event. At most ``depth`` batches are in flight (the GPU memory they take: README, "Decoding on
    the GPU"). Only the caller's thread touches ``batches``: with num_workers=0 reading and planning draw from
    the global random generators, which another thread would share."""
    stream = torch.cuda.Stream(decoder.device) if decoder.device.type == "cuda" else None

    def decode(batch: EncodedBatch):
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            images, labels = decoder(batch)
            event = None
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
        return images, labels, event

    source, pending = iter(batches), deque()
    with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
        try:
            for batch in islice(source, depth):
                pending.append(pool.submit(decode, batch))
            while pending:
                images, labels, event = pending.popleft().result()  # a decoding error is raised here
                for batch in islice(source, 1):
                    pending.append(pool.submit(decode, batch))
                if event is not None:
                    current = torch.cuda.current_stream(decoder.device)
                    current.wait_event(event)
                    images.record_stream(current)  # made on the side stream, used and freed on this one
                    labels.record_stream(current)
                yield images, labels
        finally:
            for future in pending:
                future.cancel()
