"""Synthetic datasets written in the ORIGINAL on-disk layouts (SPEC 2.5, 2.7): the embedded default.

``write(dataset, root, n_train, n_test, seed)`` produces CelebA-, ChestX-ray14-, UTKFace- or
NYUv2-style files that the real readers (:mod:`mtlue_fast.data.formats`) parse unchanged, quirks
included (CRLF attribute file with a count line and an unused validation partition, a few RGBA PNGs,
UTKFace names without a race field). Output is a function of the arguments only: every random draw
comes from ``numpy.random.Generator`` streams keyed by ``(seed, dataset, split, purpose)`` and the
encoders run with fixed settings, so the same call writes byte-identical files (on any number of
threads; the chunks are rendered in parallel, each from its own stream).

Labels are learnable from the pixels. Every (task, class) owns a visual pattern with a shape, a
texture, a colour (grey level for X-rays) and a task-specific region; each case draws it with jittered
position, size, orientation and phase and a per-case strength ``amp * U(0.15, 1)`` (some positives
are faint) on a textured random background (a face, a chest, a room) with smooth and per-pixel noise.
Binary tasks draw the pattern for positives only; multi-class tasks draw one pattern per class.
Binary labels come from a latent Gaussian factor model (correlated co-occurrence) thresholded to
realistic prevalences. Patterns are told apart by appearance, not only by place, because the victim
(a CNN with global pooling, trained with random crops and h-flips) barely sees where they are:
CelebA attributes are two-tone paint marks with distinct (upper paint, lower paint, shape, size)
codes; X-ray findings differ in shape, size, texture and polarity and mostly appear on a random side.
Amplitudes were tuned so that a small CNN reaches a mean AUC near 0.9, not 1.0 (see ``_CHEST_PATTERNS``
and ``_CELEBA_AMP``).

NYUv2 scenes are ray-cast box rooms (floor, walls, ceiling, furniture, wall decals) whose
segmentation, depth and normals are consistent by construction, and whose image is class albedo and
texture shaded by normal and depth.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .specs import CHESTXRAY_FINDINGS, NYUV2_SEG_CLASSES, UTKFACE_AGE_EDGES

__all__ = [
    "CELEBA_ATTRIBUTES", "CELEBA_PREVALENCE", "CHESTXRAY_PREVALENCE", "DATASETS", "DEFAULT_SIZES",
    "NYUV2_CLASSES", "UTKFACE_RACE_PREVALENCE", "write", "write_with_labels",
]  # fmt: skip

DATASETS = ("celeba", "chestxray", "utkface", "nyuv2")
#: Bumped whenever the generated pixels or labels change, so shared copies written by older code are not reused.
VERSION = 1

#: Image size ``(H, W)`` in pixels written by default (the original releases' sizes, X-rays reduced).
DEFAULT_SIZES: dict[str, tuple[int, int]] = {
    "celeba": (218, 178),
    "chestxray": (128, 128),
    "utkface": (200, 200),
    "nyuv2": (288, 384),
}

CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby",
    "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male",
    "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose",
    "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair",
    "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
)  # fmt: skip

#: Positive rate per attribute, close to the full CelebA release.
CELEBA_PREVALENCE: dict[str, float] = {
    "5_o_Clock_Shadow": 0.111, "Arched_Eyebrows": 0.267, "Attractive": 0.513, "Bags_Under_Eyes": 0.205,
    "Bald": 0.022, "Bangs": 0.152, "Big_Lips": 0.241, "Big_Nose": 0.234, "Black_Hair": 0.239,
    "Blond_Hair": 0.148, "Blurry": 0.051, "Brown_Hair": 0.205, "Bushy_Eyebrows": 0.142, "Chubby": 0.058,
    "Double_Chin": 0.047, "Eyeglasses": 0.065, "Goatee": 0.063, "Gray_Hair": 0.042, "Heavy_Makeup": 0.387,
    "High_Cheekbones": 0.455, "Male": 0.417, "Mouth_Slightly_Open": 0.483, "Mustache": 0.042,
    "Narrow_Eyes": 0.115, "No_Beard": 0.835, "Oval_Face": 0.284, "Pale_Skin": 0.043, "Pointy_Nose": 0.277,
    "Receding_Hairline": 0.080, "Rosy_Cheeks": 0.066, "Sideburns": 0.057, "Smiling": 0.482,
    "Straight_Hair": 0.208, "Wavy_Hair": 0.320, "Wearing_Earrings": 0.189, "Wearing_Hat": 0.048,
    "Wearing_Lipstick": 0.472, "Wearing_Necklace": 0.123, "Wearing_Necktie": 0.073, "Young": 0.774,
}  # fmt: skip

#: Positive rate per finding (real ChestX-ray14 rates, the rarest raised to 2% so they can be learned).
CHESTXRAY_PREVALENCE: dict[str, float] = {
    "Atelectasis": 0.10, "Cardiomegaly": 0.03, "Effusion": 0.12, "Infiltration": 0.17, "Mass": 0.05,
    "Nodule": 0.056, "Pneumonia": 0.02, "Pneumothorax": 0.047, "Consolidation": 0.042, "Edema": 0.021,
    "Emphysema": 0.022, "Fibrosis": 0.02, "Pleural_Thickening": 0.03, "Hernia": 0.02,
}  # fmt: skip

#: UTKFace race shares (0 White, 1 Black, 2 Asian, 3 Indian, 4 Others).
UTKFACE_RACE_PREVALENCE = (0.42, 0.19, 0.15, 0.14, 0.10)

NYUV2_CLASSES = (
    "bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa", "table", "tv",
    "wall", "window",
)  # fmt: skip

_SPLIT_ID = {"train": 0, "test": 1, "val": 2}
_LABELS, _META, _PIXELS = 1, 2, 3
_CHUNK = 64  # images rendered together; fixed, so the random streams do not depend on anything else


# ----------------------------------------------------------------------------------------------------
# public API


def write(
    dataset: str,
    root: str | Path,
    n_train: int,
    n_test: int,
    seed: int,
    size: tuple[int, int] | int | None = None,
) -> Path:
    """Write a synthetic ``dataset`` in its original on-disk layout under ``root``; return ``root``.

    Args:
        dataset: ``celeba``, ``chestxray``, ``utkface`` or ``nyuv2``.
        root: folder to create. It must not exist or be empty (nothing a user owns is overwritten).
            Files are written under a temporary sibling folder that is renamed to ``root`` when
            complete, so an interrupted call leaves nothing behind.
        n_train: images in the training split (CelebA partition 0, ``train_val_list.txt``,
            NYUv2 ``train/``; for UTKFace part of one pool of ``n_train + n_test`` parseable files).
        n_test: images in the test split (CelebA partition 2, ``test_list.txt``, NYUv2 ``val/``).
        seed: non-negative integer; the same arguments give byte-identical files.
        size: image ``(H, W)`` in pixels, or one int for a square; ``DEFAULT_SIZES[dataset]`` if None.

    Extras, as in the real releases: CelebA gets ``max(1, round(0.05 * n_train))`` validation images
    (partition 1), UTKFace 2 files with malformed names; readers must ignore both.

    Raises:
        ValueError: unknown dataset, bad counts/size/seed, or ``root`` exists and is not empty.
    """
    return write_with_labels(dataset, root, n_train, n_test, seed, size)[0]


def write_with_labels(
    dataset: str,
    root: str | Path,
    n_train: int,
    n_test: int,
    seed: int,
    size: tuple[int, int] | int | None = None,
) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    """Like :func:`write`, also returning the ground truth that was written.

    Returns:
        ``(root, truth)`` with ``truth[split][relative_path] = labels`` for split ``train``/``test``,
        ``relative_path`` the image path under ``root`` with ``/`` separators, and ``labels`` as the
        readers return them: int64 ``[40]`` 0/1 in file order (CelebA), int64 ``[14]`` 0/1 in
        ``CHESTXRAY_FINDINGS`` order (ChestX-ray), int64 ``[3]`` = (age bin, race, gender) (UTKFace;
        ``truth["train"]`` holds the whole pool of ``n_train + n_test`` parseable files, ``truth["test"]``
        is empty because the reader makes its own split), or an object ``[3]`` of the relative paths
        of the label, depth and normal maps (NYUv2).
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    for name, n in (("n_train", n_train), ("n_test", n_test)):
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    hw = _resolve_size(dataset, size)
    out = Path(root).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"refusing to write synthetic {dataset} into {out}: it exists and is not empty")
    # written under a temporary sibling and renamed when complete: an interrupted call leaves no
    # half-written dataset behind (which a later call would then refuse to overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if partial.exists():  # left by a crashed call of a process that had the same id
        shutil.rmtree(partial)
    partial.mkdir()
    writer = {"celeba": _write_celeba, "chestxray": _write_chestxray, "utkface": _write_utkface, "nyuv2": _write_nyuv2}
    try:
        truth = writer[dataset](partial, int(n_train), int(n_test), int(seed), hw)
        if out.exists():  # an empty folder: replace it
            out.rmdir()
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out, truth


