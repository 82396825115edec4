"""Decode only the crop box of a JPEG, on the CPU, with NVIDIA's nvImageCodec (its libjpeg-turbo backend).

A RandomResizedCrop keeps on average well under half of a photo: the rows below the box need no entropy
decoding and nothing outside it needs the inverse DCT or the colour conversion. nvImageCodec decodes a
region of a code stream (``CodeStream.get_sub_code_stream(region=...)``) with a CPU-only ``Decoder``, which
imports and runs on a machine with no GPU and no driver. Its pixels equal a full libjpeg-turbo decode
(torchvision's ``decode_jpeg``, PIL's) cropped to the box, tested in tests/test_region_decode.py, provided its
EXIF orientation is switched off: it applies it by default, and neither PIL, torchvision nor our other paths do.

``decode_region`` returns None for whatever it does not take (no nvImageCodec, not a three-component JPEG,
no end-of-image marker, anything nvImageCodec returns None for): the caller then takes its usual path with the
same random draws, so corrupt samples fail where they always failed. The cost per image against the other
decoders is in docs/benchmarks.md ("Data loader").

nvImageCodec is imported on first use, once per process, and quietly: without the nvJPEG, nvJPEG2000 and nvTIFF
wheels (which only its GPU backends need) its import prints a few "failed to load" lines, and its logger
prints an error line for every image it cannot decode; both are off here.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import torch

_MODULE = None  # nvidia.nvimgcodec once imported; False when it cannot be
_DECODER: tuple[int, object, object] | None = None  # (pid, Decoder, DecodeParams): one per process


@contextmanager
def _native_stderr_silenced():
    """fd 2 to /dev/null: the extension libraries print with C stdio, which no Python setting reaches."""
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def nvimgcodec():
    """The nvidia.nvimgcodec module, or None where it is not installed or does not load."""
    global _MODULE
    if _MODULE is None:
        before = os.environ.get("PYNVIMGCODEC_VERBOSITY")
        os.environ["PYNVIMGCODEC_VERBOSITY"] = "0"  # read once, at import: no log line per undecodable image
        try:
            with _native_stderr_silenced():
                from nvidia import nvimgcodec as module
            _MODULE = module
        except (ImportError, OSError, RuntimeError):
            _MODULE = False
        finally:
            if before is None:
                del os.environ["PYNVIMGCODEC_VERBOSITY"]
            else:
                os.environ["PYNVIMGCODEC_VERBOSITY"] = before
    return _MODULE or None


def _decoder():
    """This process's CPU-only decoder and decode parameters. Made per process id: a DataLoader worker is a
    fork, and the decoder's thread does not survive one."""
    global _DECODER
    if _DECODER is None or _DECODER[0] != os.getpid():
        nv = nvimgcodec()
        # one thread: each loader worker is a process of its own, already one per core
        decoder = nv.Decoder(device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY, max_num_cpu_threads=1,
                             backends=[nv.Backend(nv.BackendKind.CPU_ONLY)])
        params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB,
                                 sample_format=nv.SampleFormat.I_RGB)
        _DECODER = (os.getpid(), decoder, params)
    return _DECODER[1:]


def available() -> bool:
    return nvimgcodec() is not None


def takes(header: tuple[int, int, int] | None, data: bytes) -> bool:
    """Whether ``decode_region`` gets this image: a three-component (YCbCr) JPEG with its end-of-image marker.
    Greyscale and CMYK decode right too (tested), but are rare enough that today's path keeps them; a file
    without its end marker is truncated, and today's path fails it as before."""
    return header is not None and header[2] == 3 and b"\xff\xd9" in data[-64:]


def decode_region(data: bytes, box: tuple[int, int, int, int]) -> torch.Tensor | None:
    """JPEG bytes, crop ``box`` (top, left, height, width) -> the box's pixels, uint8 ``[3, height, width]``
    over HWC memory (channels_last, as torchvision's decoder gives), or None where the image goes the usual
    way (see ``takes``; call it first)."""
    nv = nvimgcodec()
    if nv is None:
        return None
    decoder, params = _decoder()
    i, j, h, w = box
    try:
        stream = nv.CodeStream(data).get_sub_code_stream(region=nv.Region(i, j, i + h, j + w))
        image = decoder.decode(stream, params=params)
    except RuntimeError:  # a header it cannot parse; the usual path raises, or decodes it
        return None
    if image is None:
        return None
    pixels = torch.from_numpy(np.asarray(image))  # shares the decoder's buffer, which the array keeps alive
    return pixels.permute(2, 0, 1) if pixels.shape == (h, w, 3) else None


def describe() -> str:
    """Which decoder the training workers' crops use, for the run's record (engine's run_info.json)."""
    nv = nvimgcodec()
    if nv is None:
        return "torchvision decode_jpeg, PIL draft (nvImageCodec not installed)"
    return f"nvImageCodec {nv.__version__} region decode (libjpeg-turbo, CPU), PIL draft for large crops"
