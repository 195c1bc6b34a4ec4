"""Publishing the protected training set (docs/method.md section 6): a uint8 cache, and image files in the original layout.

After training, each training image ``x`` (uint8, in cache order, no augmentation) and its
perturbation ``delta`` (float, [0, 1] scale, ``|delta| <= eps``) become

    protected = round(clip(x + 255 * delta, 0, 255))   uint8
    delta_q   = protected - x                           int8, |delta_q| <= ceil(255 * eps)

(:func:`mtlue_fast.ops.quantize_export`). Only these uint8/int8 arrays ever reach the disk, never a
float copy of the dataset.

:func:`write_protected` writes a folder in the cache format (``images.npy``, ``delta.npy``, the
clean labels, ``manifest.json``) that victim training opens with :func:`mtlue_fast.data.open_cache`.
:func:`write_image_files` turns such a folder into image files laid out like the original release
(same relative paths and names, PNG; the dataset's annotation files copied alongside), so the
protected copy can be published in place of the original: either the training images at the
cache's working resolution, or (``resolution="original"``) a complete release at the original
images' sizes, the working-resolution perturbation carried back through the inverse of the cache's
geometry (:func:`protect_original`) and the test split copied unchanged.

Both write into a temporary sibling folder (``.<name>.partial-<pid>``) that is renamed into place
when complete: an interrupted run leaves nothing that looks like a result, and a folder the user
already owns is never modified, replaced or deleted (only an empty one may be replaced).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .. import dist
from ..data.cache import DENSE_ARRAYS, Cache, open_cache
from ..data.decode import center_box, open_converted
from ..data.loader import to_unit_float
from ..fileio import read_json, write_json
from ..models.generator import DenseGenerator, MTLGenerator
from ..ops import quantize_export, raise_pending_errors
from ..progress import Progress

__all__ = ["Perturb", "write_protected", "write_image_files", "export_digest", "generator_perturb", "upsample_nearest",
           "protect_original", "MARKER_FILE"]

#: ``perturb(images, labels, indices) -> delta``: uint8 ``[B,C,H,W]``, int64 ``[B,K]`` (NYUv2: a dict
#: of dense map tensors), int64 ``[B]`` dataset indices, all on the export device; returns the float
#: perturbation ``[B,C,H,W]`` on the [0, 1] scale.
Perturb = Callable[[torch.Tensor, "torch.Tensor | dict[str, torch.Tensor]", torch.Tensor], torch.Tensor]

#: How the perturbation is carried to the original resolution by default (see :func:`carry_back`).
UPSAMPLE = "nearest"
INVERSE_ITERATIONS = 30
INVERSE_CHUNK_ELEMENTS = 1 << 24  # float64 values per solver batch (128 MiB a tensor)

#: File written at the top of an image-file export: what it is and where it came from.
MARKER_FILE = "mtlue_protected.json"

EXPORT_VERSION = 1
MAX_EPS = 127 / 255  # delta_q is int8


# ----------------------------------------------------------------------------- the protected cache


def write_protected(
    clean: Cache,
    out_dir: str | Path,
    perturb: Perturb,
    *,
    method: str,
    eps: float,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    settings: dict | None = None,
    progress: bool = True,
) -> Cache:
    """Perturb every training image of ``clean`` and write the protected cache folder ``out_dir``.

    Args:
        clean: the opened clean training cache (:func:`mtlue_fast.data.build_cache`).
        out_dir: folder to create. If it already holds a complete export with the same
            ``source_digest`` (same clean data, method, eps and settings) it is returned as it is
            and ``perturb`` is never called; any other existing non-empty folder raises.
        perturb: ``perturb(images, labels, indices) -> delta``, called once per batch in dataset
            order: ``images`` uint8 ``[B,C,H,W]`` on ``device``; ``labels`` int64 ``[B,K]`` on
            ``device`` (NYUv2: dict ``seg`` int8 ``[B,H,W]``, ``depth`` float16 ``[B,1,H,W]``,
            ``normal`` float16 ``[B,3,H,W]``); ``indices`` int64 ``[B]``. It returns the float
            perturbation ``[B,C,H,W]`` on the [0, 1] scale with ``|delta| <= eps``. It runs with
            autograd in its ambient state (wrap a generator call in ``torch.no_grad()``).
        method: name of the method (recorded; part of the digest), e.g. ``"mtl_ue"``.
        eps: L-inf budget on the [0, 1] scale, 0 <= eps <= 127/255 (recorded; part of the digest).
        device: where ``perturb`` and the quantisation run.
        batch_size: images per ``perturb`` call; host memory stays O(batch_size).
        settings: JSON-serialisable settings of the method (seed, checkpoint, ...); recorded and
            part of the digest, so a different setting never reuses an old export.
        progress: print a progress line with images/s.

    Returns:
        ``open_cache(out_dir)``: ``images`` the protected uint8 images, ``labels`` the clean labels;
        ``out_dir/delta.npy`` holds the int8 ``delta_q``.

    Raises:
        ValueError: bad arguments; ``out_dir`` holds something else (another export, other files);
            ``perturb`` returned a wrong shape, NaN/inf, or a pixel moved by more than
            ``ceil(255 * eps)`` levels. Nothing is left behind then.
    """
    _check_clean(clean)
    method, eps, settings = _check_export_args(method, eps, batch_size, settings)
    out = Path(out_dir).expanduser()
    digest = export_digest(clean.manifest["source_digest"], method, eps, settings)

    existing = _existing_export(out, digest)
    if existing is not None:
        return existing

    partial = _fresh_partial(out)
    try:
        max_levels = _write_arrays(clean, partial, perturb, method, eps, torch.device(device), batch_size, progress)
        manifest = _protected_manifest(clean, method, eps, settings, digest, max_levels)
        write_json(partial / "manifest.json", manifest)  # last: a folder with a manifest is complete
        _move_into_place(partial, out, lambda: (read_json(out / "manifest.json") or {}).get("source_digest") == digest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return open_cache(out)


def export_digest(clean_source_digest: str, method: str, eps: float, settings: dict) -> str:
    """The ``source_digest`` of a protected export: sha256 of (clean source_digest, method, eps,
    settings), so a victim run records exactly which data it trained on."""
    payload = {"clean_source_digest": clean_source_digest, "method": method, "eps": float(eps), "settings": settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def level_limit(eps: float) -> int:
    """Largest allowed |delta_q| in uint8 levels for budget ``eps``: ``ceil(255 * eps)`` (with a
    1e-6 tolerance so that 8/255 gives 8, not 9)."""
    return math.ceil(255.0 * float(eps) - 1e-6)


def _check_clean(clean: Cache) -> None:
    if not isinstance(clean, Cache):
        raise TypeError(
            f"clean must be an opened mtlue_fast.data.Cache (build_cache/open_cache), got {type(clean).__name__}"
        )
    for key in ("dataset", "source_digest"):
        if not clean.manifest.get(key):
            raise ValueError(f"clean cache {clean.path}: manifest.json has no {key!r}; rebuild the cache")
    images = clean.images
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"clean cache {clean.path}: images must be uint8 [N,C,H,W], got {images.dtype} {images.shape}")
    rows = {len(v) for v in clean.labels.values()} if isinstance(clean.labels, dict) else {len(clean.labels)}
    if rows != {len(images)}:
        raise ValueError(f"clean cache {clean.path}: labels have {sorted(rows)} rows, images {len(images)}")


def _check_export_args(method: str, eps: float, batch_size: int, settings: dict | None) -> tuple[str, float, dict]:
    if not isinstance(method, str) or not method:
        raise ValueError(f"method must be a non-empty string, got {method!r}")
    eps = float(eps)
    if not 0.0 <= eps <= MAX_EPS:
        raise ValueError(f"eps must be in [0, 127/255] on the [0, 1] scale (e.g. 8/255), got {eps}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    settings = {} if settings is None else settings
    if not isinstance(settings, dict):
        raise TypeError(f"settings must be a dict or None, got {type(settings).__name__}")
    try:  # normalised through JSON: what is recorded is what is digested
        settings = json.loads(json.dumps(settings, sort_keys=True))
    except (TypeError, ValueError) as err:
        raise ValueError(f"settings must be JSON-serialisable: {err}") from None
    return method, eps, settings


def _existing_export(out: Path, digest: str) -> Cache | None:
    """The complete export at ``out`` with ``digest``; None when ``out`` is missing or empty."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; choose another out_dir")
    if not any(out.iterdir()):
        return None
    manifest = read_json(out / "manifest.json")
    if manifest is None or "method" not in manifest:
        raise ValueError(f"{out} exists and is not a protected export (no manifest.json with a method); "
                         "it is never overwritten: choose another out_dir")  # fmt: skip
    if manifest.get("source_digest") != digest:
        raise ValueError(
            f"{out} already holds a different protected export (method {manifest.get('method')!r}, eps "
            f"{manifest.get('eps')}, settings {manifest.get('settings')}); it is never overwritten: "
            "remove it yourself or choose another out_dir"
        )
    try:
        return open_cache(out)
    except (OSError, ValueError) as err:
        raise ValueError(f"{out} holds a damaged protected export ({err}); remove it yourself and rerun") from None


