"""Synthetic datasets written in the ORIGINAL on-disk layouts (docs/method.md sections 2.5, 2.7): the embedded default.

``write(dataset, root, n_train, n_test, seed)`` produces CelebA-, ChestX-ray14-, UTKFace- or
NYUv2-style files that the real readers (:mod:`mtlue_fast.data.formats`) parse unchanged, quirks
included (CRLF attribute file with a count line and an unused validation partition, a few RGBA PNGs,
UTKFace names without a race field). Output is a function of the arguments only: every random draw
comes from ``numpy.random.Generator`` streams keyed by ``(seed, dataset, split, purpose)`` and the
encoders run with fixed settings, so the same call writes byte-identical files (on any number of
threads; the chunks are rendered in parallel, each from its own stream).

Labels are learnable from the pixels. Every (task, class) owns a visual pattern with a shape, a
texture, a colour (grey level for X-rays) and a task-specific region; each case draws it with jittered
position, size, orientation and phase and a per-case strength ``amp * U(floor, 1)`` (floor 0.15, up to 0.5 for CelebA's rarest attributes; some positives
are faint) on a textured random background (a face, a chest, a room) with smooth and per-pixel noise.
Binary tasks draw the pattern for positives only; multi-class tasks draw one pattern per class.
Binary labels come from a latent Gaussian factor model (correlated co-occurrence) thresholded to
realistic prevalences. Patterns are told apart by appearance, not only by place, because the victim
(a CNN with global pooling, trained with random crops and h-flips) barely sees where they are:
CelebA attributes are two-tone paint marks with distinct (upper paint, lower paint, shape, size)
codes; X-ray findings differ in shape, size, texture and polarity and mostly appear on a random side.
Amplitudes were tuned so that a small CNN reaches a mean AUC near 0.9, not 1.0 (see
``chestxray._CHEST_PATTERNS`` and ``celeba._CELEBA_AMP``).

NYUv2 scenes are ray-cast box rooms (floor, walls, ceiling, furniture, wall decals) whose
segmentation, depth and normals are consistent by construction, and whose image is class albedo and
texture shaded by normal and depth.

One module per dataset kind (:mod:`.celeba`, :mod:`.chestxray`, :mod:`.utkface`, :mod:`.nyuv2`), on
shared helpers (:mod:`.streams`: random streams, parallel chunks, correlated labels; :mod:`.drawing`:
patterns, backgrounds, quantisation); this module checks the arguments and writes atomically.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from .celeba import CELEBA_ATTRIBUTES, CELEBA_PREVALENCE, _write_celeba
from .chestxray import CHESTXRAY_PREVALENCE, _write_chestxray
from .nyuv2 import NYUV2_CLASSES, _write_nyuv2
from .streams import DATASETS
from .utkface import UTKFACE_RACE_PREVALENCE, _write_utkface

__all__ = [
    "CELEBA_ATTRIBUTES", "CELEBA_PREVALENCE", "CHESTXRAY_PREVALENCE", "DATASETS", "DEFAULT_SIZES",
    "NYUV2_CLASSES", "UTKFACE_RACE_PREVALENCE", "write", "write_with_labels",
]  # fmt: skip

#: Bumped whenever the generated pixels or labels change, so shared copies written by older code are not reused.
VERSION = 6

#: Image size ``(H, W)`` in pixels written by default (the original releases' sizes, X-rays reduced).
DEFAULT_SIZES: dict[str, tuple[int, int]] = {
    "celeba": (218, 178),
    "chestxray": (128, 128),
    "utkface": (200, 200),
    "nyuv2": (288, 384),
}


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
