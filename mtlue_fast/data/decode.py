"""Decoding original image files into cache entries: the contract, the shared geometry, and PIL.

Decoders: ``PilDecoder`` here (the CPU fallback), ``dali.DaliDecoder`` (NVIDIA DALI, GPU or CPU)
and ``gpu_decode.TorchvisionDecoder`` (nvJPEG through torchvision, GPU); ``cache.resolve_decoder``
picks one. Every decoder has the same contract, ``decode(paths, resize) -> (images, errors)``:
``images`` is uint8 ``[n, C, H, W]`` at ``resize.size`` in host memory; ``errors[i]`` is None, or
why file i could not be decoded (its row of ``images`` is then zeros and must not be used). Geometry, shared by all
decoders: convert to L (1 channel; RGBA and RGB converted) or RGB, cut ``resize.center_crop`` from
the centre (offsets ``(H-h)//2, (W-w)//2``), then resize bilinearly with antialiasing.
NYUv2's ``.npy`` images (float HxWx3 in [0, 1]) are read with numpy and scaled by 255.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .specs import ResizeSpec


class Decoder(Protocol):
    name: str

    def decode(self, paths: list[str], resize: ResizeSpec) -> tuple[np.ndarray, list[str | None]]: ...


def center_box(width: int, height: int, crop: tuple[int, int]) -> tuple[int, int, int, int]:
    """PIL box (left, top, right, bottom) of the centred ``crop`` = (h, w)."""
    h, w = crop
    if h > height or w > width:
        raise ValueError(f"centre crop {crop} is larger than the {height}x{width} image")
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """Decoder worker threads by default: the usable cores, at most 8."""
    return max(1, min(8, usable_cores()))


def read_encoded(path: str) -> np.ndarray:
    """The file's bytes as a 1-D uint8 array; an empty file raises (no decoder can take it)."""
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise ValueError(f"empty file: {path}")
    return data


_EOI_WINDOW = 1024  # bytes at the end of a JPEG searched for its end-of-image marker


def looks_like_jpeg(blob: np.ndarray) -> bool:
    """Whether the uint8 bytes start with a JPEG's start-of-image marker."""
    return blob.size >= 3 and blob[0] == 0xFF and blob[1] == 0xD8 and blob[2] == 0xFF


def is_complete_jpeg(blob: np.ndarray) -> bool:
    """Whether ``blob`` (uint8 bytes) starts like a JPEG and has an end-of-image marker near its
    end. A file cut short has none, and nvJPEG (DALI's GPU decoder, torchvision's) may decode such a
    file without complaint, so the GPU decoders hand these to PIL, which rejects them."""
    if not looks_like_jpeg(blob):
        return False
    tail = blob[-_EOI_WINDOW:]
    return bool(np.any((tail[:-1] == 0xFF) & (tail[1:] == 0xD9)))


# Start-of-frame markers (SOF0-SOF15 less DHT C4, JPG C8 and DAC CC) and the markers without a length.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE_MARKERS = frozenset(range(0xD0, 0xD8)) | {0x01}


def jpeg_components(blob: np.ndarray) -> int | None:
    """The number of colour components in the JPEG's frame header (1 grayscale, 3 YCbCr or RGB,
    4 CMYK or YCCK), or None when the bytes are not a JPEG or end before the header."""
    if not looks_like_jpeg(blob):
        return None
    data = blob.tobytes() if isinstance(blob, np.ndarray) else bytes(blob)
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            return None
        if marker in _SOF_MARKERS:
            return data[pos + 9] if pos + 9 < len(data) else None
        pos += 2 + ((data[pos + 2] << 8) | data[pos + 3])
    return None


def is_gpu_jpeg(blob: np.ndarray) -> bool:
    """Whether the GPU decoders are given ``blob``: a complete JPEG (:func:`is_complete_jpeg`) of one
    or three components. CMYK and YCCK JPEGs (rare) go to PIL, whose conversion to RGB is the
    reference; what nvJPEG makes of them is not relied on."""
    return is_complete_jpeg(blob) and jpeg_components(blob) in (1, 3)