def _fresh_partial(out: Path) -> Path:
    """An empty temporary sibling ``.<name>.partial-<pid>`` of ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if partial.exists():  # left by a crashed run of a process that had the same id
        shutil.rmtree(partial)
    partial.mkdir()
    return partial


def _move_into_place(partial: Path, out: Path, same: Callable[[], bool]) -> None:
    """Rename ``partial`` to ``out`` (an empty ``out`` is replaced). If another process finished the
    same export first (``same()``), ours is dropped; anything else at ``out`` raises."""
    try:
        os.rename(partial, out)  # POSIX: replaces an empty folder, fails on a non-empty one
    except OSError:
        if not same():
            raise ValueError(f"{out} appeared while exporting and holds something else; never overwritten") from None
        shutil.rmtree(partial)


def _batch_labels(labels: np.ndarray | dict[str, np.ndarray], start: int, stop: int, device: torch.device):
    if isinstance(labels, dict):
        return {name: _to_device(np.array(array[start:stop]), device) for name, array in labels.items()}
    return _to_device(np.asarray(labels[start:stop], dtype=np.int64), device)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on ``device``: through page-locked memory and asynchronously on a GPU."""
    t = torch.from_numpy(np.array(array))  # a copy: cache arrays are read-only memory maps
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class _HostWriter:
    """Writes each batch's results into host arrays without waiting for the device per batch.

    Batch i is copied into one of two host buffers (page-locked on a GPU, asynchronously) and
    written to the output arrays once batch i+1 has been queued: the host waits on an event of a
    batch the device finished long ago, never on the batch it is computing. ``outputs``: the
    destination arrays (e.g. memory maps), ``[N, ...]`` each.
    """

    def __init__(self, outputs: Sequence[np.ndarray], batch_size: int, device: torch.device):
        self.outputs, self.cuda = list(outputs), device.type == "cuda"
        self.pending: tuple | None = None
        self.buffers = []
        for _ in range(2):
            tensors = [torch.empty((batch_size, *o.shape[1:]), dtype=_TORCH_DTYPES[o.dtype], pin_memory=self.cuda) for o in self.outputs]
            self.buffers.append((tensors, [t.numpy() for t in tensors]))  # numpy views, made once

    def put(self, start: int, stop: int, results: Sequence[torch.Tensor]) -> None:
        slot = 0 if self.pending is None else 1 - self.pending[3]  # never the buffer still being read
        for host, result in zip(self.buffers[slot][0], results):
            host[: stop - start].copy_(result, non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self.flush()
        self.pending = (start, stop, event, slot)

    def flush(self) -> None:
        if self.pending is None:
            return
        start, stop, event, slot = self.pending
        if event is not None:
            event.synchronize()
        for out, array in zip(self.outputs, self.buffers[slot][1]):
            out[start:stop] = array[: stop - start]
        self.pending = None


_TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.int8): torch.int8}