def _resolve_size(dataset: str, size: tuple[int, int] | int | None) -> tuple[int, int]:
    if size is None:
        return DEFAULT_SIZES[dataset]
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        h = w = int(size)
    else:
        try:
            h, w = (int(s) for s in size)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            raise ValueError(f"size must be an int or (H, W), got {size!r}") from None
    if min(h, w) < 16 or max(h, w) > 4096:
        raise ValueError(f"size must be between 16 and 4096 pixels per side, got {(h, w)}")
    return h, w


def _rng(seed: int, dataset: str, split: str, purpose: int, *part: int) -> np.random.Generator:
    """An independent stream per (seed, dataset, split, purpose[, chunk]): labels do not depend on
    the image size, and chunks can be rendered in any order, on any number of threads."""
    return np.random.default_rng([seed, DATASETS.index(dataset), _SPLIT_ID[split], purpose, *part])


def _workers() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def _parallel(jobs: int, job) -> None:
    """Run ``job(0) .. job(jobs - 1)`` on a thread pool (numpy, PIL and file writes release the GIL).
    Every job owns its random stream and its output files, so the result does not depend on order."""
    workers = min(_workers(), jobs)
    if workers <= 1:
        for j in range(jobs):
            job(j)
        return
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(job, range(jobs)):
            pass


