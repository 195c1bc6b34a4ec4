"""Decoding original image files into cache entries with PIL (the fallback when DALI is missing).

Every decoder has the same contract, ``decode(paths, resize) -> (images, errors)``: ``images`` is
uint8 ``[n, C, H, W]`` at ``resize.size``; ``errors[i]`` is None, or why file i could not be
decoded (its row of ``images`` is then zeros and must not be used). Geometry, shared by all
decoders: convert to L (1 channel; RGBA and RGB converted) or RGB, cut ``resize.center_crop`` from
the centre (offsets ``(H-h)//2, (W-w)//2``), then resize bilinearly with antialiasing.
NYUv2's ``.npy`` images (float HxWx3 in [0, 1]) are read with numpy and scaled by 255.
"""

from __future__ import annotations

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


def npy_image_to_uint8(array: np.ndarray) -> np.ndarray:
    """HxWx3 float in [0, 1] (or uint8) -> uint8 HxWx3."""
    if array.dtype == np.uint8:
        return array
    return np.clip(np.rint(array.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)


class PilDecoder:
    """Decode with Pillow, one file at a time (no worker threads; the cache builds in chunks)."""

    name = "pil"

    def decode(self, paths: list[str], resize: ResizeSpec) -> tuple[np.ndarray, list[str | None]]:
        height, width = resize.size
        out = np.zeros((len(paths), resize.channels, height, width), dtype=np.uint8)
        errors: list[str | None] = [None] * len(paths)
        for i, path in enumerate(paths):
            try:
                out[i] = self.decode_one(path, resize)
            except Exception as err:  # corrupt/truncated/unreadable: reported by the caller
                errors[i] = f"{type(err).__name__}: {err}"
        return out, errors

    @staticmethod
    def decode_one(path: str, resize: ResizeSpec) -> np.ndarray:
        from PIL import Image

        mode = "L" if resize.channels == 1 else "RGB"
        if path.endswith(".npy"):
            image = Image.fromarray(npy_image_to_uint8(np.load(path))).convert(mode)
        else:
            with Image.open(path) as opened:
                opened.load()  # raises on truncated or corrupt data
                image = opened.convert(mode)
        if resize.center_crop is not None:
            image = image.crop(center_box(image.width, image.height, resize.center_crop))
        height, width = resize.size
        if image.size != (width, height):
            image = image.resize((width, height), Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