def _write_arrays(clean: Cache, folder: Path, perturb: Perturb, method: str, eps: float, device: torch.device,
                  batch_size: int, show: bool) -> int:  # fmt: skip
    """Fill ``images.npy``/``delta.npy`` batch by batch and copy the labels; return max |delta_q|.

    The values are checked once, after the last batch (each batch's NaN/inf flag and largest move
    stay on the device until then), so no batch waits on a read; a failed check raises before the
    export is moved into place."""
    n = len(clean.images)
    shape = clean.images.shape
    images_out = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8, shape=shape)
    delta_out = np.lib.format.open_memmap(folder / "delta.npy", mode="w+", dtype=np.int8, shape=shape)
    limit = level_limit(eps)
    dataset = clean.manifest["dataset"]
    bar = Progress(n, f"exporting {method} {dataset}/{clean.manifest.get('split', 'train')}", enabled=show)
    writer = _HostWriter([images_out, delta_out], min(batch_size, max(n, 1)), device)
    flags, spans = [], [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    for start, stop in spans:
        images = _to_device(clean.images[start:stop], device)
        labels = _batch_labels(clean.labels, start, stop, device)
        indices = torch.arange(start, stop, dtype=torch.int64, device=device)
        delta = _check_delta(perturb(images, labels, indices), images, method, start, stop)
        nonfinite = (~torch.isfinite(delta)).any()
        protected, delta_q = quantize_export(images, delta)
        levels = delta_q.abs().amax() if delta_q.numel() else torch.zeros((), dtype=torch.int8, device=device)
        flags.append(torch.stack([nonfinite.to(torch.int32), levels.to(torch.int32)]))
        writer.put(start, stop, (protected, delta_q))
        bar.update(stop - start)
    writer.flush()
    bar.close()
    raise_pending_errors(device)  # on a GPU, a delta beyond the int8 range was saturated and recorded
    max_levels = _check_flags(flags, spans, limit, method, eps)
    images_out.flush()
    delta_out.flush()
    del images_out, delta_out
    _copy_labels(clean.labels, folder)
    return max_levels


def _check_flags(flags: list[torch.Tensor], spans: list[tuple[int, int]], limit: int, method: str, eps: float) -> int:
    """Raise for the first batch with NaN/inf or a move beyond ``limit`` levels (one host read for
    the whole export); return the largest move. ``spans``: each batch's ``(start, stop)`` rows."""
    if not flags:
        return 0
    values = torch.stack(flags).tolist()
    for (nonfinite, levels), (start, stop) in zip(values, spans):
        where = f"{method}: perturb for rows {start}..{stop - 1}"
        if nonfinite:
            raise ValueError(f"{where} returned NaN or inf values")
        if levels > limit:
            raise ValueError(
                f"{where} moved a pixel by {levels} levels, more than ceil(255*eps) = {limit} for eps = {eps:.6g}; "
                "perturb must return |delta| <= eps"
            )
    return max(levels for _, levels in values)


def _check_delta(delta: object, images: torch.Tensor, method: str, start: int, stop: int) -> torch.Tensor:
    """Type and shape of ``perturb``'s result (its values are checked after the last batch)."""
    where = f"{method}: perturb for rows {start}..{stop - 1}"
    if not isinstance(delta, torch.Tensor) or not delta.is_floating_point():
        kind = f"{delta.dtype} tensor" if isinstance(delta, torch.Tensor) else type(delta).__name__
        raise ValueError(f"{where} must return a floating tensor, got {kind}")
    if tuple(delta.shape) != tuple(images.shape):
        raise ValueError(f"{where} returned shape {tuple(delta.shape)}, expected {tuple(images.shape)}")
    return delta.detach().to(images.device)


def _copy_labels(labels: np.ndarray | dict[str, np.ndarray], folder: Path, rows_per_copy: int = 4096) -> None:
    """The clean label arrays, unchanged, chunk by chunk (dense NYUv2 maps can be large)."""
    arrays = labels if isinstance(labels, dict) else {"labels": labels}
    for name, array in arrays.items():
        dtype = np.int64 if name == "labels" else DENSE_ARRAYS[name][0]
        out = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=array.shape)
        for start in range(0, len(array), rows_per_copy):
            out[start : start + rows_per_copy] = array[start : start + rows_per_copy]
        out.flush()
        del out


