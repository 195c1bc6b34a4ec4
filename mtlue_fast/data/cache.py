"""The one-time uint8 cache of a dataset split at its working resolution (docs/method.md section 2.6).

Layout of one cache entry (a folder under the cache root):

    images.npy      uint8 [N, C, H, W], memory-mapped on open
    labels.npy      int64 [N, K]            (NYUv2: seg.npy int8 [N,H,W] with -1 = ignore,
                                             depth.npy float16 [N,1,H,W], normal.npy float16 [N,3,H,W])
    manifest.json   settings, task names, source files (path, size, mtime), skip counts; written last

The build decodes in chunks into ``*.partial.npy`` files and records after every chunk which are
done (``progress.json``), so an interrupted build resumes where it stopped. Under torchrun every
rank decodes a share of the chunks (``progress.rank<r>.json``) and rank 0 assembles the entry, so the
build takes 1/N of the time, resumes with any number of processes, and no rank waits on a timer; only when all chunks
are in are the arrays renamed into place and the manifest written, so an interrupted build never
looks complete. A cache whose manifest no longer matches the source files or settings is rebuilt.
Files that fail to decode are skipped, counted and reported; they never enter the cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .. import dist
from ..fileio import file_lock, read_json, save_npy, write_json
from ..progress import Progress
from . import load_records
from .decode import Decoder, PilDecoder
from .records import Records
from .specs import ResizeSpec, get_spec
from .subset import subset_records

CACHE_VERSION = 2  # 2: the manifest lists each row's source file (row_files)
DENSE_ARRAYS = {"seg": (np.int8, 0), "depth": (np.float16, 1), "normal": (np.float16, 3)}  # dtype, channels


def default_cache_root() -> Path:
    """``$MTLUE_CACHE`` or ``~/.cache/mtlue_fast``."""
    return Path(os.environ.get("MTLUE_CACHE", Path.home() / ".cache" / "mtlue_fast")).expanduser()


@dataclass
class Cache:
    """An opened cache entry.

    Attributes:
        path: the entry's folder.
        images: uint8 memmap ``[N, C, H, W]``.
        labels: int64 ``[N, K]``; for NYUv2 a dict of memmaps ``seg`` int8 ``[N,H,W]`` (-1 = ignore),
            ``depth`` float16 ``[N,1,H,W]``, ``normal`` float16 ``[N,3,H,W]``.
        task_names, num_classes: as in the records.
        manifest: the parsed manifest.json.
    """

    path: Path
    images: np.ndarray
    labels: np.ndarray | dict[str, np.ndarray]
    task_names: list[str]
    num_classes: list[int]
    manifest: dict

    def __len__(self) -> int:
        return len(self.images)


def build_cache(
    dataset: str,
    root: str | Path,
    split: str,
    cache_dir: str | Path | None = None,
    *,
    size: tuple[int, int] | None = None,
    decoder: str | Decoder = "auto",
    chunk_size: int = 1024,
    strict: bool = False,
    progress: bool = True,
    subset: int | None = None,
    subset_seed: int = 0,
    device: str | None = None,
) -> Cache:
    """Build (or reuse) the uint8 cache of one split and open it.

    Args:
        dataset, root, split: as for :func:`mtlue_fast.data.load_records`.
        cache_dir: cache root (default :func:`default_cache_root`); one folder per entry inside.
        size: working resolution ``(H, W)`` overriding the spec's (e.g. a reduced synthetic set).
        decoder: ``"auto"`` (on a GPU: DALI's GPU decoder, else torchvision's nvJPEG; otherwise
            DALI's CPU pipeline, else PIL), ``"dali"``, ``"torchvision"``, ``"pil"`` or a Decoder
            (see :func:`choose_decoder`).
        chunk_size: images decoded between two progress records.
        strict: a skipped row, missing image or undecodable file raises instead of being counted.
        progress: print a progress line with images/s.
        subset: keep a seeded, stratified subset of this many images of the split
            (:func:`mtlue_fast.data.subset.subset_records`; None: all). The subset is part of the
            entry's settings, so it never shares an entry with the full split; the manifest's
            ``subset`` records it.
        subset_seed: the subset's seed.
        device: the run's device (``"cpu"``, ``"cuda"``, ``"cuda:1"``): ``"auto"`` and ``"dali"``
            decode on a GPU only when it is a CUDA device (None: whenever one is visible).

    The decoder that will build the entry is part of its settings: decoders round differently
    (JPEG upsampling, resizing), so caches made by different ones are different entries, and a
    half-built entry is never finished by another decoder.
    """
    spec = get_spec(dataset)
    resize = spec.resize if size is None else replace(spec.resize, size=tuple(size))
    records = load_records(dataset, root, split, strict=strict)
    settings = {"version": CACHE_VERSION, "dataset": dataset, "split": split, "root": records.root,
                "channels": resize.channels, "size": list(resize.size),
                "center_crop": list(resize.center_crop) if resize.center_crop else None}  # fmt: skip
    dec = resolve_decoder(decoder, gpu=None if device is None else str(device).startswith("cuda"))
    settings["decoder"] = dec.name
    subset_info = None
    if subset is not None:
        records, subset_info = subset_records(records, int(subset), int(subset_seed))
        settings["subset"] = {"size": int(subset), "seed": int(subset_seed)}  # only then: full entries keep their names
    entry = Path(cache_dir or default_cache_root()) / _entry_name(settings)
    sources = _source_listing(records)
    source_digest = _digest({"settings": settings, "sources": sources, "labels": _label_digest(records)})
    place = dist.info()
    # Rank 0 holds the lock (other runs sharing the cache root wait for it); every rank decodes a
    # share of the chunks; the waits between them have no timer (dist.barrier: a dead rank ends
    # them, a slow one does not).
    with file_lock(entry.parent / f".{entry.name}.lock") if place.is_main else contextlib.nullcontext():
        complete = None
        if place.is_main:
            manifest = read_json(entry / "manifest.json")
            complete = manifest is not None and manifest.get("source_digest") == source_digest and _complete(entry, spec.dense)
        if dist.broadcast_object(complete, f"waiting for rank 0 to check the cache {entry}"):
            return open_cache(entry)
        done = _start(entry, len(records), resize, source_digest, chunk_size, spec.dense) if place.is_main else None
        done = dist.broadcast_object(done, f"waiting for rank 0 to set up the cache {entry}")
        _decode_share(entry, records, resize, dec, source_digest, chunk_size, strict, progress, spec.dense, done, place)
        dist.barrier(f"waiting for the other ranks' shares of the cache {entry}")
        if place.is_main:
            manifest = {**settings, "source_digest": source_digest, "decoder": dec.name, "count": None,
                        "task_names": records.task_names, "num_classes": records.num_classes,
                        "sources": sources, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}  # fmt: skip
            if subset_info is not None:
                manifest["subset"] = subset_info
            _finalize(entry, records, manifest, spec.dense)
            if progress and manifest["skipped"]["counts"]:
                print(manifest["summary"], file=sys.stderr, flush=True)
        dist.barrier(f"waiting for rank 0 to finish the cache {entry}")
    return open_cache(entry)


def open_cache(entry: str | Path) -> Cache:
    """Open a complete cache entry (memory-mapped, read-only)."""
    entry = Path(entry)
    manifest = read_json(entry / "manifest.json")
    if manifest is None:
        raise FileNotFoundError(f"{entry} is not a complete cache (no manifest.json)")
    images = np.load(entry / "images.npy", mmap_mode="r")
    if manifest["dataset"] == "nyuv2":
        labels: np.ndarray | dict[str, np.ndarray] = {
            name: np.load(entry / f"{name}.npy", mmap_mode="r") for name in DENSE_ARRAYS
        }
    else:
        labels = np.load(entry / "labels.npy")
    return Cache(entry, images, labels, manifest["task_names"], manifest["num_classes"], manifest)


DECODERS = ("auto", "dali", "torchvision", "pil")


def choose_decoder(requested: str, *, gpu: bool, dali: bool, gpu_jpeg: bool) -> str:
    """Which decoder a name stands for, given what this machine has.

    Args:
        requested: ``"auto"``, ``"dali"``, ``"torchvision"`` or ``"pil"``.
        gpu: a CUDA GPU is available; dali: NVIDIA DALI imports; gpu_jpeg: torchvision decodes
            JPEGs on the GPU (:func:`mtlue_fast.data.gpu_decode.available`).

    Returns:
        ``"dali-gpu"`` (DALI's mixed decoder), ``"torchvision-gpu"`` (nvJPEG through torchvision),
        ``"dali-cpu"`` or ``"pil"``. ``auto``: with a GPU, DALI's GPU decoder when DALI is installed,
        else torchvision's; without one (or neither), DALI's CPU pipeline, else PIL.
        ``dali``: DALI on the GPU when there is one. ``torchvision``: torchvision on the GPU.

    Raises:
        ValueError: an unknown name. RuntimeError: the requested decoder is not available here.
    """
    if requested not in DECODERS:
        raise ValueError(f"decoder must be one of {', '.join(repr(d) for d in DECODERS)}, got {requested!r}")
    if requested == "pil":
        return "pil"
    if requested == "dali":
        if not dali:
            raise RuntimeError("decoder='dali' but NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
        return "dali-gpu" if gpu else "dali-cpu"
    if requested == "torchvision":
        if not (gpu and gpu_jpeg):
            why = "no CUDA GPU is available" if not gpu else "torchvision cannot decode JPEGs on this GPU"
            raise RuntimeError(f"decoder='torchvision' decodes on a GPU, but {why}")
        return "torchvision-gpu"
    if gpu and dali:
        return "dali-gpu"
    if gpu and gpu_jpeg:
        return "torchvision-gpu"
    return "dali-cpu" if dali else "pil"


def resolve_decoder(decoder: str | Decoder, gpu: bool | None = None) -> Decoder:
    """The decoder object for a name (see :func:`choose_decoder`); a Decoder is returned as is.
    ``gpu``: whether a GPU decoder may be chosen (None: whenever CUDA is available). Constructing
    builds no pipeline and touches no GPU."""
    if not isinstance(decoder, str):
        return decoder
    if decoder not in DECODERS:
        choose_decoder(decoder, gpu=False, dali=False, gpu_jpeg=False)  # raises, naming the choices
    import torch

    from . import dali, gpu_decode

    gpu = torch.cuda.is_available() if gpu is None else gpu and torch.cuda.is_available()
    has_dali = decoder in ("auto", "dali") and dali.available()
    # Probed only where it can decide: the probe initialises CUDA and imports torchvision.
    gpu_jpeg = gpu and decoder in ("auto", "torchvision") and not has_dali and gpu_decode.available()
    choice = choose_decoder(decoder, gpu=gpu, dali=has_dali, gpu_jpeg=gpu_jpeg)
    if choice == "pil":
        return PilDecoder()
    if choice == "torchvision-gpu":
        return gpu_decode.TorchvisionDecoder("cuda")
    return dali.DaliDecoder("gpu" if choice == "dali-gpu" else "cpu")


# ----------------------------------------------------------------------------- internals


def _entry_name(settings: dict) -> str:
    height, width = settings["size"]
    return f"{settings['dataset']}-{settings['split']}-{height}x{width}-{_digest(settings)[:10]}"


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _label_digest(records: Records) -> str:
    if records.labels.dtype == object:  # NYUv2: label maps are files, covered by the listing
        return ""
    return hashlib.sha256(np.ascontiguousarray(records.labels).tobytes()).hexdigest()


def _source_listing(records: Records) -> list[list]:
    """``[relative path, size, mtime_ns]`` of every file the cache is built from."""
    files = list(records.paths)
    if records.labels.dtype == object:
        files += [p for row in records.labels for p in row]
    listing = []
    for path in files:
        stat = os.stat(path)
        listing.append([os.path.relpath(path, records.root), stat.st_size, stat.st_mtime_ns])
    return listing


def _complete(entry: Path, dense: bool) -> bool:
    names = ["images.npy"] + ([f"{n}.npy" for n in DENSE_ARRAYS] if dense else ["labels.npy"])
    return all((entry / n).is_file() for n in names)


def _partial_arrays(entry: Path, n: int, resize: ResizeSpec, dense: bool, resume: bool) -> dict[str, np.ndarray]:
    height, width = resize.size
    shapes = {"images": ((n, resize.channels, height, width), np.uint8)}
    if dense:
        for name, (dtype, channels) in DENSE_ARRAYS.items():
            shapes[name] = ((n, height, width) if channels == 0 else (n, channels, height, width), dtype)
    mode = "r+" if resume else "w+"
    return {
        name: np.lib.format.open_memmap(entry / f"{name}.partial.npy", mode=mode, dtype=dtype, shape=shape)
        for name, (shape, dtype) in shapes.items()
    }


def _progress_files(entry: Path) -> list[Path]:
    """``progress.json`` (rank 0's merged record) and ``progress.rank<r>.json`` (each rank's share)."""
    return sorted(entry.glob("progress*.json"))


def _start(entry: Path, n: int, resize: ResizeSpec, source_digest: str, chunk_size: int, dense: bool) -> list[int]:
    """Set up (or keep, to resume) the partial arrays; returns the chunks already done. Rank 0 only.

    The chunks done are read from every progress file of an interrupted build, whatever its number
    of processes: chunk ``c`` holds rows ``[c * chunk_size, (c + 1) * chunk_size)``."""
    entry.mkdir(parents=True, exist_ok=True)
    for stale in ("manifest.json", "images.npy", "labels.npy", *[f"{n}.npy" for n in DENSE_ARRAYS]):
        (entry / stale).unlink(missing_ok=True)
    states = [read_json(path) or {} for path in _progress_files(entry)]
    resume = (
        bool(states)
        and all(s.get("source_digest") == source_digest and s.get("chunk_size") == chunk_size and "done" in s for s in states)
        and (entry / "images.partial.npy").is_file()
    )
    done: set[int] = set()
    failed: dict[str, str] = {}
    if resume:
        for state in states:
            done.update(int(c) for c in state["done"])
            failed.update(state.get("failed", {}))
        try:
            _partial_arrays(entry, n, resize, dense, resume=True)  # opens (checks) and closes them
        except (OSError, ValueError):  # a damaged partial file: start over
            resume = False
    if not resume:
        done, failed = set(), {}
        _partial_arrays(entry, n, resize, dense, resume=False)
    for path in _progress_files(entry):
        path.unlink()
    write_json(entry / "progress.json", {"source_digest": source_digest, "chunk_size": chunk_size,
                                         "done": sorted(done), "failed": failed})  # fmt: skip
    return sorted(done)


def _decode_share(entry: Path, records: Records, resize: ResizeSpec, decoder: Decoder, source_digest: str,
                  chunk_size: int, strict: bool, show: bool, dense: bool, done: list[int], place) -> None:  # fmt: skip
    """Decode this rank's share of the chunks not yet done into the partial arrays.

    The remaining chunks are dealt to the ranks in turn (rank r: the r-th, (r + N)-th, ...); each
    rank records its finished chunks and undecodable rows after every chunk, in ``progress.json``
    for one process and ``progress.rank<r>.json`` otherwise."""
    n = len(records)
    remaining = [c for c in range(-(-n // chunk_size)) if c not in set(done)]
    mine = remaining[place.rank :: place.world_size]
    record = entry / ("progress.json" if place.world_size == 1 else f"progress.rank{place.rank}.json")
    state = read_json(record) if place.world_size == 1 else None
    state = state or {"source_digest": source_digest, "chunk_size": chunk_size, "done": [], "failed": {}}
    arrays = _partial_arrays(entry, n, resize, dense, resume=True)
    share = sum(min(chunk_size, n - c * chunk_size) for c in mine)
    label = f"caching {records.dataset}/{records.split} ({decoder.name})"
    if place.world_size > 1:
        label += f", rank {place.rank}'s share of {place.world_size}"
    bar = Progress(share, label, enabled=show)
    for chunk in mine:
        start, stop = chunk * chunk_size, min((chunk + 1) * chunk_size, n)
        images, errors = decoder.decode(records.paths[start:stop], resize)
        arrays["images"][start:stop] = images
        if dense:
            _load_dense(records.labels[start:stop], resize, arrays, start, errors)
        for offset, error in enumerate(errors):
            if error is not None:
                if strict:
                    raise RuntimeError(f"{records.paths[start + offset]}: cannot decode ({error}); strict=True")
                state["failed"][str(start + offset)] = error
        for array in arrays.values():
            array.flush()
        state["done"].append(chunk)
        write_json(record, state)
        bar.update(stop - start)
    bar.close()
    del arrays


def _load_dense(maps: np.ndarray, resize: ResizeSpec, arrays: dict, start: int, errors: list) -> None:
    """NYUv2 label, depth and normal maps into the dense partial arrays (nearest-neighbour resize)."""
    height, width = resize.size
    for offset, (seg_path, depth_path, normal_path) in enumerate(maps):
        try:
            seg, depth, normal = np.load(seg_path), np.load(depth_path), np.load(normal_path)
            seg = _nearest(np.asarray(seg).reshape(seg.shape[0], seg.shape[1]), height, width)
            depth = _nearest(np.asarray(depth).reshape(depth.shape[0], depth.shape[1], -1), height, width)
            normal = _nearest(np.asarray(normal), height, width)
            if seg.min() < -1 or seg.max() > 12:
                raise ValueError(f"segmentation values {seg.min()}..{seg.max()}, expected -1..12")
            arrays["seg"][start + offset] = np.rint(seg).astype(np.int8)
            arrays["depth"][start + offset] = depth.transpose(2, 0, 1).astype(np.float16)
            arrays["normal"][start + offset] = normal.transpose(2, 0, 1).astype(np.float16)
        except Exception as err:  # unreadable or malformed maps: the sample is skipped
            errors[offset] = errors[offset] or f"label maps: {type(err).__name__}: {err}"


def _nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of an ``[h, w, ...]`` array (labels must not be interpolated)."""
    if array.shape[:2] == (height, width):
        return array
    rows = (np.arange(height) * array.shape[0] // height).clip(0, array.shape[0] - 1)
    cols = (np.arange(width) * array.shape[1] // width).clip(0, array.shape[1] - 1)
    return array[rows][:, cols]


def _finalize(entry: Path, records: Records, manifest: dict, dense: bool) -> None:
    """Drop failed rows, move the arrays into place, write the manifest last."""
    every_failed: dict[str, str] = {}
    for path in _progress_files(entry):
        every_failed.update((read_json(path) or {}).get("failed", {}))
    failed = sorted(int(i) for i in every_failed)
    keep = np.setdiff1d(np.arange(len(records)), np.array(failed, dtype=np.int64))
    names = ["images"] + (list(DENSE_ARRAYS) if dense else [])
    for name in names:
        partial = entry / f"{name}.partial.npy"
        if failed:
            _compact(partial, entry / f"{name}.npy", keep)
            partial.unlink()
        else:
            os.replace(partial, entry / f"{name}.npy")
    if not dense:
        save_npy(entry / "labels.npy", records.labels[keep])
    skipped = records.skipped.to_dict()
    if failed:
        skipped["counts"]["undecodable_images"] = len(failed)
        skipped["examples"]["undecodable_images"] = [
            f"{os.path.relpath(records.paths[i], records.root)} ({every_failed[str(i)]})" for i in failed[:3]
        ]
    row_files = [os.path.relpath(records.paths[i], records.root) for i in keep.tolist()]
    manifest.update(count=int(len(keep)), skipped=skipped, summary=_summary(records, failed), row_files=row_files)
    write_json(entry / "manifest.json", manifest)
    for path in _progress_files(entry):
        path.unlink()


def _compact(source: Path, target: Path, keep: np.ndarray, rows_per_copy: int = 4096) -> None:
    src = np.load(source, mmap_mode="r")
    tmp = target.with_suffix(".compact.npy")
    dst = np.lib.format.open_memmap(tmp, mode="w+", dtype=src.dtype, shape=(len(keep), *src.shape[1:]))
    for start in range(0, len(keep), rows_per_copy):
        dst[start : start + rows_per_copy] = src[keep[start : start + rows_per_copy]]
    dst.flush()
    del dst
    os.replace(tmp, target)


def _summary(records: Records, failed: list[int]) -> str:
    line = records.skipped.summary()
    if failed:
        line += f"; {len(failed)} undecodable image(s), e.g. {os.path.basename(records.paths[failed[0]])}"
    return line


def remove_cache(entry: str | Path) -> None:
    """Delete one cache entry folder (only folders that look like cache entries)."""
    entry = Path(entry)
    if (entry / "manifest.json").is_file() or (entry / "progress.json").is_file():
        shutil.rmtree(entry)
    else:
        raise ValueError(f"{entry} does not look like an mtlue_fast cache entry; not removed")