@dataclass
class ReadBatch:
    """One batch of files read for a device decoder (indices into the decoder's ``paths``)."""

    device: list[int] = field(default_factory=list)  # files the device decoder takes
    blobs: list[np.ndarray] = field(default_factory=list)  # their bytes, in the same order
    host: list[int] = field(default_factory=list)  # files PIL decodes (NYUv2 ``.npy`` arrays among them)
    errors: dict[int, str] = field(default_factory=dict)  # unreadable files: why


def read_batches(paths: list[str], batch_size: int, for_device: Callable[[np.ndarray], bool],
                 pool: ThreadPoolExecutor) -> Iterator[ReadBatch]:
    """The files of ``paths`` in batches of ``batch_size``, each read by ``pool`` while the caller
    decodes the batch before it. A file's bytes go to the device decoder where ``for_device(bytes)``;
    ``.npy`` arrays and the other files go to PIL; a missing, unreadable or empty file is an error."""

    def read(i: int) -> np.ndarray | BaseException | None:
        """The file's bytes for the device; None: a file for PIL; an exception: unreadable."""
        if paths[i].endswith(".npy"):
            return None
        try:
            blob = read_encoded(paths[i])
        except Exception as err:
            return err
        return blob if for_device(blob) else None

    batches = [range(s, min(s + batch_size, len(paths))) for s in range(0, len(paths), batch_size)]
    ahead = [pool.submit(read, i) for i in batches[0]] if batches else []
    for k, batch in enumerate(batches):
        results = [f.result() for f in ahead]
        if k + 1 < len(batches):
            ahead = [pool.submit(read, i) for i in batches[k + 1]]
        read_batch = ReadBatch()
        for i, result in zip(batch, results):
            if isinstance(result, BaseException):
                read_batch.errors[i] = error_text(result)
            elif result is None:
                read_batch.host.append(i)
            else:
                read_batch.device.append(i)
                read_batch.blobs.append(result)
        yield read_batch


def error_text(err: BaseException) -> str:
    """How a decoding failure is reported in ``errors``."""
    return f"{type(err).__name__}: {err}"


def open_converted(path: str, channels: int):
    """The image file (or NYUv2 ``.npy`` array) at ``path`` as a PIL image at its own size, converted
    as every decoder converts it: L for 1 channel, RGB for 3. Raises on truncated or corrupt data."""
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    if path.endswith(".npy"):
        return Image.fromarray(npy_image_to_uint8(np.load(path))).convert(mode)
    with Image.open(path) as opened:
        opened.load()
        return opened.convert(mode)


def npy_image_to_uint8(array: np.ndarray) -> np.ndarray:
    """HxWx3 float in [0, 1] (or uint8) -> uint8 HxWx3."""
    if array.dtype == np.uint8:
        return array
    return np.clip(np.rint(array.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)


class PilDecoder:
    """Decode with Pillow on ``num_threads`` host threads (Pillow releases the GIL while it decodes
    and resizes); ``None``: :func:`default_threads`, 1: one file after the other in this thread."""

    name = "pil"
    num_threads: int | None = None

    def __init__(self, num_threads: int | None = None):
        if num_threads is not None and num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
        self.num_threads = num_threads

    def decode(self, paths: list[str], resize: ResizeSpec) -> tuple[np.ndarray, list[str | None]]:
        height, width = resize.size
        out = np.zeros((len(paths), resize.channels, height, width), dtype=np.uint8)
        errors: list[str | None] = [None] * len(paths)

        def one(i: int) -> None:
            try:
                out[i] = self.decode_one(paths[i], resize)
            except Exception as err:  # corrupt/truncated/unreadable: reported by the caller
                errors[i] = error_text(err)

        threads = min(self.num_threads or default_threads(), len(paths))
        if threads <= 1:
            for i in range(len(paths)):
                one(i)
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                list(pool.map(one, range(len(paths))))
        return out, errors

    @staticmethod
    def decode_one(path: str, resize: ResizeSpec) -> np.ndarray:
        from PIL import Image

        image = open_converted(str(path), resize.channels)
        if resize.center_crop is not None:
            image = image.crop(center_box(image.width, image.height, resize.center_crop))
        height, width = resize.size
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
