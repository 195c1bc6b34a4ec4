"""GPU JPEG decoding through torchvision (nvJPEG): ``TorchvisionDecoder``, for the cache builder.

``cache.resolve_decoder`` picks it on a GPU when NVIDIA DALI is not installed. It keeps the
contract and the geometry of ``decode.py``: ``decode(paths, resize) -> (images, errors)`` with
``images`` uint8 ``[n, C, H, W]`` in host memory; the centre crop ``resize.center_crop`` at offsets
``((H-h)//2, (W-w)//2)``, then a bilinear antialiased resize to ``resize.size``; one channel as
PIL's ``convert("L")``.

- Files are read on host threads, one batch ahead of the decoder.
- JPEG files (the SOI marker first, the EOI marker within the last KiB, one or three components)
  are decoded in batches by ``torchvision.io.decode_jpeg(list_of_tensors, device=...)`` into RGB;
  the grayscale conversion, crop and resize run on the device, batched over images of the same size,
  and each batch is copied to the host once.
- Anything else (PNG, NYUv2's ``.npy``, a JPEG cut short, a CMYK JPEG, not an image) is decoded by PIL
  (``PilDecoder.decode_one``) on the host; a corrupt file fails there and is reported.
- A batch the GPU decoder rejects is redone file by file; a file it rejects alone is retried with
  PIL (counted in ``pil_fallbacks``) and reported when PIL fails too.

The resize is ``interpolate(mode="bilinear", antialias=True)`` on float32, which computes PIL's
antialiased bilinear filter (the triangle kernel widened by the downscale factor, its weights
renormalised where it leaves the image), rounded to uint8: within one grey level of PIL on the same
decoded pixels. nvJPEG differs from libjpeg (PIL's decoder) in its inverse DCT and, for colour
JPEGs with subsampled chroma (most photographs), in how it upsamples the chroma: libjpeg smooths it
("fancy upsampling"), nvJPEG does not. After the crop and the downscale this is a fraction of a
grey level on average, but tens of levels on a few pixels at sharp colour edges (docs/method.md,
section 2.6).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from .decode import PilDecoder, default_threads, error_text, is_gpu_jpeg, read_batches
from .specs import ResizeSpec

#: ``decode_fn(blobs) -> images``: 1-D uint8 CPU tensors (encoded JPEGs) -> uint8 ``[3, H, W]``
#: RGB tensors on the decoder's device; raises when any blob cannot be decoded.
DecodeFn = Callable[[list[torch.Tensor]], list[torch.Tensor]]

# PIL's ITU-R 601-2 luma in 16-bit fixed point: L = (19595 R + 38470 G + 7471 B + 2^15) >> 16.
_LUMA = (19595, 38470, 7471)

_PROBE_COLOUR = (200, 30, 90)  # RGB of the probe's image


def probe() -> str | None:
    """Decode a tiny JPEG of one colour with torchvision on the current GPU: None when that works
    (right shape, device and colour), else why not, in words."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    try:
        from PIL import Image

        from ..compat import import_torchvision

        import_torchvision()
        from torchvision.io import ImageReadMode, decode_jpeg

        buffer = io.BytesIO()
        Image.new("RGB", (16, 8), _PROBE_COLOUR).save(buffer, format="JPEG")
        blob = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        (image,) = decode_jpeg([blob], mode=ImageReadMode.RGB, device="cuda")
    except Exception as err:  # no torchvision, a CPU-only build, no nvJPEG: the caller falls back
        return f"torchvision.io.decode_jpeg(device='cuda') failed: {error_text(err)}"
    if tuple(image.shape) != (3, 8, 16) or image.device.type != "cuda":
        return f"decode_jpeg(device='cuda') returned shape {tuple(image.shape)} on {image.device}, expected (3, 8, 16) on cuda"
    colour = image.float().mean(dim=(1, 2)).cpu()
    if (colour - torch.tensor(_PROBE_COLOUR, dtype=torch.float32)).abs().max() > 8:
        return f"decode_jpeg(device='cuda') decoded the colour {_PROBE_COLOUR} as {tuple(round(v) for v in colour.tolist())}"
    return None


@functools.lru_cache(maxsize=None)
def why_unavailable() -> str | None:
    """:func:`probe`'s answer, probed once per process."""
    return probe()


def available() -> bool:
    """Whether torchvision decodes JPEGs on this machine's GPU (probed once with a tiny image)."""
    return why_unavailable() is None


