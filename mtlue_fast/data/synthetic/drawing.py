"""Drawing shared by the synthetic datasets, vectorised over the cases of a chunk: label patterns (a
shape, a texture and a colour, jittered per case), smooth noise, painted face backgrounds, blur, and
the last steps (per-pixel noise, uint8 quantisation, JPEG encoding with fixed settings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


# ----------------------------------------------------------------------------------------------------
# pattern drawing (vectorised over the cases of a chunk)


@dataclass(frozen=True)
class _Pattern:
    """A (task, class) look. Coordinates are relative to the drawing region: ``cy, cx`` in [0, 1],
    radius ``r`` as a fraction of the region's shorter side; ``freq`` in cycles per radius; angles in
    radians; ``color`` per channel (one entry for grayscale): added at full strength, or with
    ``blend`` a paint colour in [0, 1] that pixels move towards by the case's strength (opacity).
    ``amp`` is the largest strength; each case draws ``amp * U(0.15, 1)``."""

    cy: float
    cx: float
    r: float
    shape: str = "disc"
    texture: str = "flat"
    freq: float = 2.0
    angle: float = 0.0
    tex_angle: float = 0.0
    aspect: float = 1.0
    mix: float = 0.6
    color: tuple[float, ...] = (1.0,)
    amp: float = 0.3
    jitter: float = 0.03
    spin: float = 0.15
    mirror: bool = False  # random side: cx -> 1 - cx (and the angle mirrored) for half the cases
    blend: bool = False  # color is a target in [0, 1] that pixels are pulled towards (paint), not added
    color2: tuple[float, ...] | None = None  # if set: the lower half (image rows below the centre) uses it
    scale: tuple[float, float] = (0.8, 1.25)  # per-case size jitter (multiplies r)

    def half_window(self, region_min: float) -> int:
        extent = 1.45 if self.shape == "gauss" else 1.0
        return int(math.ceil(self.r * region_min * self.scale[1] * extent)) + 2


def _shape_weight(shape: str, u: np.ndarray, v: np.ndarray, aspect: float, radius: np.ndarray) -> np.ndarray:
    """Coverage in [0, 1] of a unit-radius shape at local coordinates ``(u, v)`` (radius units),
    anti-aliased over ~1.2 pixels (``radius`` in pixels, broadcastable)."""
    au, av = np.abs(u), np.abs(v)
    if shape == "gauss":
        return np.exp(-2.5 * (u * u + v * v))
    if shape == "disc":
        d = np.sqrt(u * u + v * v)
    elif shape == "ellipse":
        d = np.sqrt(u * u + (v * aspect) ** 2)
    elif shape == "square":
        d = np.maximum(au, av)
    elif shape == "rect":
        d = np.maximum(au, av * aspect)
    elif shape == "diamond":
        d = au + av
    elif shape == "ring":
        d = 1.0 + (np.abs(np.sqrt(u * u + v * v) - 0.72) - 0.28) / 0.28 * 0.3
    elif shape == "arc":  # lower half of a ring, a "smile" (rotate by pi for a frown)
        d = 1.0 + (np.abs(np.sqrt(u * u + v * v) - 0.75) - 0.25) / 0.25 * 0.3
        d = np.where(v > -0.2, d, 9.0)
    elif shape == "tri":  # apex up, inradius 0.5
        d = np.maximum(np.maximum(v, -0.5 * v + 0.866 * u), -0.5 * v - 0.866 * u) / 0.5
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.clip((1.0 - d) * (radius / 1.2) + 0.5, 0.0, 1.0)


def _texture(texture: str, u: np.ndarray, v: np.ndarray, freq: float, phase: np.ndarray) -> np.ndarray | float:
    """Texture in [0, 1] at local coordinates (``freq`` cycles per radius, ``phase`` radians)."""
    two_pi_f = 2.0 * math.pi * freq
    if texture == "flat":
        return 1.0
    if texture == "grating":
        return 0.5 + 0.5 * np.cos(two_pi_f * u + phase)
    if texture == "checker":
        return 0.5 + 0.5 * np.sign(np.sin(0.5 * two_pi_f * u + phase) * np.sin(0.5 * two_pi_f * v + phase))
    if texture == "rings":
        return 0.5 + 0.5 * np.cos(two_pi_f * np.sqrt(u * u + v * v) + phase)
    if texture == "dots":
        return (0.5 + 0.5 * np.cos(two_pi_f * u + phase)) * (0.5 + 0.5 * np.cos(two_pi_f * v + phase))
    raise ValueError(f"unknown texture {texture!r}")


def _draw(
    canvas: np.ndarray,
    pad: int,
    region: tuple[float, float, float, float],
    pattern: _Pattern,
    which: np.ndarray,
    strength: np.ndarray,
    rng: np.random.Generator,
) -> None:
    """Add ``pattern`` to the images ``which`` of ``canvas`` in place.

    Args:
        canvas: float32 ``[B, H + 2 pad, W + 2 pad, C]``, pixel values in [0, 1] (padded on each side).
        region: ``(y0, x0, h, w)`` in image pixels: the frame the pattern's relative coordinates use.
        which: int indices into ``B`` (no repeats).
        strength: ``[len(which)]`` multipliers of ``pattern.color`` (per-case intensity).
    """
    n = which.size
    if n == 0:
        return
    _, hp, wp, channels = canvas.shape
    h, w = hp - 2 * pad, wp - 2 * pad
    y0, x0, rh, rw = region
    rmin = min(rh, rw)
    scale = rng.uniform(*pattern.scale, n)
    cy_rel = pattern.cy + rng.uniform(-pattern.jitter, pattern.jitter, n)
    cx_rel = pattern.cx + rng.uniform(-pattern.jitter, pattern.jitter, n)
    theta = pattern.angle + rng.normal(0.0, pattern.spin, n)
    phase = rng.uniform(0.0, 2.0 * math.pi, n)
    if pattern.mirror:
        flip = rng.random(n) < 0.5
        cx_rel = np.where(flip, 1.0 - cx_rel, cx_rel)
        theta = np.where(flip, math.pi - theta, theta)
    radius = pattern.r * rmin * scale
    cy = np.clip(y0 + cy_rel * rh, 0.0, h - 1.0)
    cx = np.clip(x0 + cx_rel * rw, 0.0, w - 1.0)
    _render(canvas, pad, pattern, which, cy, cx, radius, theta, phase, strength)


def _render(canvas, pad, pattern, which, cy, cx, radius, theta, phase, strength) -> None:
    """Add ``pattern`` at explicit per-case placements (all ``[n]``: centre and radius in image
    pixels, rotation and texture phase in radians, strength multiplying the colour) in place.
    Only a window of ``2 k + 1`` pixels around each centre is touched; centres must lie in the image."""
    n = which.size
    if n == 0:
        return
    channels = canvas.shape[-1]
    radius = np.asarray(radius, np.float32)
    k = int(math.ceil(float(radius.max()) * (1.45 if pattern.shape == "gauss" else 1.0))) + 2
    if k > pad:
        raise AssertionError(f"pattern window {k} exceeds the canvas padding {pad}")
    offsets = np.arange(-k, k + 1)
    rows = np.rint(cy).astype(np.int64)[:, None] + offsets  # [n, S]
    cols = np.rint(cx).astype(np.int64)[:, None] + offsets
    yy = ((rows + 0.5 - cy[:, None]) / radius[:, None]).astype(np.float32)[:, :, None]
    xx = ((cols + 0.5 - cx[:, None]) / radius[:, None]).astype(np.float32)[:, None, :]
    c = np.cos(theta).astype(np.float32)[:, None, None]
    s = np.sin(theta).astype(np.float32)[:, None, None]
    u, v = xx * c + yy * s, yy * c - xx * s
    weight = _shape_weight(pattern.shape, u, v, pattern.aspect, radius[:, None, None])
    if pattern.texture != "flat":
        ct, st = math.cos(pattern.tex_angle), math.sin(pattern.tex_angle)
        tu, tv = u * ct + v * st, v * ct - u * st
        tex = _texture(pattern.texture, tu, tv, pattern.freq, np.asarray(phase, np.float32)[:, None, None])
        weight = weight * ((1.0 - pattern.mix) + pattern.mix * tex)
    weight = weight * np.asarray(strength, np.float32)[:, None, None]
    color = np.asarray(pattern.color, dtype=np.float32)
    if color.size != channels:
        color = np.broadcast_to(color, (channels,)) if color.size == 1 else color[:channels]
    if pattern.color2 is not None:  # two-tone: upper half color, lower half color2 (an h-flip keeps it)
        color = np.where((yy < 0)[..., None], color, np.asarray(pattern.color2, np.float32)[:channels])
    index = (which[:, None, None], rows[:, :, None] + pad, cols[:, None, :] + pad)
    if pattern.blend:  # paint: visible on dark and bright backgrounds alike (no clipping)
        current = canvas[index]
        canvas[index] = current + weight[..., None] * (color - current)
    else:
        canvas[index] += weight[..., None] * color


def _strength(rng: np.random.Generator, n: int, amp: float) -> np.ndarray:
    """Per-case intensity ``amp * U(0.15, 1)``: some cases are faint."""
    return amp * rng.uniform(0.15, 1.0, n)


def _paint(hue: float, sign: float, saturation: float = 0.8) -> tuple[float, float, float]:
    """A paint colour in [0, 1] of ``hue``: light (``sign`` > 0, value 0.95) or dark (value 0.3)."""
    value = 0.95 if sign > 0 else 0.3
    h6 = (hue % 1.0) * 6.0
    i, f = int(h6), h6 - int(h6)
    p, q, t = 1 - saturation, 1 - saturation * f, 1 - saturation * (1 - f)
    rgb = [(1, t, p), (q, 1, p), (p, 1, t), (p, q, 1), (t, p, 1), (1, p, q)][i % 6]
    return tuple(float(value * c) for c in rgb)


# ----------------------------------------------------------------------------------------------------
# backgrounds


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation weights ``[n_out, n_in]`` from ``n_in`` lattice points spanning the output."""
    pos = np.arange(n_out) * ((n_in - 1) / max(n_out - 1, 1))
    i0 = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (pos - i0).astype(np.float32)
    out = np.zeros((n_out, n_in), np.float32)
    out[np.arange(n_out), i0] += 1.0 - frac
    out[np.arange(n_out), i1] += frac
    return out