def _protected_manifest(clean: Cache, method: str, eps: float, settings: dict, digest: str, max_levels: int) -> dict:
    source = clean.manifest
    copied = ("dataset", "split", "size", "channels", "center_crop", "row_files")
    manifest = {key: source[key] for key in copied if key in source}
    manifest.update(
        kind="protected",
        export_version=EXPORT_VERSION,
        task_names=list(clean.task_names),
        num_classes=list(clean.num_classes),
        method=method,
        eps=eps,
        eps_levels=level_limit(eps),
        settings=settings,
        clean_source_digest=source["source_digest"],
        clean_path=str(Path(clean.path).resolve()),
        source_digest=digest,
        count=len(clean.images),
        max_abs_delta_levels=max_levels,
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    return manifest


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
      67 % on a 2x ChestX-ray sample whose perturbation is near the budget everywhere). Over three
      victim seeds neither kept the protection clearly better (docs/results.md); the inverse costs
      about 35 ms per CelebA image and 1 s per 1024x1024 X-ray on one CPU core.
      The test split's images (``test_files``, paths relative to ``clean_root``) are copied byte
      for byte and NOT perturbed: the protection covers the training data only, and the test
      split is the clean held-out data victims are measured on. Files in neither split (CelebA's
      validation partition, names the reader cannot parse, images that failed to decode) are not
      written; the marker file counts them.

    ``perturb`` (``"original"`` only) recomputes the float perturbation of the training rows:
    called with the clean uint8 images (``protected.images - delta.npy``, exactly the clean cache),
    their labels and indices, in blocks of :data:`FILE_BLOCK` rows, ``batch_size`` rows per call,
    on ``device`` (e.g. :func:`generator_perturb`). Without it the stored int8 perturbation
    ``delta.npy / 255`` is used (rounded to whole levels at the working resolution).

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
        protected: the protected cache (:func:`write_protected`'s result, or its folder).
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
    if not out.exists():
        return False
    if not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; choose another out_root")
    if not any(out.iterdir()):
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


def exported_name(rel: str, fmt: str) -> str:
    """The relative path of the written file: the extension replaced by ``.png``/``.jpg`` where it
    differs (``img/000001.jpg`` -> ``img/000001.png``; ``x.jpg.chip.jpg`` -> ``x.jpg.chip.png``)."""
    path = Path(rel)
    suffix = ".png" if fmt == "png" else ".jpg"
    keep = (".png",) if fmt == "png" else (".jpg",)
    return rel if path.suffix.lower() in keep else str(path.with_suffix(suffix))


def _write_image_rows(cache: Cache, row_files: list[str], folder: Path, fmt: str, quality: int, show: bool,
                      workers: int | None, blocks: list[range]) -> dict[str, str]:  # fmt: skip
    """Encode the rows of ``blocks`` to ``folder / exported_name(row_files[i])``; return
    {old basename: new basename} for every row whose name changed."""
    from PIL import Image

    targets = [exported_name(rel, fmt) for rel in row_files]
    if len(set(targets)) != len(targets):
        raise ValueError(f"{cache.path}: two rows map to the same exported file name; cannot write them")
    for parent in sorted({str(Path(t).parent) for t in targets}):
        (folder / parent).mkdir(parents=True, exist_ok=True)
    mode = "L" if cache.images.shape[1] == 1 else "RGB"
    if fmt == "png":
        options: dict = {"format": "PNG", "compress_level": 6}
    else:  # 4:4:4 chroma: the least lossy JPEG at a given quality
        options = {"format": "JPEG", "quality": int(quality), "subsampling": 0}

    def encode(rows: range) -> int:
        block = np.asarray(cache.images[rows.start : rows.stop])
        for offset, i in enumerate(rows):
            array = block[offset, 0] if mode == "L" else block[offset].transpose(1, 2, 0)
            Image.fromarray(np.ascontiguousarray(array), mode).save(folder / targets[i], **options)
        return len(rows)

    bar = Progress(sum(len(b) for b in blocks), f"writing {fmt} files", enabled=show)
    threads = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for done in pool.map(encode, blocks):
            bar.update(done)
    bar.close()
    return {Path(old).name: Path(new).name for old, new in zip(row_files, targets) if old != new}


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


def _write_nyuv2_files(cache: Cache, row_files: list[str], source: Path, folder: Path, show: bool,
                       blocks: list[range]) -> None:  # fmt: skip
    """NYUv2: ``<split>/image/<i>.npy`` as uint8 HxWx3 plus the row's label/depth/normal maps copied,
    for the rows of ``blocks``."""
    from ..data.formats.nyuv2 import MAP_FOLDERS

    bar = Progress(sum(len(b) for b in blocks), "writing nyuv2 arrays", enabled=show)
    for i in (i for block in blocks for i in block):
        rel = row_files[i]
        path = Path(rel)
        if path.parent.name != "image" or path.suffix != ".npy":
            raise ValueError(f"nyuv2: row file {rel!r} is not of the form <split>/image/<i>.npy")
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        np.save(target, np.ascontiguousarray(np.asarray(cache.images[i]).transpose(1, 2, 0)), allow_pickle=False)
        for sub in MAP_FOLDERS:
            rel_map = path.parent.parent / sub / path.name
            if not (source / rel_map).is_file():
                raise FileNotFoundError(f"nyuv2: expected {rel_map} in clean_root {source}, not found")
            (folder / rel_map).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / rel_map, folder / rel_map)
        bar.update(1)
    bar.close()


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


