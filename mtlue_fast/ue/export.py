"""Writing the protected training set (docs/method.md section 6): the uint8 cache, and its rows as image files.

After training, each training image ``x`` (uint8, in cache order, no augmentation) and its
perturbation ``delta`` (float, [0, 1] scale, ``|delta| <= eps``) become

    protected = round(clip(x + 255 * delta, 0, 255))   uint8
    delta_q   = protected - x                           int8, |delta_q| <= ceil(255 * eps)

(:func:`mtlue_fast.ops.quantize_export`). Only these uint8/int8 arrays ever reach the disk, never a
float copy of the dataset.

:func:`write_protected` writes a folder in the cache format (``images.npy``, ``delta.npy``, the
clean labels, ``manifest.json``) that victim training opens with :func:`mtlue_fast.data.open_cache`;
:func:`export_generator` does so for a trained generator, sharded under ``torch.distributed``. The
rows of such a folder are also written here as image files at the cache's working resolution
(PNG/JPEG named by :func:`exported_name`, NYUv2 ``.npy`` arrays) for
:func:`mtlue_fast.ue.publish.write_image_files`, which publishes a release laid out like the
original dataset at either resolution.

The cache is written into a temporary sibling folder (``.<name>.partial-<pid>``) that is renamed
into place when complete: an interrupted run leaves nothing that looks like a result, and a folder
the user already owns is never modified, replaced or deleted (only an empty one may be replaced).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .. import dist
from ..data.cache import DENSE_ARRAYS, Cache, open_cache
from ..data.loader import to_unit_float
from ..fileio import missing_or_empty, read_json, write_json
from ..models.generator import DenseGenerator, MTLGenerator
from ..ops import quantize_export, raise_pending_errors
from ..progress import Progress

__all__ = ["Perturb", "write_protected", "export_digest", "generator_perturb"]

#: ``perturb(images, labels, indices) -> delta``: uint8 ``[B,C,H,W]``, int64 ``[B,K]`` (NYUv2: a dict
#: of dense map tensors), int64 ``[B]`` dataset indices, all on the export device; returns the float
#: perturbation ``[B,C,H,W]`` on the [0, 1] scale.
Perturb = Callable[[torch.Tensor, "torch.Tensor | dict[str, torch.Tensor]", torch.Tensor], torch.Tensor]

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
    if missing_or_empty(out, "out_dir"):
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


def label_rows(labels: np.ndarray | dict[str, np.ndarray], start: int, stop: int, device: torch.device):
    """Rows ``start:stop`` of a cache's labels on ``device``: int64 ``[n, K]`` for classification
    labels, or for dense ones (NYUv2) a dict of the tasks' maps ``{name: [n, ...]}``."""
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
        labels = label_rows(clean.labels, start, stop, device)
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


# ----------------------------------------------------------------------------- working-resolution image files


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


# ---------------------------------------------------------------------------- export


def generator_perturb(generator: MTLGenerator | DenseGenerator) -> Perturb:
    """The float perturbation of a trained generator (eval mode, no augmentation, no autograd) as a
    :data:`Perturb`: what :func:`export_generator` exports and ``write_image_files`` carries back to
    the original resolution."""
    generator = generator.eval()

    @torch.no_grad()
    def perturb(images, labels, indices):
        return generator.delta(generator.raw(to_unit_float(images), labels)).float()

    return perturb


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
        batch_labels = label_rows(clean_cache.labels, start, stop, device)
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