def _write_chunks(seed: int, dataset: str, split: str, labels: np.ndarray, render, save) -> None:
    """Render ``labels`` in chunks of ``_CHUNK`` (``render(rng, labels_chunk) -> uint8 [b, ...]``)
    and hand each image to ``save(array, index)``."""
    def job(j: int) -> None:
        start = j * _CHUNK
        chunk = render(_rng(seed, dataset, split, _PIXELS, j), labels[start : start + _CHUNK])
        for i, array in enumerate(chunk):
            save(array, start + i)

    _parallel(-(-len(labels) // _CHUNK), job)


# ----------------------------------------------------------------------------------------------------
# correlated binary labels


def _probit(p: float) -> float:
    """Inverse standard normal CDF (bisection on erf; exact to double precision, no scipy)."""
    lo, hi = -12.0, 12.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _loadings(names: tuple[str, ...], factors: dict[str, dict[str, float]]) -> np.ndarray:
    """Factor loading matrix ``[K, F]`` from ``{factor: {task: loading}}``, rows scaled to norm <= 0.95."""
    load = np.zeros((len(names), len(factors)))
    for f, table in enumerate(factors.values()):
        for task, value in table.items():
            load[names.index(task), f] = value
    norm = np.sqrt((load**2).sum(1, keepdims=True))
    return load * np.minimum(1.0, 0.95 / np.maximum(norm, 1e-12))


def _latent_binary(rng: np.random.Generator, n: int, prevalence: np.ndarray, load: np.ndarray) -> np.ndarray:
    """Bool ``[n, K]``: ``z = F @ load.T + sqrt(1 - |load|^2) * e`` (unit variance, correlation
    ``load @ load.T`` off the diagonal) thresholded at ``probit(1 - prevalence)``."""
    factors = rng.standard_normal((n, load.shape[1]))
    common = np.zeros((n, load.shape[0]))
    for f in range(load.shape[1]):  # no BLAS: identical sums on every machine
        common += factors[:, f, None] * load[None, :, f]
    unique = rng.standard_normal((n, load.shape[0])) * np.sqrt(1.0 - (load**2).sum(1))
    threshold = np.array([_probit(1.0 - p) for p in prevalence])
    return (common + unique) > threshold


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


# ----------------------------------------------------------------------------------------------------
# CelebA

_CELEBA_FACTORS: dict[str, dict[str, float]] = {
    "male": {
        "Male": 0.95, "Heavy_Makeup": -0.8, "Wearing_Lipstick": -0.85, "No_Beard": -0.55,
        "5_o_Clock_Shadow": 0.5, "Goatee": 0.45, "Mustache": 0.45, "Sideburns": 0.45, "Arched_Eyebrows": -0.5,
        "Attractive": -0.35, "Wearing_Earrings": -0.5, "Bald": 0.4, "Wearing_Necktie": 0.45, "Rosy_Cheeks": -0.3,
        "Bushy_Eyebrows": 0.3, "Big_Nose": 0.35, "Receding_Hairline": 0.25, "Wavy_Hair": -0.3, "Bangs": -0.2,
        "Blond_Hair": -0.3, "Wearing_Necklace": -0.35, "Double_Chin": 0.2, "Chubby": 0.25,
        "High_Cheekbones": -0.2, "Oval_Face": -0.15, "Pointy_Nose": -0.2, "Big_Lips": -0.15,
    },
    "beard": {"Goatee": 0.6, "Mustache": 0.6, "No_Beard": -0.65, "Sideburns": 0.5, "5_o_Clock_Shadow": 0.3},
    "age": {
        "Young": -0.8, "Gray_Hair": 0.6, "Bald": 0.4, "Receding_Hairline": 0.45, "Double_Chin": 0.45,
        "Chubby": 0.4, "Bags_Under_Eyes": 0.45, "Attractive": -0.45, "Eyeglasses": 0.3, "Wearing_Necktie": 0.2,
    },
    "smile": {"Smiling": 0.9, "High_Cheekbones": 0.7, "Mouth_Slightly_Open": 0.55, "Narrow_Eyes": 0.25,
              "Rosy_Cheeks": 0.15},
    "hair": {"Black_Hair": 0.55, "Blond_Hair": -0.55, "Brown_Hair": -0.1, "Pale_Skin": -0.2, "Straight_Hair": 0.2,
             "Wavy_Hair": -0.2},
    "glam": {"Attractive": 0.5, "Heavy_Makeup": 0.4, "Wearing_Lipstick": 0.3, "Wearing_Earrings": 0.3, "Oval_Face": 0.35,
             "Pointy_Nose": 0.3, "Arched_Eyebrows": 0.3},
}  # fmt: skip

# Rows of a 6 x 7 grid over the central 140x140 crop, loosely where a feature sits on a face (the last
# row holds 5, spread over its width). The grid corners, on hair and backdrop where marks are hardest
# to see, hold frequent attributes.
_CELEBA_GRID = (
    ("Male", "Bald", "Receding_Hairline", "Bangs", "Black_Hair", "Blond_Hair", "Young"),
    ("Gray_Hair", "Straight_Hair", "Wavy_Hair", "Arched_Eyebrows", "Bushy_Eyebrows", "Eyeglasses", "Narrow_Eyes"),
    ("Bags_Under_Eyes", "Big_Nose", "Pointy_Nose", "High_Cheekbones", "Rosy_Cheeks", "Pale_Skin", "Oval_Face"),
    ("Smiling", "Mouth_Slightly_Open", "Big_Lips", "Wearing_Lipstick", "Heavy_Makeup", "Mustache", "5_o_Clock_Shadow"),
    ("Goatee", "No_Beard", "Sideburns", "Double_Chin", "Chubby", "Wearing_Earrings", "Attractive"),
    ("Wearing_Necklace", "Wearing_Necktie", "Wearing_Hat", "Brown_Hair", "Blurry"),
)  # fmt: skip

# Looks: a GAP-pooled CNN is nearly blind to where a small pattern sits and h-flips move it, and at
# 70x70 a ring, a cross and a disc of 5 pixels look alike; what survives is colour, coarse shape and
# size. So each attribute paints a two-tone mark (upper half one paint, lower half another, which an
# h-flip keeps) with a shape (disc, wide bar, tall bar) and a size (large, small). Attribute k (file
# order) has upper paint u = k // 6, m = k % 6 -> shape m % 3 and size m // 3, and lower paint
# (u + 1 + m) % 7. Any two attributes differ in at least two of (upper, lower, shape, size).
_CELEBA_SHAPES = (("disc", 1.0, 0.0), ("rect", 1.6, 0.0), ("rect", 1.6, 90.0))  # shape, aspect, angle in degrees
_CELEBA_RADII = (0.07, 0.05)  # large, small, as fractions of the 140-pixel crop
_CELEBA_PAINTS = (  # red, yellow, green, blue, magenta, near black, near white
    (0.95, 0.2, 0.15), (0.95, 0.9, 0.15), (0.2, 0.85, 0.25), (0.2, 0.4, 0.95), (0.9, 0.25, 0.9),
    (0.06, 0.06, 0.06), (0.97, 0.97, 0.97),
)  # fmt: skip
_CELEBA_FACE = (0.55, 0.5, 0.3, 0.36)  # face ellipse: centre y, x and semi-axes as fractions of (H, W)
_CELEBA_AMP = 0.30  # paint opacity of an attribute pattern for a 50% attribute (rarer ones: stronger)
_CELEBA_BLUR = 2  # box radius (pixels at 178x218) of the Blurry attribute, applied twice


def _celeba_patterns() -> list[_Pattern]:
    """One pattern per attribute in file order, placed on ``_CELEBA_GRID`` (relative to the crop)."""
    where: dict[str, tuple[float, float]] = {}
    for row, names in enumerate(_CELEBA_GRID):
        for col, name in enumerate(names):
            # inside the 128x128 the victim's centre crop (64 of 70) keeps, away from its edges
            where[name] = (0.12 + 0.76 * row / (len(_CELEBA_GRID) - 1), 0.12 + 0.76 * col / (len(names) - 1))
    patterns = []
    for k, name in enumerate(CELEBA_ATTRIBUTES):
        upper, m = divmod(k, 6)
        shape, aspect, angle = _CELEBA_SHAPES[m % 3]
        cy, cx = where[name]
        patterns.append(
            _Pattern(cy, cx, r=_CELEBA_RADII[m // 3], shape=shape, aspect=aspect, angle=math.radians(angle),
                     color=_CELEBA_PAINTS[upper], color2=_CELEBA_PAINTS[(upper + 1 + m) % 7], amp=_celeba_amp(name),
                     jitter=0.015, spin=0.1, scale=(0.9, 1.1), blend=True)
        )  # fmt: skip
    return patterns


def _celeba_amp(name: str) -> float:
    """Opacity of an attribute's paint: rare attributes (few examples to learn from) draw stronger,
    ``_CELEBA_AMP * (0.5 / minority rate) ** 0.35`` (at most 0.95), so none is hopeless or trivial."""
    p = CELEBA_PREVALENCE[name]
    return min(0.95, _CELEBA_AMP * (0.5 / min(p, 1.0 - p)) ** 0.35)


def _celeba_region(h: int, w: int) -> tuple[float, float, float, float]:
    """The central crop the cache keeps (140x140 of 218x178), scaled to ``(h, w)``."""
    ch, cw = h * 140 / 218, w * 140 / 178
    return ((h - ch) / 2, (w - cw) / 2, ch, cw)


def _celeba_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    prevalence = np.array([CELEBA_PREVALENCE[a] for a in CELEBA_ATTRIBUTES])
    return _latent_binary(rng, n, prevalence, _loadings(CELEBA_ATTRIBUTES, _CELEBA_FACTORS)).astype(np.int64)


def _celeba_images(rng: np.random.Generator, labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Face images uint8 ``[b, H, W, 3]`` for 0/1 ``labels`` ``[b, 40]``."""
    h, w = hw
    region = _celeba_region(h, w)
    patterns = _celeba_patterns()
    pad = max([p.half_window(min(region[2:])) for p in patterns] + [_face_pad(h, w, _CELEBA_FACE)]) + 1
    blur_radius = max(1, round(_CELEBA_BLUR * w / 178))
    blurry = CELEBA_ATTRIBUTES.index("Blurry")
    canvas = np.zeros((len(labels), h + 2 * pad, w + 2 * pad, 3), np.float32)
    _face_background(rng, canvas, pad, _CELEBA_FACE)
    strengths = {}
    for k, pattern in enumerate(patterns):
        which = np.flatnonzero(labels[:, k])
        strengths[k] = _strength(rng, which.size, pattern.amp)
        _draw(canvas, pad, region, pattern, which, strengths[k], rng)
    which = np.flatnonzero(labels[:, blurry])
    if which.size:  # Blurry also blurs the whole image, more for stronger cases
        sharp = canvas[which]
        soft = _box_blur(_box_blur(sharp, blur_radius), blur_radius)
        mix = (strengths[blurry] / patterns[blurry].amp).astype(np.float32)[:, None, None, None]
        canvas[which] = sharp + (soft - sharp) * mix
    return _finish(canvas, pad, rng, 0.035)


def _write_celeba(root: Path, n_train: int, n_test: int, seed: int, hw: tuple[int, int]):
    n_val = max(1, round(0.05 * n_train))
    splits = (("train", n_train, 0), ("val", n_val, 1), ("test", n_test, 2))
    image_dir = root / "img_align_celeba"
    image_dir.mkdir()
    attr_rows, partition_rows = [], []
    truth: dict[str, dict[str, np.ndarray]] = {"train": {}, "test": {}}
    index = 0
    for split, n, partition in splits:
        labels = _celeba_labels(_rng(seed, "celeba", split, _LABELS), n)
        names = [f"{index + i + 1:06d}.jpg" for i in range(n)]
        index += n
        _write_chunks(
            seed, "celeba", split, labels, lambda rng, lab: _celeba_images(rng, lab, hw),
            lambda array, i, names=names: _save_jpeg(array, image_dir / names[i]),
        )  # fmt: skip
        for name, row in zip(names, labels):
            attr_rows.append(name + " " + " ".join(" 1" if v else "-1" for v in row))
            partition_rows.append(f"{name} {partition}")
            if split in truth:
                truth[split][f"img_align_celeba/{name}"] = row.copy()
    header = [str(len(attr_rows)), " ".join(CELEBA_ATTRIBUTES) + " "]
    (root / "list_attr_celeba.txt").write_bytes(("\r\n".join(header + attr_rows) + "\r\n").encode("ascii"))
    (root / "list_eval_partition.txt").write_bytes(("\n".join(partition_rows) + "\n").encode("ascii"))
    return truth


# ----------------------------------------------------------------------------------------------------
# ChestX-ray14

_CHEST_FACTORS: dict[str, dict[str, float]] = {
    "illness": {f: 0.3 for f in CHESTXRAY_FINDINGS},
    "fluid": {"Effusion": 0.55, "Atelectasis": 0.45, "Edema": 0.5, "Consolidation": 0.45, "Pneumonia": 0.4,
              "Infiltration": 0.4, "Cardiomegaly": 0.35},
    "tumour": {"Mass": 0.55, "Nodule": 0.5, "Pleural_Thickening": 0.3},
    "chronic": {"Emphysema": 0.5, "Fibrosis": 0.5, "Pneumothorax": 0.4, "Pleural_Thickening": 0.4, "Hernia": 0.2},
}  # fmt: skip

# Multiplies every finding's amplitude below. Calibrated with the package's own victim (ResNet-18 at
# width 0.25, 64x64 cache, random crop 56, 14 epochs, batch 128, 10,000 training images): mean AUC 0.89
# (1.0x gave 0.60-0.71, 2.0x 0.84). The per-finding ratios are the ridge-calibrated ones.
_CHEST_AMP_SCALE = 2.5

# Each finding's look, coordinates relative to the whole image (lungs at x ~0.3 and ~0.7).
# mirror=True: the finding appears on a random side. Colour +1 = opacity (brighter), -1 = lucency.
_CHEST_PATTERNS: dict[str, _Pattern] = {
    "Atelectasis": _Pattern(
        0.62, 0.30, 0.11, "rect", "flat",
        aspect=4.0, angle=-0.35, color=(1.0,), amp=0.068, jitter=0.04, mirror=True,
    ),
    "Cardiomegaly": _Pattern(
        0.60, 0.56, 0.17, "disc", "rings",
        freq=1.0, mix=0.3, color=(1.0,), amp=0.068, jitter=0.02,
    ),
    "Effusion": _Pattern(
        0.75, 0.27, 0.13, "ellipse", "flat",
        aspect=2.2, angle=0.25, color=(1.0,), amp=0.068, jitter=0.03, mirror=True,
    ),
    "Infiltration": _Pattern(
        0.45, 0.30, 0.15, "gauss", "dots",
        freq=3.0, mix=0.8, color=(1.0,), amp=0.086, jitter=0.06, mirror=True,
    ),
    "Mass": _Pattern(0.40, 0.30, 0.08, "disc", "flat", color=(1.0,), amp=0.065, jitter=0.08, mirror=True),
    "Nodule": _Pattern(0.38, 0.68, 0.04, "disc", "flat", color=(1.0,), amp=0.086, jitter=0.10, mirror=True),
    "Pneumonia": _Pattern(
        0.52, 0.32, 0.13, "gauss", "rings",
        freq=1.5, mix=0.6, color=(1.0,), amp=0.109, jitter=0.05, mirror=True,
    ),
    "Pneumothorax": _Pattern(
        0.25, 0.20, 0.14, "ellipse", "flat",
        aspect=3.0, angle=1.2, color=(-1.0,), amp=0.054, jitter=0.03, mirror=True,
    ),
    "Consolidation": _Pattern(
        0.58, 0.70, 0.08, "square", "flat",
        color=(1.0,), amp=0.05, jitter=0.05, spin=0.4, mirror=True,
    ),
    "Edema": _Pattern(
        0.45, 0.50, 0.25, "ellipse", "grating",
        freq=3.0, tex_angle=math.pi / 2, aspect=2.2, mix=0.7, color=(1.0,), amp=0.056, jitter=0.02,
    ),
    "Emphysema": _Pattern(
        0.35, 0.30, 0.16, "ellipse", "checker",
        freq=3.0, aspect=1.4, angle=math.pi / 2, mix=0.5, color=(-1.0,), amp=0.052, jitter=0.03, mirror=True,
    ),
    "Fibrosis": _Pattern(
        0.30, 0.68, 0.11, "diamond", "grating",
        freq=3.5, angle=0.8, mix=0.9, color=(1.0,), amp=0.08, jitter=0.04, mirror=True,
    ),
    "Pleural_Thickening": _Pattern(
        0.45, 0.15, 0.17, "rect", "flat",
        aspect=5.0, angle=math.pi / 2, color=(1.0,), amp=0.084, jitter=0.02, mirror=True,
    ),
    "Hernia": _Pattern(0.80, 0.50, 0.07, "ring", "flat", color=(1.0,), amp=0.115, jitter=0.03),
}  # fmt: skip


def _chest_background(rng: np.random.Generator, b: int, h: int, w: int) -> np.ndarray:
    """Random frontal chest radiographs ``[b, h, w, 1]`` in [0, 1] (no findings): dark surround,
    bright torso, dark lungs with ribs, bright spine, heart and diaphragm, exposure variation."""
    y, x = _grid(h, w)
    yr, xr = y / h, x / w
    img = np.broadcast_to(rng.uniform(0.03, 0.12, (b, 1, 1)).astype(np.float32), (b, h, w)).copy()
    cx = 0.5 + rng.uniform(-0.03, 0.03, b)
    torso = _ellipse(
        h, w, (0.56 + rng.uniform(-0.02, 0.02, b)) * h, cx * w, 0.55 * h * np.ones(b), rng.uniform(0.42, 0.48, b) * w, soft=4.0
    )
    img += torso * rng.uniform(0.45, 0.6, (b, 1, 1)).astype(np.float32)
    lung_y = (0.46 + rng.uniform(-0.03, 0.03, b)) * h
    lung_ay, lung_ax = rng.uniform(0.27, 0.33, b) * h, rng.uniform(0.15, 0.19, b) * w
    lungs = np.maximum(
        _ellipse(h, w, lung_y, (cx - 0.2) * w, lung_ay, lung_ax, soft=3.0),
        _ellipse(h, w, lung_y, (cx + 0.2) * w, lung_ay, lung_ax, soft=3.0),
    )
    ribs = 0.5 + 0.5 * np.cos(
        2 * math.pi * (yr * rng.uniform(7, 9, (b, 1, 1)) + 2.0 * (xr - 0.5) ** 2) + rng.uniform(0, 6.3, (b, 1, 1))
    )
    img -= lungs * (rng.uniform(0.28, 0.36, (b, 1, 1)) - 0.07 * ribs).astype(np.float32)
    spine = np.exp(-(((x - cx[:, None, None] * w) / (0.045 * w)) ** 2)) * (yr > 0.05)
    img += 0.18 * spine.astype(np.float32)
    heart = _ellipse(
        h, w, 0.6 * h * np.ones(b), (cx + 0.05) * w, rng.uniform(0.1, 0.13, b) * h, rng.uniform(0.11, 0.14, b) * w, soft=3.0
    )
    img += 0.15 * heart
    dome = (yr > 0.8 + 0.08 * ((xr - 0.5) * 2.2) ** 2 + rng.uniform(-0.03, 0.03, (b, 1, 1))).astype(np.float32)
    img += 0.2 * dome * torso
    img += 0.04 * _smooth_noise(rng, b, h, w, 1, 6)[..., 0]
    img = img * rng.uniform(0.85, 1.15, (b, 1, 1)).astype(np.float32)
    return img[..., None].astype(np.float32)


def _chest_images(rng: np.random.Generator, labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """X-rays uint8 ``[b, H, W]`` for 0/1 ``labels`` ``[b, 14]``."""
    h, w = hw
    region = (0.0, 0.0, float(h), float(w))
    patterns = [_CHEST_PATTERNS[f] for f in CHESTXRAY_FINDINGS]
    pad = max(p.half_window(min(h, w)) for p in patterns) + 1
    b = len(labels)
    canvas = np.zeros((b, h + 2 * pad, w + 2 * pad, 1), np.float32)
    canvas[:, pad : pad + h, pad : pad + w] = _chest_background(rng, b, h, w)
    for k, pattern in enumerate(patterns):
        which = np.flatnonzero(labels[:, k])
        _draw(canvas, pad, region, pattern, which, _strength(rng, which.size, pattern.amp * _CHEST_AMP_SCALE), rng)
    return _finish(canvas, pad, rng, 0.02)[..., 0]


def _chest_patients(rng: np.random.Generator, n: int) -> list[int]:
    """Follow-up counts of the patients covering exactly ``n`` images (geometric plus a heavy tail, mean ~3)."""
    counts: list[int] = []
    while sum(counts) < n:
        extra = int(rng.integers(1, 12)) if rng.random() < 0.15 else 0  # a few patients with many visits
        counts.append(int(rng.geometric(0.5)) + extra)
    counts[-1] -= sum(counts) - n
    return counts


def _write_chestxray(root: Path, n_train: int, n_test: int, seed: int, hw: tuple[int, int]):
    meta = _rng(seed, "chestxray", "train", _META)
    counts = {split: _chest_patients(meta, n) for split, n in (("train", n_train), ("test", n_test))}
    n_patients = len(counts["train"]) + len(counts["test"])
    ids = np.sort(meta.choice(np.arange(1, max(30806, 3 * n_patients)), n_patients, replace=False))
    owner = meta.permutation(np.array(["train"] * len(counts["train"]) + ["test"] * len(counts["test"])))
    patients = {"train": list(ids[owner == "train"]), "test": list(ids[owner == "test"])}
    (root / "images").mkdir()
    rows: list[tuple[str, str]] = []
    truth: dict[str, dict[str, np.ndarray]] = {"train": {}, "test": {}}
    sizes = ((2500, 2048), (2048, 2500), (3056, 2544), (2992, 2991), (2021, 2021), (2500, 2500), (3056, 2544))
    spacings = (0.143, 0.168, 0.139, 0.171, 0.194311, 0.1395)
    for split in ("train", "test"):
        names, info = [], []
        for pid, count in zip(patients[split], counts[split]):
            age = int(np.clip(meta.normal(47.0, 17.0), 1, 94))
            sex = "M" if meta.random() < 0.56 else "F"
            for follow_up in range(count):
                names.append(f"{pid:08d}_{follow_up:03d}.png")
                width, height = sizes[int(meta.integers(len(sizes)))]
                spacing = spacings[int(meta.integers(len(spacings)))]
                view = "PA" if meta.random() < 0.6 else "AP"
                info.append((follow_up, int(pid), min(age + follow_up // 3, 95), sex, view, width, height, spacing))
        names_info = sorted(zip(names, info))
        names = [x[0] for x in names_info]
        labels = _latent_binary(
            _rng(seed, "chestxray", split, _LABELS), len(names),
            np.array([CHESTXRAY_PREVALENCE[f] for f in CHESTXRAY_FINDINGS]), _loadings(CHESTXRAY_FINDINGS, _CHEST_FACTORS),
        ).astype(np.int64)  # fmt: skip
        rgba = set(meta.choice(len(names), max(1, round(0.02 * len(names))), replace=False).tolist())

        def save(array: np.ndarray, j: int, names=names, rgba=rgba) -> None:
            if j in rgba:  # the release's quirk: a few PNGs are RGBA (gray in RGB, opaque alpha)
                array = np.concatenate([np.repeat(array[..., None], 3, -1), np.full(array.shape + (1,), 255, np.uint8)], -1)
                image = Image.fromarray(array, "RGBA")
            else:
                image = Image.fromarray(array, "L")
            image.save(root / "images" / names[j], format="PNG", compress_level=6, optimize=False)

        _write_chunks(seed, "chestxray", split, labels, lambda rng, lab: _chest_images(rng, lab, hw), save)
        for (name, (follow_up, pid, age, sex, view, width, height, spacing)), row in zip(names_info, labels):
            findings = sorted(CHESTXRAY_FINDINGS[k] for k in np.flatnonzero(row))
            text = "|".join(findings) if findings else "No Finding"
            fields = (name, text, follow_up, pid, age, sex, view, width, height, repr(spacing), repr(spacing))
            rows.append((name, ",".join(str(f) for f in fields)))
            truth[split][f"images/{name}"] = row.copy()
        (root / ("train_val_list.txt" if split == "train" else "test_list.txt")).write_text(
            "".join(n + "\n" for n in names), encoding="ascii", newline="\n"
        )
    header = (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
    )
    body = "".join(r + "\n" for _, r in sorted(rows))
    (root / "Data_Entry_2017_v2020.csv").write_text(header + "\n" + body, encoding="ascii", newline="\n")
    return truth


# ----------------------------------------------------------------------------------------------------
# UTKFace

_UTK_FACE = (0.55, 0.5, 0.38, 0.34)
_UTK_AGE_COLORS = ((0.98, 0.85, 0.3), (0.2, 0.25, 0.55))  # paint: warm light (young) -> dark bluish (old)


def _utk_patterns() -> tuple[list[_Pattern], list[_Pattern], list[_Pattern]]:
    """(age bin patterns [9], race patterns [5], gender patterns [2]), relative to the whole image.

    Age: a forehead band whose wrinkle-like grating frequency rises and colour shifts with the bin.
    Race: a cheek mark (random side) with a per-class shape, texture and hue.
    Gender: a chin mark, stubble-like dark dots (0) or a bright warm arc (1).
    """
    n_age = len(UTKFACE_AGE_EDGES) + 1
    young, old = (np.array(c) for c in _UTK_AGE_COLORS)
    age = [
        _Pattern(0.24, 0.5, 0.16, "rect", "grating", freq=0.8 + 0.55 * b, tex_angle=math.pi / 2, aspect=2.8, mix=0.6,
                 color=tuple(float(c) for c in young + (old - young) * b / (n_age - 1)), amp=0.35, jitter=0.025, spin=0.08,
                 blend=True)
        for b in range(n_age)
    ]  # fmt: skip
    race_look = (("disc", "flat", 0.0, 0.02), ("square", "grating", 2.0, 0.2), ("diamond", "dots", 2.5, 0.4),
                 ("tri", "rings", 1.5, 0.6), ("ring", "checker", 2.5, 0.8))  # fmt: skip
    race = [
        _Pattern(0.55, 0.25, 0.09, shape, texture, freq=freq, mix=0.5, color=_paint(hue, 1.0 if c % 2 else -1.0),
                 amp=0.25, jitter=0.025, mirror=True, blend=True)
        for c, (shape, texture, freq, hue) in enumerate(race_look)
    ]  # fmt: skip
    gender = [
        _Pattern(0.84, 0.5, 0.11, "ellipse", "dots", freq=3.0, aspect=1.6, mix=0.8, color=(0.12, 0.1, 0.08), amp=0.24,
                 jitter=0.02, blend=True),
        _Pattern(0.84, 0.5, 0.11, "arc", "flat", color=(0.98, 0.5, 0.6), amp=0.24, jitter=0.02, blend=True),
    ]  # fmt: skip
    return age, race, gender


def _utk_ages(rng: np.random.Generator, n: int) -> np.ndarray:
    """Ages 1..100: ~10% infants/children (mostly 1-5), a bulk at 20-40, a tail to 100."""
    part = rng.choice(3, n, p=(0.12, 0.58, 0.30))
    child = np.minimum(1 + rng.geometric(0.3, n), 14)
    adult = np.rint(rng.normal(30.0, 7.0, n))
    older = np.rint(rng.normal(55.0, 16.0, n))
    return np.clip(np.choose(part, [child, adult, older]), 1, 100).astype(np.int64)


def _utk_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """int64 ``[n, 3]`` = (age in years, gender 0/1, race 0..4), mildly correlated."""
    age = _utk_ages(rng, n)
    p_female = np.where((age >= 18) & (age < 40), 0.55, 0.44)
    gender = (rng.random(n) < p_female).astype(np.int64)
    base = np.array(UTKFACE_RACE_PREVALENCE)
    child = base * np.array([0.8, 0.7, 1.2, 0.9, 2.2])  # "Others" is more common among children
    u = rng.random(n)
    race = np.where(
        age < 10,
        np.searchsorted(np.cumsum(child / child.sum()), u, side="right"),
        np.searchsorted(np.cumsum(base / base.sum()), u, side="right"),
    )
    return np.stack([age, gender, np.minimum(race, 4)], 1).astype(np.int64)


def _age_bin(age: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.array(UTKFACE_AGE_EDGES), age, side="left")


def _utk_images(rng: np.random.Generator, tasks: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Face chips uint8 ``[b, H, W, 3]`` for ``tasks`` ``[b, 3]`` = (age bin, race, gender)."""
    h, w = hw
    region = (0.0, 0.0, float(h), float(w))
    age, race, gender = _utk_patterns()
    pad = max([p.half_window(min(h, w)) for p in age + race + gender] + [_face_pad(h, w, _UTK_FACE)]) + 1
    canvas = np.zeros((len(tasks), h + 2 * pad, w + 2 * pad, 3), np.float32)
    _face_background(rng, canvas, pad, _UTK_FACE)
    for column, patterns in enumerate((age, race, gender)):
        for c, pattern in enumerate(patterns):
            which = np.flatnonzero(tasks[:, column] == c)
            _draw(canvas, pad, region, pattern, which, _strength(rng, which.size, pattern.amp), rng)
    return _finish(canvas, pad, rng, 0.035)


def _utk_stamps(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct 17-digit ``yyyymmddHHMMSSfff`` time stamps between 2016-12-19 and 2017-01-20."""
    start = _dt.datetime(2016, 12, 19)
    span_ms = 32 * 24 * 3600 * 1000
    offsets = rng.choice(span_ms, n, replace=False)
    out = []
    for ms in offsets.tolist():
        t = start + _dt.timedelta(milliseconds=ms)
        out.append(t.strftime("%Y%m%d%H%M%S") + f"{t.microsecond // 1000:03d}")
    return out


def _write_utkface(root: Path, n_train: int, n_test: int, seed: int, hw: tuple[int, int]):
    n = n_train + n_test
    labels = _utk_labels(_rng(seed, "utkface", "train", _LABELS), n + 2)
    stamps = _utk_stamps(_rng(seed, "utkface", "train", _META), n + 2)
    names = [f"{a}_{g}_{r}_{s}.jpg.chip.jpg" for (a, g, r), s in zip(labels[:n].tolist(), stamps[:n])]
    # the release's malformed names: the race field missing (one with an impossible gender 3)
    (a0, g0, _), (a1, _, _) = labels[n:].tolist()
    names += [f"{a0}_{g0}_{stamps[n]}.jpg.chip.jpg", f"{a1}_3_{stamps[n + 1]}.jpg.chip.jpg"]
    tasks = np.stack([_age_bin(labels[:, 0]), labels[:, 2], labels[:, 1]], 1)  # reader order: age bin, race, gender
    folder = root / "UTKFace"
    folder.mkdir()
    _write_chunks(
        seed, "utkface", "train", tasks, lambda rng, lab: _utk_images(rng, lab, hw),
        lambda array, i: _save_jpeg(array, folder / names[i]),
    )  # fmt: skip
    return {"train": {f"UTKFace/{name}": tasks[i].copy() for i, name in enumerate(names[:n])}, "test": {}}


# ----------------------------------------------------------------------------------------------------
# NYUv2

# class albedo (RGB), texture strength, texture frequencies (cycles per metre along the two surface axes)
_NYU_LOOK = {
    "bed": ((0.78, 0.72, 0.88), 0.35, (4.0, 0.0)),
    "books": ((0.60, 0.30, 0.25), 0.8, (22.0, 0.0)),
    "ceiling": ((0.93, 0.93, 0.90), 0.05, (0.5, 0.5)),
    "chair": ((0.50, 0.30, 0.15), 0.25, (0.0, 9.0)),
    "floor": ((0.58, 0.42, 0.26), 0.35, (5.0, 0.3)),
    "furniture": ((0.36, 0.22, 0.12), 0.3, (0.0, 3.0)),
    "objects": ((0.30, 0.62, 0.55), 0.5, (12.0, 12.0)),
    "picture": ((0.80, 0.50, 0.20), 0.7, (6.0, 4.0)),
    "sofa": ((0.22, 0.32, 0.62), 0.15, (8.0, 8.0)),
    "table": ((0.68, 0.50, 0.32), 0.3, (2.5, 0.0)),
    "tv": ((0.07, 0.07, 0.09), 0.1, (30.0, 0.0)),
    "wall": ((0.82, 0.78, 0.68), 0.06, (0.7, 0.4)),
    "window": ((0.80, 0.90, 1.00), 0.45, (1.6, 1.6)),
}
# (width x, height y, depth z) ranges in metres of free-standing classes
_NYU_FURNITURE = {
    "bed": ((1.4, 2.0), (0.45, 0.65), (1.8, 2.1)),
    "sofa": ((1.6, 2.2), (0.75, 0.95), (0.8, 1.0)),
    "table": ((0.8, 1.6), (0.70, 0.80), (0.6, 1.0)),
    "chair": ((0.40, 0.55), (0.80, 1.00), (0.45, 0.55)),
    "furniture": ((0.6, 1.4), (0.8, 2.0), (0.4, 0.6)),
}
_NYU_IGNORE = -1


def _matmul3(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` for tiny matrices without BLAS (bit-identical everywhere)."""
    return (a[:, :, None] * b[None, :, :]).sum(1)


@lru_cache(maxsize=4)
def _nyu_camera(h: int, w: int) -> tuple[float, np.ndarray, np.ndarray]:
    """Focal length (pixels) and camera-ray components ``x [1, W]``, ``y [H, 1]`` (z = 1)."""
    f = 0.81 * w  # NYUv2's Kinect: 518 px at 640 wide
    x = ((np.arange(w, dtype=np.float32) + 0.5 - w / 2) / f)[None, :]
    y = ((np.arange(h, dtype=np.float32) + 0.5 - h / 2) / f)[:, None]
    return f, x, y


def _nyu_scene(rng: np.random.Generator, hw: tuple[int, int]):
    """Render one room: (image ``[H, W, 3]`` in [0, 1], label ``[H, W]`` in {-1, 0..12},
    depth ``[H, W]`` metres, normal ``[H, W, 3]`` unit vectors in camera coordinates (x right,
    y down, z forward; pointing towards the camera)), all float32.

    A box room (floor, ceiling, side and back walls) seen by a pinhole camera with random height,
    pitch and yaw; 2-5 furniture boxes on the floor, small books/objects on their tops, a TV box and
    picture/window decals on walls, sometimes an unlabelled clutter box (label -1). The image is the
    class albedo and world-space texture shaded by a directional light (normal), attenuated with
    depth, with smooth and per-pixel noise; label boundaries are marked -1 like the real maps.
    Arrays are kept per component (``[H, W]`` each): reductions over a length-3 axis are slow.
    """
    h, w = hw
    cls = {name: i for i, name in enumerate(NYUV2_CLASSES)}
    f, cam_x, cam_y = _nyu_camera(h, w)
    pitch, yaw = rng.uniform(0.0, 0.3), rng.uniform(-0.35, 0.35)
    rx = np.array([[1, 0, 0], [0, math.cos(pitch), math.sin(pitch)], [0, -math.sin(pitch), math.cos(pitch)]])
    ry = np.array([[math.cos(yaw), 0, math.sin(yaw)], [0, 1, 0], [-math.sin(yaw), 0, math.cos(yaw)]])
    rot = _matmul3(ry, rx).astype(np.float32)  # camera -> world; the distance along a ray is the camera depth
    ray = [rot[a, 0] * cam_x + rot[a, 1] * cam_y + rot[a, 2] for a in range(3)]  # world ray components
    for r in ray:
        r[np.abs(r) < 1e-6] = 1e-6
    inv = [1.0 / r for r in ray]

    cam_h, room_h = rng.uniform(1.2, 1.6), rng.uniform(2.5, 3.0)
    left, right, back = rng.uniform(1.5, 3.0), rng.uniform(1.5, 3.0), rng.uniform(4.0, 7.5)
    lo, hi = (-left, -(room_h - cam_h), -1.0), (right, cam_h, back)
    t_exit = [np.where(ray[a] > 0, np.float32(hi[a]), np.float32(lo[a])) * inv[a] for a in range(3)]
    depth = np.minimum(np.minimum(t_exit[0], t_exit[1]), t_exit[2])
    axis = np.where(t_exit[0] == depth, 0, np.where(t_exit[1] == depth, 1, 2))  # intp: used as an index
    label = np.where(axis == 1, np.where(ray[1] > 0, cls["floor"], cls["ceiling"]), cls["wall"]).astype(np.int8)
    hit = [r * depth for r in ray]

    # decals on the back wall (sometimes a side wall): pictures and windows, same depth and normal
    for _ in range(int(rng.integers(1, 4))):
        name = "picture" if rng.random() < 0.6 else "window"
        if name == "picture":
            dw, dh = rng.uniform(0.4, 1.0), rng.uniform(0.3, 0.8)
        else:
            dw, dh = rng.uniform(0.8, 1.6), rng.uniform(0.8, 1.3)
        top = cam_h - rng.uniform(1.2, 2.0) - dh  # y of the upper edge (y down, floor at cam_h)
        if rng.random() < 0.7:
            x0 = rng.uniform(-left, right - dw)
            inside = (axis == 2) & (hit[0] > x0) & (hit[0] < x0 + dw)
        else:
            z0 = rng.uniform(1.0, back - dw)
            side = (hit[0] > 0) if rng.random() < 0.5 else (hit[0] < 0)
            inside = (axis == 0) & side & (hit[2] > z0) & (hit[2] < z0 + dw)
        inside &= (hit[1] > top) & (hit[1] < top + dh)
        label[inside] = cls[name]

    boxes: list[tuple[tuple[float, ...], tuple[float, ...], int]] = []
    tops = []
    for _ in range(int(rng.integers(2, 6))):
        name = ("bed", "sofa", "table", "chair", "chair", "furniture", "furniture")[int(rng.integers(7))]
        wx, wy, wz = (rng.uniform(*r) for r in _NYU_FURNITURE[name])
        x0 = rng.uniform(-left, max(right - wx, -left + 0.01))
        against_wall = name == "furniture" and rng.random() < 0.6
        z0 = back - wz - 0.02 if against_wall else rng.uniform(1.3, max(back - wz, 1.31))
        boxes.append(((x0, cam_h - wy, z0), (x0 + wx, cam_h, z0 + wz), cls[name]))
        if name in ("table", "furniture", "bed"):
            tops.append(boxes[-1])
    for b_lo, b_hi, _ in tops:  # small things on top surfaces
        for _ in range(int(rng.integers(0, 3))):
            name = "books" if rng.random() < 0.5 else "objects"
            sx, sy, sz = rng.uniform(0.1, 0.35), rng.uniform(0.08, 0.3), rng.uniform(0.1, 0.3)
            x0 = rng.uniform(b_lo[0], max(b_hi[0] - sx, b_lo[0] + 0.01))
            z0 = rng.uniform(b_lo[2], max(b_hi[2] - sz, b_lo[2] + 0.01))
            boxes.append(((x0, b_lo[1] - sy, z0), (x0 + sx, b_lo[1], z0 + sz), cls[name]))
    if rng.random() < 0.7:  # a TV: a thin box in front of the back wall
        tw, th = rng.uniform(0.6, 1.2), rng.uniform(0.4, 0.7)
        x0, y0 = rng.uniform(-left, right - tw), cam_h - rng.uniform(0.9, 1.5) - th
        boxes.append(((x0, y0, back - 0.1), (x0 + tw, y0 + th, back - 0.01), cls["tv"]))
    if rng.random() < 0.5:  # clutter nobody labelled
        sx, sy, sz = rng.uniform(0.2, 0.6, 3)
        x0, z0 = rng.uniform(-left, right - sx), rng.uniform(1.0, back - sz)
        boxes.append(((x0, cam_h - sy, z0), (x0 + sx, cam_h, z0 + sz), _NYU_IGNORE))

    corner_sel = np.array([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], bool)
    for b_lo, b_hi, c in boxes:
        # ray-test only the box's screen-space bounding rectangle
        corners = _matmul3(np.where(corner_sel, np.array(b_hi), np.array(b_lo)), rot)  # world -> camera
        if (corners[:, 2] <= 0.05).any():
            win = (slice(0, h), slice(0, w))
        else:
            px, py = corners[:, 0] / corners[:, 2] * f + w / 2, corners[:, 1] / corners[:, 2] * f + h / 2
            r0, r1 = max(int(py.min()) - 1, 0), min(int(py.max()) + 2, h)
            c0, c1 = max(int(px.min()) - 1, 0), min(int(px.max()) + 2, w)
            if r0 >= r1 or c0 >= c1:
                continue
            win = (slice(r0, r1), slice(c0, c1))
        near, far = [], []
        for a in range(3):
            iv = np.broadcast_to(inv[a], (h, w))[win]
            t1, t2 = np.float32(b_lo[a]) * iv, np.float32(b_hi[a]) * iv
            near.append(np.minimum(t1, t2))
            far.append(np.maximum(t1, t2))
        t_near = np.maximum(np.maximum(near[0], near[1]), near[2])
        t_far = np.minimum(np.minimum(far[0], far[1]), far[2])
        front = (t_near < t_far) & (t_near > 0) & (t_near < depth[win])
        if not front.any():
            continue
        np.copyto(depth[win], t_near, where=front)
        np.copyto(label[win], np.int8(c), where=front)
        face = np.where(near[0] == t_near, 0, np.where(near[1] == t_near, 1, 2))
        np.copyto(axis[win], face, where=front)

    # normals: the hit face's axis, pointing against the ray; world -> camera is rot.T
    ray_on_axis = np.where(axis == 0, ray[0], np.where(axis == 1, ray[1], ray[2]))
    towards = ray_on_axis < 0  # the face normal is +e_axis when the ray runs towards -axis
    facing = np.where(towards, np.float32(1.0), np.float32(-1.0))
    face_normals = np.concatenate([-rot, rot])  # row a of rot = camera coords of e_a; [-e_0..-e_2, e_0..e_2]
    normal = np.take(face_normals, axis + 3 * towards, axis=0)
    hit = [r * depth for r in ray]

    # appearance: albedo and world-space texture per class, Lambert shading, depth fall-off; the
    # texture and shading are scalars per pixel, so only the albedo gather and the noise touch 3 channels
    look = [_NYU_LOOK[name] for name in NYUV2_CLASSES] + [((0.5, 0.5, 0.5), 0.5, (7.0, 7.0))]
    albedo = np.clip(np.array([lk[0] for lk in look]) + rng.uniform(-0.08, 0.08, (len(look), 3)), 0.02, 1.0)
    albedo[-1] = rng.uniform(0.1, 0.9, 3)  # clutter: any colour
    albedo = albedo.astype(np.float32)
    strength = np.array([lk[1] for lk in look], np.float32)
    freq = np.array([lk[2] for lk in look], np.float32)
    phase = rng.uniform(0, 2 * math.pi, len(look)).astype(np.float32)
    index = np.where(label < 0, len(look) - 1, label).astype(np.intp)
    s1 = np.where(axis == 0, hit[2], hit[0])  # the two world axes spanning the hit face
    s2 = np.where(axis == 1, hit[2], hit[1])
    arg = np.float32(2 * math.pi) * (np.take(freq[:, 0], index) * s1 + np.take(freq[:, 1], index) * s2)
    arg += np.take(phase, index)
    st = np.take(strength, index)
    light = np.array([0.3, -1.0, -0.45]) + rng.uniform(-0.2, 0.2, 3)
    light = (light / math.sqrt(float((light * light).sum()))).astype(np.float32)
    lambert = np.maximum(np.take(light, axis) * facing, 0.0)
    scalar = (1.0 - st + st * (0.5 + 0.5 * np.cos(arg)))  # texture
    scalar *= (0.4 + 0.6 * lambert) / (1.0 + 0.01 * depth * depth) * np.float32(rng.uniform(1.0, 1.35))  # shading
    image = np.take(albedo, index, axis=0)
    image *= scalar[..., None]
    image += 0.03 * _smooth_noise(rng, 1, h, w, 1, 5)[0]
    noise = rng.random((h, w, 3), dtype=np.float32)
    noise -= 0.5
    noise *= np.float32(0.07)  # std 0.02
    image += noise
    np.clip(image, 0.0, 1.0, out=image)

    edge = np.zeros((h, w), bool)
    dv, dh_ = label[1:] != label[:-1], label[:, 1:] != label[:, :-1]
    edge[1:] |= dv
    edge[:-1] |= dv
    edge[:, 1:] |= dh_
    edge[:, :-1] |= dh_
    label = np.where(edge, np.float32(_NYU_IGNORE), label.astype(np.float32))
    np.clip(depth, 0.5, 10.0, out=depth)
    return image.astype(np.float32), label, depth.astype(np.float32), normal.astype(np.float32)


def _write_nyuv2(root: Path, n_train: int, n_test: int, seed: int, hw: tuple[int, int]):
    assert NYUV2_SEG_CLASSES == len(NYUV2_CLASSES)
    truth: dict[str, dict[str, np.ndarray]] = {"train": {}, "test": {}}
    maps = ("label", "depth", "normal")
    for split, folder, n in (("train", "train", n_train), ("test", "val", n_test)):
        for sub in ("image",) + maps:
            (root / folder / sub).mkdir(parents=True)

        def job(i: int, split=split, folder=folder) -> None:  # one stream per scene
            image, label, depth, normal = _nyu_scene(_rng(seed, "nyuv2", split, _PIXELS, i), hw)
            for sub, array in (("image", image), ("label", label), ("depth", depth[..., None]), ("normal", normal)):
                np.save(root / folder / sub / f"{i}.npy", array, allow_pickle=False)

        _parallel(n, job)
        for i in range(n):
            truth[split][f"{folder}/image/{i}.npy"] = np.array([f"{folder}/{sub}/{i}.npy" for sub in maps], dtype=object)
    return truth