def to_gray(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 ``[..., 3, H, W]`` RGB -> uint8 ``[..., 1, H, W]`` as PIL's ``convert("L")`` (exact)."""
    wide = rgb.to(torch.int32)
    luma = wide[..., 0:1, :, :] * _LUMA[0] + wide[..., 1:2, :, :] * _LUMA[1] + wide[..., 2:3, :, :] * _LUMA[2]
    return ((luma + 32768) >> 16).to(torch.uint8)


def crop_resize(images: torch.Tensor, resize: ResizeSpec) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` RGB images of one size -> uint8 ``[B, C, h, w]`` at ``resize.size``:
    grayscale (C = 1) first, then the centre crop, then the antialiased bilinear resize, on the
    images' device. A centre crop larger than the image raises ValueError."""
    if resize.channels not in (1, 3):
        raise ValueError(f"resize.channels must be 1 or 3, got {resize.channels}")
    if resize.channels == 1:
        images = to_gray(images)
    height, width = images.shape[-2:]
    if resize.center_crop is not None:
        h, w = resize.center_crop
        if h > height or w > width:
            raise ValueError(f"centre crop {resize.center_crop} is larger than the {height}x{width} image")
        top, left = (height - h) // 2, (width - w) // 2
        images = images[..., top : top + h, left : left + w]
    if tuple(images.shape[-2:]) == tuple(resize.size):
        return images.contiguous()
    resized = F.interpolate(images.float(), size=tuple(resize.size), mode="bilinear", antialias=True, align_corners=False)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


class TorchvisionDecoder:
    """Decode JPEGs on a GPU with ``torchvision.io.decode_jpeg`` (see the module docstring).

    Args:
        device: where JPEGs are decoded and resized (default ``"cuda"``, the current GPU).
        batch_size: JPEGs per ``decode_jpeg`` call.
        num_threads: host threads reading files and decoding the PIL-bound ones
            (default: the usable cores, at most 8).
        decode_fn: replaces ``decode_jpeg`` (:data:`DecodeFn`); for tests.
    """

    def __init__(self, device: torch.device | str = "cuda", batch_size: int = 256, num_threads: int | None = None,
                 decode_fn: DecodeFn | None = None):  # fmt: skip
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("TorchvisionDecoder on a CUDA device, but torch.cuda.is_available() is False")
        self.name = f"torchvision-{self.device.type}"
        self.batch_size = batch_size
        self.num_threads = num_threads or default_threads()
        self.decode_fn = decode_fn
        self.pil_fallbacks = 0

    def _decode_jpegs(self, blobs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.decode_fn is not None:
            return self.decode_fn(blobs)
        from ..compat import import_torchvision

        import_torchvision()
        from torchvision.io import ImageReadMode, decode_jpeg

        if self.device.type == "cuda":
            # torchvision allocates the outputs on the current stream but writes them from a stream
            # of its own that does not wait for this one: memory the allocator hands out may still be
            # read by kernels queued here. Waiting for them first costs little (one wait per batch).
            torch.cuda.current_stream(self.device).synchronize()
        return list(decode_jpeg(blobs, mode=ImageReadMode.RGB, device=self.device))

    # -- the contract ------------------------------------------------------------------------
    def decode(self, paths: list[str], resize: ResizeSpec) -> tuple[np.ndarray, list[str | None]]:
        height, width = resize.size
        out = np.zeros((len(paths), resize.channels, height, width), dtype=np.uint8)
        errors: list[str | None] = [None] * len(paths)
        with ThreadPoolExecutor(max_workers=self.num_threads) as pool:
            for batch in read_batches(paths, self.batch_size, is_gpu_jpeg, pool):
                for i, why in batch.errors.items():
                    errors[i] = why
                if batch.device:
                    blobs = [torch.from_numpy(blob) for blob in batch.blobs]
                    self._decode_on_device(batch.device, blobs, paths, resize, out, errors, pool)
                self._decode_with_pil(batch.host, paths, resize, out, errors, pool)
        return out, errors

    # -- internals ---------------------------------------------------------------------------
    def _decode_on_device(self, index: list[int], blobs: list[torch.Tensor], paths, resize, out, errors, pool) -> None:
        try:
            images = self._decode_jpegs(blobs)
        except Exception:  # one undecodable JPEG fails the batch: redo it file by file
            images = None
        if images is None:
            kept, images, rejected = [], [], []
            for i, blob in zip(index, blobs):
                try:
                    images.append(self._decode_jpegs([blob])[0])
                    kept.append(i)
                except Exception:
                    rejected.append(i)
            index = kept
            self._decode_with_pil(rejected, paths, resize, out, errors, pool, counts_as_fallback=True)
        by_shape: dict[tuple, list[int]] = {}
        for position, image in enumerate(images):
            by_shape.setdefault(tuple(image.shape), []).append(position)
        for positions in by_shape.values():
            rows = [index[p] for p in positions]
            try:
                result = crop_resize(torch.stack([images[p] for p in positions]), resize)
            except ValueError as err:  # e.g. a centre crop larger than these images
                for i in rows:
                    errors[i] = error_text(err)
                continue
            out[rows] = result.cpu().numpy()

    def _decode_with_pil(self, index: Sequence[int], paths, resize, out, errors, pool, counts_as_fallback: bool = False) -> None:
        def one(i: int) -> bool:
            try:
                out[i] = PilDecoder.decode_one(paths[i], resize)
            except Exception as err:
                errors[i] = error_text(err)
                return False
            return True

        decoded = list(pool.map(one, index))
        if counts_as_fallback:
            self.pil_fallbacks += sum(decoded)