def generator_perturb(generator: MTLGenerator | DenseGenerator) -> Perturb:
    """The float perturbation of a trained generator (eval mode, no augmentation, no autograd) as a
    :data:`Perturb`: what :func:`export_generator` exports and ``write_image_files`` carries back to
    the original resolution."""
    generator = generator.eval()

    @torch.no_grad()
    def perturb(images, labels, indices):
        return generator.delta(generator.raw(to_unit_float(images), labels)).float()

    return perturb


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
        bar.close()
        return stats

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
            labels = _batch_labels(self.cache.labels, start, stop, self.device)
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


# ---------------------------------------------------------------------------- export


def export_generator(generator: MTLGenerator | DenseGenerator, clean_cache, out_dir: str | Path, *,
                     device: torch.device | str = "cpu", batch_size: int = 256, method: str = "mtlue",
                     settings: dict | None = None, progress: bool = True):
    """Run ``generator`` (eval mode, no augmentation) over the clean training cache in order and write the
    protected dataset (:func:`mtlue_fast.ue.export.write_protected`). Returns the protected cache.

    Under ``torch.distributed`` the export is sharded: rank r computes the batches r, r + N, ... (the
    same batches a single process would compute) and writes their int8 deltas to a part file; rank 0
    then assembles them in dataset order through ``write_protected``, so the result is the
    single-process export byte for byte.
    """
    device = torch.device(device)
    generator = generator.to(device).eval()
    perturb = generator_perturb(generator)

    place = dist.info()
    if not place.distributed:
        return write_protected(clean_cache, out_dir, perturb, method=method, eps=generator.eps, device=device,
                               batch_size=batch_size, settings=settings, progress=progress)
    out = Path(out_dir)
    digest = export_digest(clean_cache.manifest["source_digest"], method, generator.eps, settings or {})
    done = read_json(out / "manifest.json")
    if done is not None and done.get("source_digest") == digest:
        dist.barrier()
        return open_cache(out)
    parts = out.parent / f".{out.name}.parts"
    parts.mkdir(parents=True, exist_ok=True)
    _export_shard(perturb, clean_cache, parts / f"rank{place.rank}.npy", device, batch_size, place)
    dist.barrier()
    if place.is_main:
        deltas = _assemble_shards(parts, len(clean_cache.images), batch_size, place.world_size)

        def stored(images, labels, indices):
            # int8 levels / 255: quantize_export rounds them back to the same integers exactly.
            rows = indices.cpu().numpy()
            return torch.from_numpy(deltas[rows].astype(np.float32) / 255.0).to(images.device)

        write_protected(clean_cache, out, stored, method=method, eps=generator.eps, device=device,
                        batch_size=batch_size, settings=settings, progress=progress)
        shutil.rmtree(parts, ignore_errors=True)
    dist.barrier()
    return open_cache(out)