def _smooth_noise(rng: np.random.Generator, b: int, h: int, w: int, c: int, cells: int) -> np.ndarray:
    """Smooth random field ``[b, h, w, c]`` (about unit std), ``cells`` bumps across each side.

    ``np.einsum`` without ``optimize`` runs numpy's own loops, not BLAS: the same sums on every
    thread count, and no waking of BLAS worker threads for tiny products.
    """
    lattice = rng.standard_normal((b, cells + 1, cells + 1, c), dtype=np.float32)
    rows = np.einsum("xj,bijc->bixc", _interp_matrix(w, cells + 1), lattice)
    return np.einsum("yi,bixc->byxc", _interp_matrix(h, cells + 1), rows)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``[1, h, 1]`` and ``[1, 1, w]``."""
    y = (np.arange(h, dtype=np.float32) + 0.5)[None, :, None]
    x = (np.arange(w, dtype=np.float32) + 0.5)[None, None, :]
    return y, x


def _ellipse(h: int, w: int, cy, cx, ay, ax, soft: float = 1.5) -> np.ndarray:
    """Soft ellipse masks ``[b, h, w]`` in [0, 1]; centres and semi-axes ``[b]`` in pixels."""
    y, x = _grid(h, w)
    cy, cx, ay, ax = (np.asarray(a, np.float32)[:, None, None] for a in (cy, cx, ay, ax))
    d = np.sqrt(((y - cy) / ay) ** 2 + ((x - cx) / ax) ** 2)
    return np.clip((1.0 - d) * (np.minimum(ay, ax) / soft) + 0.5, 0.0, 1.0)


def _blend(img: np.ndarray, colour: np.ndarray, mask: np.ndarray) -> None:
    """``img = img + (colour - img) * mask`` in place; ``colour`` is consumed (overwritten)."""
    colour -= img
    colour *= mask[..., None]
    img += colour


_EYE = _Pattern(0.0, 0.0, 1.0, "ellipse", aspect=2.6, color=(-0.55, -0.55, -0.5))
_MOUTH = _Pattern(0.0, 0.0, 1.0, "ellipse", aspect=4.0, color=(0.05, -0.3, -0.25))


def _face_background(
    rng: np.random.Generator, canvas: np.ndarray, pad: int, face: tuple[float, float, float, float]
) -> None:
    """Paint random portraits into ``canvas`` ``[b, H + 2 pad, W + 2 pad, 3]`` (in place): textured
    backdrop, hair, skin with shading, eyes, mouth. ``face`` = (centre y, centre x, semi-axis y,
    semi-axis x) as fractions of (H, W), jittered per image. Nothing here depends on a label."""
    b, hp, wp, _ = canvas.shape
    h, w = hp - 2 * pad, wp - 2 * pad
    img = canvas[:, pad : pad + h, pad : pad + w]
    grey = rng.uniform(0.15, 0.85, (b, 1, 1, 1))  # muted backdrops: a saturated one would mimic paint marks
    img[...] = (grey + rng.uniform(-0.08, 0.08, (b, 1, 1, 3))).astype(np.float32)
    img += 0.05 * _smooth_noise(rng, b, h, w, 3, 4)
    img += 0.06 * _smooth_noise(rng, b, h, w, 1, 4)
    fy, fx, fay, fax = face
    cy = (fy + rng.uniform(-0.03, 0.03, b)) * h
    cx = (fx + rng.uniform(-0.03, 0.03, b)) * w
    ay = fay * rng.uniform(0.92, 1.08, b) * h
    ax = fax * rng.uniform(0.9, 1.1, b) * w
    hair = (rng.uniform(0.05, 0.55, (b, 1, 1, 1)) * np.array([1.0, 0.85, 0.7])).astype(np.float32)
    _blend(img, hair + 0.06 * _smooth_noise(rng, b, h, w, 1, 8), _ellipse(h, w, cy - 0.12 * ay, cx, ay * 1.05, ax * 1.18))
    tone = rng.uniform(0.0, 1.0, (b, 1, 1, 1)).astype(np.float32)
    dark, light = np.array([0.36, 0.25, 0.19], np.float32), np.array([0.93, 0.78, 0.67], np.float32)
    _blend(img, dark + (light - dark) * tone + 0.05 * _smooth_noise(rng, b, h, w, 3, 6), _ellipse(h, w, cy, cx, ay, ax))
    every, ones, zeros = np.arange(b), np.ones(b), np.zeros(b)
    for side in (-1.0, 1.0):
        _render(canvas, pad, _EYE, every, cy - 0.2 * ay, cx + side * 0.36 * ax, 0.16 * ax, zeros, zeros, ones)
    _render(canvas, pad, _MOUTH, every, cy + 0.45 * ay, cx, 0.3 * ax, zeros, zeros, ones)


def _face_pad(h: int, w: int, face: tuple[float, float, float, float]) -> int:
    """Canvas padding the eyes and mouth of :func:`_face_background` need."""
    return int(math.ceil(0.3 * face[3] * 1.1 * w)) + 3


def _box_blur(img: np.ndarray, radius: int) -> np.ndarray:
    """Separable box blur of ``[n, h, w, c]`` with edge padding (``2 radius + 1`` taps)."""
    for axis in (1, 2):
        pad = [(0, 0)] * img.ndim
        pad[axis] = (radius + 1, radius)
        c = np.cumsum(np.pad(img, pad, mode="edge"), axis=axis, dtype=np.float32)
        size = img.shape[axis]
        hi = np.take(c, np.arange(2 * radius + 1, 2 * radius + 1 + size), axis=axis)
        lo = np.take(c, np.arange(0, size), axis=axis)
        img = (hi - lo) / (2 * radius + 1)
    return img


def _finish(canvas: np.ndarray, pad: int, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Crop the padding, add uniform per-pixel noise of std ``sigma``, quantise to uint8 ``[b, h, w, c]``."""
    img = canvas[:, pad : canvas.shape[1] - pad, pad : canvas.shape[2] - pad]
    noise = rng.random(img.shape, dtype=np.float32)
    noise -= 0.5
    noise *= np.float32(sigma * math.sqrt(12.0) * 255.0)
    noise += img * np.float32(255.0)
    np.clip(noise, 0.0, 255.0, out=noise)
    return np.rint(noise, out=noise).astype(np.uint8)


def _save_jpeg(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array, "RGB").save(path, format="JPEG", quality=95, subsampling="4:2:0", optimize=False)
