"""Publishing the protected dataset as image files laid out like the original release (docs/method.md section 6).

:func:`write_image_files` turns a protected cache (:func:`mtlue_fast.ue.export.write_protected`)
into image files laid out like the original release (same relative paths and names, PNG; the
dataset's annotation files copied alongside), so the protected copy can be published in place of
the original: either the training images at the cache's working resolution (written by
:mod:`mtlue_fast.ue.export`), or (``resolution="original"``) a complete release at the original
images' sizes, the working-resolution perturbation carried back through the inverse of the cache's
geometry (:func:`carry_back`, :func:`protect_original`) and the test split copied unchanged.

The release is written into a temporary sibling folder (``.<name>.partial-<pid>``) that is renamed
into place when complete: an interrupted run leaves nothing that looks like a result, and a folder
the user already owns is never modified, replaced or deleted (only an empty one may be replaced).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .. import dist
from ..data.cache import Cache, open_cache
from ..data.decode import center_box, open_converted
from ..fileio import missing_or_empty, read_json, write_json
from ..progress import Progress
from .export import (
    Perturb, label_rows, _check_delta, _fresh_partial, _move_into_place, _to_device, _write_image_rows,
    _write_nyuv2_files, exported_name, level_limit,
)  # fmt: skip

__all__ = ["write_image_files", "upsample_nearest", "protect_original", "MARKER_FILE"]

#: How the perturbation is carried to the original resolution by default (see :func:`carry_back`).
UPSAMPLE = "nearest"
INVERSE_ITERATIONS = 30
INVERSE_CHUNK_ELEMENTS = 1 << 24  # float64 values per solver batch (128 MiB a tensor)

#: File written at the top of an image-file export: what it is and where it came from.
MARKER_FILE = "mtlue_protected.json"


# ----------------------------------------------------------------------------- image files


def write_image_files(
    protected: Cache | str | Path,
    clean_root: str | Path,
    out_root: str | Path,
    *,
    image_format: str = "png",
    jpeg_quality: int = 95,
    progress: bool = True,
    workers: int | None = None,
    resolution: str = "working",
    perturb: Perturb | None = None,
    test_files: Sequence[str] | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    upsample: str | None = None,
) -> Path:
    """Write the protected dataset as image files laid out like the original release.

    Two resolutions:

    - ``resolution="working"`` (this function's default, the package's earlier behaviour): only the
      training images, at the cache's working resolution (e.g. CelebA 70x70 after its 140x140
      centre crop, ChestX-ray 256x256, UTKFace 140x140): row ``i`` of ``protected`` becomes
      ``out_root / row_files[i]``, the exact protected pixels of the cache.
    - ``resolution="original"`` (what ``python -m mtlue_fast.run --export-images`` writes by
      default): a complete release at the original images' sizes. Every training image is decoded
      from ``clean_root`` as the cache decoder does (L or RGB; NYUv2's float ``.npy`` times 255,
      rounded), at its own size. Its working-resolution perturbation (float, [0, 1] scale) is
      carried back through the inverse of the cache's geometry (:func:`carry_back`) from the
      working size to the size of the centre-crop window at the original resolution (the whole
      image when the cache has no crop), and placed in that window; pixels outside the window stay
      unperturbed. Then ``protected = clip(round(original + 255 * delta), 0, 255)`` (half to even),
      and every file is checked to satisfy ``|protected - original| <= ceil(255 * eps)`` levels
      (8 for eps = 8/255) before it is written; a violation raises and nothing is published.
      ``upsample="nearest"`` (the default, :data:`UPSAMPLE`): nearest neighbour by pixel centres
      (output pixel ``y`` takes input ``floor((2y + 1) h / 2H)``). The cache's bilinear,
      antialiased downsampling of a published image then returns the perturbation blurred by its
      filter once (per axis (1/8, 3/4, 1/8) at a 2x ratio), where a bilinear upsampling would blur
      it twice ((3/16, 5/8, 3/16)): on the synthetic CelebA (crop 140 of 218x178, cache 70x70) the
      cache reads back 88 % of the perturbation's amplitude after nearest, 82 % after bilinear.
      ``"inverse"``: nearest corrected so that the cache's own resize gives the perturbation back
      as far as the budget allows (:func:`carry_back`; 95 % on CelebA, but only 71 % against
      67 % on a 2x ChestX-ray sample whose perturbation is near the budget everywhere). Over six
      victim seeds of the synthetic CelebA it kept the drop through the files within 0.015 of the
      cache's, nearest within 0.051 (docs/results.md), so CelebA's config uses it; it costs
      about 35 ms per CelebA image and 1 s per 1024x1024 X-ray on one CPU core.
      The test split's images (``test_files``, paths relative to ``clean_root``) are copied byte
      for byte and NOT perturbed: the protection covers the training data only, and the test
      split is the clean held-out data victims are measured on. Files in neither split (CelebA's
      validation partition, names the reader cannot parse, images that failed to decode) are not
      written; the marker file counts them.

    ``perturb`` (``"original"`` only) recomputes the float perturbation of the training rows:
    called with the clean uint8 images (``protected.images - delta.npy``, exactly the clean cache),
    their labels and indices, in blocks of :data:`FILE_BLOCK` rows, ``batch_size`` rows per call,
    on ``device`` (e.g. :func:`~mtlue_fast.ue.export.generator_perturb`). Without it the stored
    int8 perturbation ``delta.npy / 255`` is used (rounded to whole levels at the working resolution).

    Formats:

    - ``image_format="png"`` (default): lossless; a name whose extension is not ``.png`` gets
      ``.png`` instead (``000001.jpg`` -> ``000001.png``).
    - ``image_format="jpeg"``: ``.jpg`` files at ``jpeg_quality``; issues a UserWarning, since lossy
      re-encoding changes the pixels and weakens the protection. At ``"original"`` resolution each
      file is decoded again and the largest change (``jpeg.max_abs_change_after_decode``) and the
      largest difference from the original (``jpeg.max_abs_diff_from_original_after_decode``) are
      recorded in the marker file.
    - NYUv2 (``.npy`` images): always the array format the reader expects, an ``H x W x 3`` uint8
      ``.npy`` under ``<split>/image/<i>.npy`` (original resolution: the stored array's own size;
      the bound holds against ``round(255 * original)``), with the row's ``label``/``depth``/
      ``normal`` maps copied; ``image_format`` must be ``"png"`` (lossless).

    The annotation files the package's reader needs are copied from ``clean_root`` (CelebA:
    ``list_attr_celeba.txt``, ``list_eval_partition.txt``; ChestX-ray: the ``Data_Entry`` CSV(s),
    ``train_val_list.txt``, ``test_list.txt``), with the names of the written images changed where
    their extension changed. UTKFace has no annotation files (labels are in the names; its reader
    splits a folder with ``.png`` training names as it split the original). Every reader of the
    package reads an ``"original"`` release like the release itself. At ``"working"`` resolution
    only training images are written, so other rows of these files point at absent images.

    ``out_root`` gets a ``mtlue_protected.json`` describing the export. The folder is written
    under a temporary sibling and renamed into place; an existing non-empty ``out_root`` raises,
    unless it is the same export (same source digest, format, resolution, perturbation source and
    test files), which is returned unchanged. Under torchrun every rank writes a share of the files
    (blocks of :data:`FILE_BLOCK` rows, dealt in turn) and rank 0 moves the folder into place.

    Args:
        protected: the protected cache (:func:`~mtlue_fast.ue.export.write_protected`'s result, or its
            folder).
        clean_root: the original dataset root the clean cache was built from.
        out_root: folder to create.
        image_format: ``"png"`` or ``"jpeg"``.
        jpeg_quality: 1..100 for ``"jpeg"``.
        progress: print a progress line.
        workers: encoding threads (default: up to 8).
        resolution: ``"working"`` or ``"original"``.
        perturb: see above (``"original"`` only).
        test_files: the test split's files relative to ``clean_root`` (``"original"`` only; None:
            no test images are written, and the marker says so).
        device: where ``perturb`` runs.
        batch_size: rows per ``perturb`` call.
        upsample: ``"inverse"`` or ``"nearest"`` (None: :data:`UPSAMPLE`; ``"original"`` only).

    Returns:
        ``out_root``.
    """
    cache = protected if isinstance(protected, Cache) else open_cache(protected)
    manifest = cache.manifest
    fmt = _check_image_format(image_format, jpeg_quality, manifest)
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {', '.join(repr(r) for r in RESOLUTIONS)}, got {resolution!r}")
    if resolution == "working" and (perturb is not None or test_files is not None or upsample is not None):
        raise ValueError("perturb, test_files and upsample apply to resolution='original' only")
    row_files = _row_files(cache)
    dataset = manifest["dataset"]
    source = Path(clean_root).expanduser()
    if not source.is_dir():
        raise FileNotFoundError(f"clean_root {source} is not a folder; pass the original {dataset} dataset root")
    out = Path(out_root).expanduser()
    marker = {
        "kind": "protected_image_files", "dataset": dataset, "split": manifest.get("split"),
        "method": manifest["method"], "eps": manifest.get("eps"), "source_digest": manifest["source_digest"],
        "image_format": fmt, "jpeg_quality": jpeg_quality if fmt == "jpeg" else None,
        "size": list(cache.images.shape[-2:]), "channels": int(cache.images.shape[1]), "count": len(row_files),
        "protected_cache": str(Path(cache.path).resolve()),
        "note": "images at the cache's working resolution; PNG/npy are the exact protected pixels",
    }  # fmt: skip
    test = None
    if resolution == "original":
        test = _check_test_files(test_files, source, dataset)
        upsample = UPSAMPLE if upsample is None else upsample
        if upsample not in UPSAMPLES:
            raise ValueError(f"upsample must be one of {', '.join(repr(u) for u in UPSAMPLES)}, got {upsample!r}")
        marker = _original_marker(marker, cache, row_files, test, perturb is not None, upsample)
    if fmt == "jpeg":
        warnings.warn(
            "write_image_files(image_format='jpeg'): lossy JPEG re-encoding changes the protected pixels "
            "and weakens the protection; publish PNG unless you must",
            UserWarning,
            stacklevel=2,
        )
    if _existing_files(out, marker):
        return out

    # Under torchrun every rank writes a share of the files (blocks of rows dealt in turn) into rank
    # 0's temporary folder; rank 0 adds the annotations and moves the folder into place.
    place = dist.info()
    partial = _fresh_partial(out) if place.is_main else None
    partial = Path(dist.broadcast_object(str(partial) if partial else None, f"waiting for rank 0 to start {out}"))
    blocks = list(_chunks(len(row_files), FILE_BLOCK))[place.rank :: place.world_size]
    show = progress and place.is_main
    try:
        if resolution == "original":
            test_blocks = list(_chunks(len(test), FILE_BLOCK))[place.rank :: place.world_size]
            job = _OriginalJob(cache, row_files, source, partial, fmt, jpeg_quality, perturb, torch.device(device),
                               batch_size, workers, upsample)  # fmt: skip
            stats = job.run(blocks, test, test_blocks, show)
            write_json(partial / f".stats-rank{place.rank}.json", stats)
            renamed = job.renamed()
        elif dataset == "nyuv2":
            _write_nyuv2_files(cache, row_files, source, partial, show, blocks)
        else:
            renamed = _write_image_rows(cache, row_files, partial, fmt, jpeg_quality, show, workers, blocks)
        dist.barrier(f"waiting for the other ranks' shares of {out}")
        if place.is_main:
            if dataset != "nyuv2":
                _copy_annotations(dataset, source, partial, renamed)
            final = dict(marker)
            if resolution == "original":
                final.update(_merge_stats(partial, place.world_size, fmt))
                final["omitted"] = _omitted(dataset, source, row_files, test)
            write_json(partial / MARKER_FILE, {**final, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
            _move_into_place(partial, out, lambda: _same_files(read_json(out / MARKER_FILE), marker))
    except BaseException:
        if place.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    dist.barrier(f"waiting for rank 0 to move {out} into place")
    return out


RESOLUTIONS = ("working", "original")
UPSAMPLES = ("nearest", "inverse")
TEST_NOTE = ("copied byte for byte from the original release, not perturbed: the protection covers the training "
             "data only, and the test split is the clean held-out data victims are measured on")  # fmt: skip


def _check_test_files(test_files: Sequence[str] | None, source: Path, dataset: str) -> list[str]:
    test = [str(rel) for rel in (test_files or [])]
    for rel in test:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"test_files: {rel!r} is not a path inside clean_root {source}")
        if dataset == "nyuv2" and (Path(rel).parent.name != "image" or Path(rel).suffix != ".npy"):
            raise ValueError(f"nyuv2: test file {rel!r} is not of the form <split>/image/<i>.npy")
    return test


def _original_marker(marker: dict, cache: Cache, row_files: list[str], test: list[str], recomputed: bool,
                     upsample: str) -> dict:  # fmt: skip
    manifest = cache.manifest
    crop = manifest.get("center_crop")
    test_digest = hashlib.sha256("\n".join(test).encode()).hexdigest()
    marker = {key: value for key, value in marker.items() if key not in ("size", "note")}
    marker.update(
        resolution="original",
        eps_levels=level_limit(float(manifest.get("eps", 0.0))),
        delta_source="recomputed float perturbation" if recomputed else "stored int8 perturbation (delta.npy / 255)",
        upsample=upsample,
        geometry={"working_size": list(cache.images.shape[-2:]), "center_crop": list(crop) if crop else None,
                  "note": "the perturbation is upsampled from the working size to the centre-crop window at the "
                          "original resolution and added there; pixels outside the window are unperturbed"},
        splits={"train": {"count": len(row_files), "protected": True},
                "test": {"count": len(test), "protected": False,
                         "note": TEST_NOTE if test else "the test split was not written"}},
        test_files_digest=test_digest,
        note="every image at its original size; the training images protected (|protected - original| <= "
             "eps_levels on every pixel), the test images copied unchanged",
    )  # fmt: skip
    return marker


def _check_image_format(image_format: str, jpeg_quality: int, manifest: dict) -> str:
    fmt = {"png": "png", "jpeg": "jpeg", "jpg": "jpeg"}.get(str(image_format).lower())
    if fmt is None:
        raise ValueError(f"image_format must be 'png' or 'jpeg', got {image_format!r}")
    if fmt == "jpeg" and not (isinstance(jpeg_quality, (int, np.integer)) and 1 <= jpeg_quality <= 100):
        raise ValueError(f"jpeg_quality must be an int in 1..100, got {jpeg_quality!r}")
    if "method" not in manifest or "source_digest" not in manifest:
        raise ValueError("protected must be a protected export written by write_protected (its manifest.json "
                         "has no 'method'/'source_digest')")  # fmt: skip
    if manifest.get("dataset") == "nyuv2" and fmt != "png":
        raise ValueError("nyuv2: images are written losslessly as .npy arrays; image_format must be 'png'")
    return fmt


def _row_files(cache: Cache) -> list[str]:
    row_files = cache.manifest.get("row_files")
    if not row_files:
        raise ValueError(
            f"{cache.path}/manifest.json has no 'row_files' (the source file of each row): the clean cache was "
            "built by an older mtlue_fast; rebuild it (build_cache) and export again"
        )
    if len(row_files) != len(cache.images):
        raise ValueError(f"{cache.path}/manifest.json lists {len(row_files)} row_files for {len(cache.images)} images")
    for rel in row_files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ValueError(f"{cache.path}/manifest.json: row file {rel!r} is not a path inside the dataset root")
    return list(row_files)


def _existing_files(out: Path, marker: dict) -> bool:
    """True when ``out`` already holds this very export; False when it is missing or empty."""
    if missing_or_empty(out, "out_root"):
        return False
    found = read_json(out / MARKER_FILE)
    if _same_files(found, marker):
        return True
    raise ValueError(
        f"{out} exists and is not empty" + (" (it holds a different protected export)" if found else "")
        + "; it is never overwritten: remove it yourself or choose another out_root"
    )


def _same_files(found: dict | None, marker: dict) -> bool:
    keys = ("source_digest", "image_format", "jpeg_quality", "resolution", "delta_source", "test_files_digest", "upsample")
    default = {"resolution": "working"}  # markers written before there was a choice
    return found is not None and all(found.get(k, default.get(k)) == marker.get(k, default.get(k)) for k in keys)


FILE_BLOCK = 256  # rows per block of image files (one cache read, one rank under torchrun)


def _chunks(n: int, size: int) -> Iterator[range]:
    for start in range(0, n, size):
        yield range(start, min(start + size, n))


def _annotation_files(dataset: str, source: Path) -> list[str]:
    """The annotation files (relative to the root) the package's reader needs, as present in ``source``."""
    if dataset == "celeba":
        wanted = required = ["list_attr_celeba.txt", "list_eval_partition.txt"]
    elif dataset == "chestxray":
        from ..data.formats.chestxray import CSV_NAMES, LIST_OF_SPLIT

        wanted = [*CSV_NAMES, *LIST_OF_SPLIT.values()]
        required = list(LIST_OF_SPLIT.values())
        if not any((source / name).is_file() for name in CSV_NAMES):
            raise FileNotFoundError(f"chestxray: expected {' or '.join(CSV_NAMES)} in clean_root {source}, not found")
    elif dataset == "utkface":
        return []
    else:
        raise ValueError(f"write_image_files: no layout known for dataset {dataset!r}")
    missing = [name for name in required if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{dataset}: expected {', '.join(missing)} in clean_root {source}, not found")
    return [name for name in wanted if (source / name).is_file()]


_TOKEN = re.compile(rb"[^\s,|\"]+")


def _copy_annotations(dataset: str, source: Path, folder: Path, renamed: dict[str, str]) -> None:
    """Copy the annotation files, replacing every whole-token occurrence of a renamed image name."""
    table = {old.encode(): new.encode() for old, new in renamed.items()}
    for name in _annotation_files(dataset, source):
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if not table:
            shutil.copyfile(source / name, target)
            continue
        data = (source / name).read_bytes()
        target.write_bytes(_TOKEN.sub(lambda m: table.get(m.group(0), m.group(0)), data))


# ----------------------------------------------------------------------------- original resolution


def upsample_nearest(delta: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of ``delta`` ``[C, h, w]`` to ``[C, H, W]`` by pixel centres: output
    pixel ``y`` takes input row ``floor((2y + 1) h / (2H))`` (exact integers; the same for columns)."""
    _, h, w = delta.shape
    height, width = size
    rows = np.minimum((2 * np.arange(height) + 1) * h // (2 * height), h - 1)
    cols = np.minimum((2 * np.arange(width) + 1) * w // (2 * width), w - 1)
    return delta[:, rows][:, :, cols]


@functools.lru_cache(maxsize=32)
def resize_matrix(n: int, m: int) -> np.ndarray:
    """The cache decoder's resize of a line of ``n`` pixels to ``m`` as an ``[m, n]`` float64
    matrix: Pillow's bilinear filter with antialiasing (a triangle as wide as the scale), applied to
    the unit impulses in float mode (NVIDIA DALI's linear antialiased resize is the same filter)."""
    from PIL import Image

    impulses = Image.fromarray(np.eye(n, dtype=np.float32), mode="F")  # width n: one impulse per row
    return np.asarray(impulses.resize((m, n), Image.BILINEAR), dtype=np.float64).T.copy()


def carry_back(delta: np.ndarray, size: tuple[int, int], eps: float, upsample: str = "nearest", *,
               device: torch.device | str = "cpu", iterations: int = INVERSE_ITERATIONS) -> np.ndarray:  # fmt: skip
    """The perturbation ``delta`` ``[..., C, h, w]`` (float, [0, 1] scale; one image or a batch) at
    the crop window's size ``size = (ch, cw)`` of the original, within ``[-eps, eps]``.

    - ``"nearest"``: :func:`upsample_nearest`. The cache's resize of the result gives ``delta``
      back blurred by its filter (per axis (1/8, 3/4, 1/8) at a 2x ratio).
    - ``"inverse"``: starting there, the ``U`` with ``|U| <= eps`` whose resize by the cache's own
      filter (:func:`resize_matrix`, per axis: ``A_h U A_w^T``) is closest to ``delta`` in least
      squares (``iterations`` steps of accelerated projected gradient, float64, on ``device``):
      the inverse of the cache's geometry as far as the budget allows, so that the cache decoder
      reads back from the published image (nearly) the perturbation the generator made rather
      than a blurred one. Each image is solved on its own (the same result in any batch).
    """
    delta = np.asarray(delta, dtype=np.float32)
    single = delta.ndim == 3
    batch = delta[None] if single else delta
    if upsample not in UPSAMPLES:
        raise ValueError(f"upsample must be one of {', '.join(repr(u) for u in UPSAMPLES)}, got {upsample!r}")
    if upsample == "nearest" or tuple(size) == tuple(batch.shape[-2:]):
        out = np.stack([upsample_nearest(d, size) for d in batch]) if len(batch) else np.zeros((0, batch.shape[1], *size), np.float32)
        return out[0] if single else out
    device = torch.device(device)
    rows = torch.from_numpy(resize_matrix(int(size[0]), batch.shape[-2])).to(device)
    cols = torch.from_numpy(resize_matrix(int(size[1]), batch.shape[-1])).to(device)
    step = 1.0 / float(torch.linalg.matrix_norm(rows, 2) ** 2 * torch.linalg.matrix_norm(cols, 2) ** 2)
    per_chunk = max(1, INVERSE_CHUNK_ELEMENTS // max(1, batch.shape[1] * int(size[0]) * int(size[1])))
    out = []
    for start in range(0, len(batch), per_chunk):
        part = batch[start : start + per_chunk]
        target = torch.from_numpy(part.astype(np.float64)).to(device)
        u = torch.from_numpy(np.stack([upsample_nearest(d, size) for d in part]).astype(np.float64)).to(device)
        y, t = u.clone(), 1.0
        for _ in range(iterations):
            residual = rows @ y @ cols.T - target
            nxt = (y - step * (rows.T @ residual @ cols)).clamp_(-eps, eps)
            t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
            y = nxt + ((t - 1.0) / t_next) * (nxt - u)
            u, t = nxt, t_next
        out.append(u.to(torch.float32).cpu().numpy())
    result = np.concatenate(out)
    return result[0] if single else result


def protect_original(original: np.ndarray, delta: np.ndarray, center_crop: Sequence[int] | None, *,
                     eps: float | None = None, upsample: str = "nearest", carried: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """One training image at its original size.

    Args:
        original: uint8 ``[C, H, W]``, the decoded original.
        delta: float ``[C, h, w]`` on the [0, 1] scale, the perturbation at the working size.
        center_crop: ``(ch, cw)`` cut from the centre of the original before the cache's resize, or
            None (the whole image was resized).
        eps: the budget (``"inverse"`` only: the bound of its solution).
        upsample: ``"nearest"`` or ``"inverse"`` (:func:`carry_back`).
        carried: ``carry_back(delta, window, eps, upsample)`` when already computed (e.g. for a batch).

    Returns:
        uint8 ``[C, H, W]``: ``clip(round(original + 255 * carry_back(delta)), 0, 255)`` inside the
        crop window (half to even), ``original`` outside it.
    """
    _, height, width = original.shape
    if center_crop is None:
        top, left, ch, cw = 0, 0, height, width
    else:
        ch, cw = (int(v) for v in center_crop)
        left, top, _, _ = center_box(width, height, (ch, cw))
    if carried is not None:
        up = np.asarray(carried, dtype=np.float32)
        if up.shape != (original.shape[0], ch, cw):
            raise ValueError(f"carried perturbation {up.shape} does not fit the window {(original.shape[0], ch, cw)}")
    else:
        if upsample == "inverse" and eps is None:
            raise ValueError("protect_original(upsample='inverse') needs eps")
        up = carry_back(delta, (ch, cw), eps if eps is not None else 0.0, upsample)
    out = original.copy()
    window = original[:, top : top + ch, left : left + cw].astype(np.float32)
    out[:, top : top + ch, left : left + cw] = np.clip(np.rint(window + np.float32(255.0) * up), 0, 255).astype(np.uint8)
    return out


def decode_original(path: Path, channels: int) -> np.ndarray:
    """An original file as uint8 ``[C, H, W]`` at its own size, converted as the cache decoder
    converts it (L for 1 channel, RGB for 3; NYUv2's float ``.npy`` scaled by 255 and rounded)."""
    if str(path).endswith(".npy"):
        shape = np.load(path, mmap_mode="r").shape
        if len(shape) != 3 or shape[2] != channels:
            raise ValueError(f"{path}: expected an H x W x {channels} image array, got shape {shape}")
    array = np.asarray(open_converted(str(path), channels), dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


class _OriginalJob:
    """This rank's share of an original-resolution release: blocks of training rows protected and
    written, blocks of test files copied. The perturbations of a block are computed on the device
    in the calling thread while the previous block's files are decoded, composed and encoded by a
    thread pool."""

    def __init__(self, cache: Cache, row_files: list[str], source: Path, folder: Path, fmt: str, quality: int,
                 perturb: Perturb | None, device: torch.device, batch_size: int, workers: int | None,
                 upsample: str = "nearest"):  # fmt: skip
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.cache, self.row_files, self.source, self.folder = cache, row_files, source, folder
        self.fmt, self.quality, self.perturb, self.device, self.batch_size = fmt, quality, perturb, device, batch_size
        self.workers = max(1, workers or min(8, os.cpu_count() or 1))
        self.dataset = cache.manifest["dataset"]
        self.channels = int(cache.images.shape[1])
        self.crop = cache.manifest.get("center_crop")
        self.eps = float(cache.manifest.get("eps", 0.0))
        self.limit = level_limit(self.eps)
        self.upsample = upsample
        if not (Path(cache.path) / "delta.npy").is_file():
            raise ValueError(f"{cache.path} has no delta.npy: not a protected export written by write_protected")
        self.delta_q = np.load(Path(cache.path) / "delta.npy", mmap_mode="r")
        self.nyuv2 = self.dataset == "nyuv2"
        self.targets = list(row_files) if self.nyuv2 else [exported_name(rel, fmt) for rel in row_files]
        if len(set(self.targets)) != len(self.targets):
            raise ValueError(f"{cache.path}: two rows map to the same exported file name; cannot write them")
        if self.nyuv2:
            for rel in row_files:
                if Path(rel).parent.name != "image" or Path(rel).suffix != ".npy":
                    raise ValueError(f"nyuv2: row file {rel!r} is not of the form <split>/image/<i>.npy")

    def renamed(self) -> dict[str, str]:
        return {Path(old).name: Path(new).name for old, new in zip(self.row_files, self.targets) if old != new}

    def run(self, blocks: list[range], test: list[str], test_blocks: list[range], show: bool) -> dict:
        """Write this rank's blocks; returns its statistics (see :func:`_merge_stats`)."""
        bar = Progress(sum(len(b) for b in blocks) + sum(len(b) for b in test_blocks),
                       f"writing the {self.dataset} release (original resolution, {self.fmt})", enabled=show)  # fmt: skip
        stats = {"max_abs_diff_levels": 0, "jpeg_change": 0, "jpeg_from_original": 0, "train": 0, "test": 0}
        with ThreadPoolExecutor(self.workers) as pool:
            try:
                self._run_blocks(pool, blocks, test, test_blocks, stats, bar)
            except BaseException:  # Ctrl-C or a failed file: the queued files are dropped, the running ones finish
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        bar.close()
        return stats

    def _run_blocks(self, pool: ThreadPoolExecutor, blocks: list[range], test: list[str], test_blocks: list[range],
                    stats: dict, bar: Progress) -> None:  # fmt: skip
        """Protect and write ``blocks`` of training rows (a block's reads and writes in the pool while
        the next block's perturbation is computed), then copy the ``test_blocks`` files; counts into ``stats``."""
        pending: list = []
        for rows in blocks:
            clean, delta = self._block_inputs(rows)  # on the device while the pool works on the last block
            reads = [pool.submit(self._read_original, i) for i in rows]
            for done in pending:
                self._add(stats, done.result(), bar)
            originals = [r.result() for r in reads]
            carried = self._carry_block(originals, delta)
            pending = [pool.submit(self._write_row, i, originals[j], delta[j], carried[j]) for j, i in enumerate(rows)]
        for done in pending:
            self._add(stats, done.result(), bar)
        for done in [pool.submit(self._copy_test, test[i]) for rows in test_blocks for i in rows]:
            done.result()
            stats["test"] += 1
            bar.update(1)

    @staticmethod
    def _add(stats: dict, row: tuple[int, int, int], bar: Progress) -> None:
        levels, change, from_original = row
        stats["max_abs_diff_levels"] = max(stats["max_abs_diff_levels"], levels)
        stats["jpeg_change"] = max(stats["jpeg_change"], change)
        stats["jpeg_from_original"] = max(stats["jpeg_from_original"], from_original)
        stats["train"] += 1
        bar.update(1)

    def _block_inputs(self, rows: range) -> tuple[np.ndarray, np.ndarray]:
        """The clean uint8 rows (the protected images minus their int8 perturbation: the clean cache
        exactly) and their float perturbation ``[n, C, h, w]`` on the [0, 1] scale."""
        protected = np.asarray(self.cache.images[rows.start : rows.stop]).astype(np.int16)
        stored = np.asarray(self.delta_q[rows.start : rows.stop])
        clean = (protected - stored).astype(np.uint8)
        if self.perturb is None:
            return clean, stored.astype(np.float32) / np.float32(255.0)
        deltas = []
        for start in range(rows.start, rows.stop, self.batch_size):
            stop = min(start + self.batch_size, rows.stop)
            images = _to_device(clean[start - rows.start : stop - rows.start], self.device)
            labels = label_rows(self.cache.labels, start, stop, self.device)
            indices = torch.arange(start, stop, dtype=torch.int64, device=self.device)
            delta = _check_delta(self.perturb(images, labels, indices), images, "perturb", start, stop)
            deltas.append(delta.float().cpu().numpy())
        delta = np.concatenate(deltas)
        if not np.isfinite(delta).all():
            raise ValueError(f"perturb for rows {rows.start}..{rows.stop - 1} returned NaN or inf values")
        largest = float(np.abs(delta).max()) if delta.size else 0.0
        if largest > self.eps + 1e-6:  # checked here: the inverse upsampling would clip it silently
            raise ValueError(f"perturb for rows {rows.start}..{rows.stop - 1} moves a pixel by {255 * largest:.2f} levels, "
                             f"more than eps = {255 * self.eps:.2f} levels; perturb must return |delta| <= eps")  # fmt: skip
        return clean, delta

    def _read_original(self, i: int) -> np.ndarray:
        rel = self.row_files[i]
        source = self.source / rel
        if not source.is_file():
            raise FileNotFoundError(f"{self.dataset}: expected {rel} in clean_root {self.source}, not found")
        return decode_original(source, self.channels)

    def _carry_block(self, originals: list[np.ndarray], delta: np.ndarray) -> list[np.ndarray | None]:
        """``"inverse"``: the block's perturbations at their windows' sizes, solved in batches of one
        window size on the device; ``"nearest"``: None each (upsampled by the writing threads)."""
        carried: list[np.ndarray | None] = [None] * len(originals)
        if self.upsample == "nearest":
            return carried
        groups: dict[tuple[int, int], list[int]] = {}
        for j, original in enumerate(originals):
            groups.setdefault(tuple(self.crop) if self.crop else tuple(original.shape[1:]), []).append(j)
        for size, members in groups.items():
            solved = carry_back(delta[members], size, self.eps, self.upsample, device=self.device)
            for j, value in zip(members, solved):
                carried[j] = value
        return carried

    def _write_row(self, i: int, original: np.ndarray, delta: np.ndarray, carried: np.ndarray | None) -> tuple[int, int, int]:
        """Protect and write row ``i``; returns (max |protected - original|, JPEG's max change after
        decoding, JPEG's max |decoded - original|) in levels."""
        rel = self.row_files[i]
        protected = protect_original(original, delta, self.crop, eps=self.eps, upsample=self.upsample, carried=carried)
        levels = int(np.abs(protected.astype(np.int16) - original).max()) if protected.size else 0
        if levels > self.limit:  # the bound, checked on every file before it is written
            raise ValueError(f"{rel}: a pixel moved by {levels} levels, more than ceil(255*eps) = {self.limit} "
                             f"for eps = {self.eps:.6g}; nothing was published")  # fmt: skip
        target = self.folder / self.targets[i]
        target.parent.mkdir(parents=True, exist_ok=True)
        if self.nyuv2:
            np.save(target, np.ascontiguousarray(protected.transpose(1, 2, 0)), allow_pickle=False)
            self._copy_maps(rel)
            return levels, 0, 0
        data = _encode(protected, self.fmt, self.quality)
        target.write_bytes(data)
        if self.fmt != "jpeg":
            return levels, 0, 0
        decoded = _decode_bytes(data, self.channels).astype(np.int16)
        return levels, int(np.abs(decoded - protected).max()), int(np.abs(decoded - original).max())

    def _copy_test(self, rel: str) -> None:
        target = self.folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if not (self.source / rel).is_file():
            raise FileNotFoundError(f"{self.dataset}: expected the test image {rel} in clean_root {self.source}, not found")
        shutil.copyfile(self.source / rel, target)
        if self.nyuv2:
            self._copy_maps(rel)

    def _copy_maps(self, rel: str) -> None:
        from ..data.formats.nyuv2 import MAP_FOLDERS

        path = Path(rel)
        for sub in MAP_FOLDERS:
            rel_map = path.parent.parent / sub / path.name
            if not (self.source / rel_map).is_file():
                raise FileNotFoundError(f"nyuv2: expected {rel_map} in clean_root {self.source}, not found")
            (self.folder / rel_map).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.source / rel_map, self.folder / rel_map)


def _encode(image: np.ndarray, fmt: str, quality: int) -> bytes:
    """uint8 ``[C, H, W]`` as PNG (compression 6) or JPEG (4:4:4 chroma) bytes."""
    import io

    from PIL import Image

    array = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buffer = io.BytesIO()
    pil = Image.fromarray(np.ascontiguousarray(array), "L" if image.shape[0] == 1 else "RGB")
    if fmt == "png":
        pil.save(buffer, format="PNG", compress_level=6)
    else:
        pil.save(buffer, format="JPEG", quality=int(quality), subsampling=0)
    return buffer.getvalue()


def _decode_bytes(data: bytes, channels: int) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as opened:
        array = np.asarray(opened.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _merge_stats(folder: Path, world: int, fmt: str) -> dict:
    """The ranks' statistics (``.stats-rank<r>.json`` in ``folder``, removed here) as marker fields."""
    stats = []
    for rank in range(world):
        path = folder / f".stats-rank{rank}.json"
        stats.append(read_json(path) or {})
        path.unlink(missing_ok=True)
    most = lambda key: max((s.get(key, 0) for s in stats), default=0)  # noqa: E731
    merged: dict = {"max_abs_diff_levels": most("max_abs_diff_levels")}
    if fmt == "jpeg":
        merged["jpeg"] = {
            "max_abs_change_after_decode": most("jpeg_change"),
            "max_abs_diff_from_original_after_decode": most("jpeg_from_original"),
            "note": "JPEG re-encoding changes the protected pixels: the bound holds for the pixels before "
                    "encoding, the decoded files may differ from the original by max_abs_diff_from_original_after_decode",
        }  # fmt: skip
    return merged


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def _omitted(dataset: str, source: Path, row_files: list[str], test: list[str]) -> dict:
    """Image files of ``source`` in neither split: how many, a few names, and why they are left out."""
    written = set(row_files) | set(test)
    count, examples = 0, []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames.sort()
        folder = Path(dirpath)
        for name in sorted(filenames):
            if dataset == "nyuv2":
                if folder.name != "image" or not name.endswith(".npy"):
                    continue
            elif not name.lower().endswith(_IMAGE_SUFFIXES):
                continue
            rel = str((folder / name).relative_to(source))
            if rel not in written:
                count += 1
                if len(examples) < 3:
                    examples.append(rel)
    return {"count": count, "examples": examples,
            "note": "image files of the original root in neither split (e.g. CelebA's validation partition, names "
                    "the reader cannot parse, files that failed to decode) are not published"}  # fmt: skip