def _export_shard(perturb, clean_cache, path: Path, device: torch.device, batch_size: int, place) -> None:
    """This rank's batches (``rank, rank + N, ...`` of the in-order batches), as int8 deltas."""
    n = len(clean_cache.images)
    starts = list(range(place.rank * batch_size, n, batch_size * place.world_size))
    rows = sum(min(batch_size, n - s) for s in starts)
    shard = np.zeros((rows, *clean_cache.images.shape[1:]), dtype=np.int8)
    writer = _HostWriter([shard], min(batch_size, max(n, 1)), device)
    offset = 0
    for start in starts:
        stop = min(start + batch_size, n)
        images = _to_device(clean_cache.images[start:stop], device)
        batch_labels = _batch_labels(clean_cache.labels, start, stop, device)
        indices = torch.arange(start, stop, device=device)
        delta = perturb(images, batch_labels, indices)
        _, delta_q = quantize_export(images, delta)
        writer.put(offset, offset + stop - start, (delta_q,))
        offset += stop - start
    writer.flush()
    raise_pending_errors(device)
    np.save(path, shard)


def _assemble_shards(parts: Path, n: int, batch_size: int, world: int) -> np.ndarray:
    """The int8 deltas of all ranks' shards in dataset order ``[N, C, H, W]``."""
    shards = [np.load(parts / f"rank{r}.npy", mmap_mode="r") for r in range(world)]
    out = np.lib.format.open_memmap(parts / "assembled.npy", mode="w+", dtype=np.int8, shape=(n, *shards[0].shape[1:]))
    offsets = [0] * world
    for batch_index, start in enumerate(range(0, n, batch_size)):
        rank = batch_index % world
        stop = min(start + batch_size, n)
        out[start:stop] = shards[rank][offsets[rank] : offsets[rank] + stop - start]
        offsets[rank] += stop - start
    return out
