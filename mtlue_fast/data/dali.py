"""NVIDIA DALI decoding: ``DaliDecoder`` for the cache builder, ``DaliStream`` for the streaming loader.

Both share one DALI graph (the geometry of ``decode.py``): encoded bytes read with numpy enter
through ``fn.external_source``; the centre crop ``resize.center_crop`` at offsets
``((H-h)//2, (W-w)//2)`` is computed in the graph from ``fn.peek_image_shape`` and handed to
``fn.decoders.image_slice`` (a region-of-interest decode: JPEG decodes only the rows it needs);
``fn.resize`` then resizes linearly with antialiasing to ``resize.size``. Grayscale is decoded with
``output_type=GRAY`` (RGB and RGBA inputs are converted, alpha ignored, as PIL's ``convert("L")``).
EXIF orientation is ignored (``adjust_orientation=False``), as PIL's ``Image.open`` does.

DALI quirks handled here (DALI 2.4, nvImageCodec 0.9):

* one undecodable sample (truncated JPEG, truncated PNG, not an image) fails the whole batch, and the
  pipeline object should not be reused after that error: the batch is redone file by file with a
  fresh pipeline after each failure, and files DALI cannot decode are retried with PIL (so a format
  DALI lacks still decodes; a corrupt file fails there too and is reported);
* nvJPEG (the mixed decoder) may decode a JPEG cut short without an error: JPEGs without an
  end-of-image marker near their end go to PIL instead, which rejects a truncated file; so do
  CMYK and YCCK JPEGs, whose conversion to RGB is PIL's in every decoder;
* a zero-length sample makes ``external_source`` itself fail ("Attempted to peek the data batch that
  doesn't exist"): empty files are rejected before they reach DALI;
* ``fn.peek_image_shape`` reports 3 channels even for grayscale files (only H and W are used).

The pipelines hold no random operators: the stream's crop offsets and flips are drawn in Python from
``(seed, epoch)`` and fed with the images, so an epoch is reproducible whatever the thread count.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import torch

from ..devices import cuda_index
from .decode import PilDecoder, default_threads, error_text, is_gpu_jpeg, looks_like_jpeg, read_batches, read_encoded
from .specs import ResizeSpec


def available() -> bool:
    """Whether NVIDIA DALI can be imported."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception:  # ImportError, or a broken install (missing shared libraries)
        return False
    return True


def _resolve_decoder_device(device: str) -> str:
    if device == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")
    if device == "gpu" and not torch.cuda.is_available():
        raise RuntimeError("DALI GPU decoding requested but torch.cuda.is_available() is False")
    return device


class _RunError(RuntimeError):
    """A DALI run failed on its data (the pipeline itself was built)."""


def _for_dali(blob: np.ndarray) -> bool:
    """Whether DALI is given the file: every format but the JPEGs PIL takes (cut short, which PIL
    rejects, or CMYK/YCCK: :func:`~mtlue_fast.data.decode.is_gpu_jpeg`)."""
    return not (looks_like_jpeg(blob) and not is_gpu_jpeg(blob))


def _decode_graph(encoded: Any, resize: ResizeSpec, decoder_device: str) -> Any:
    """DALI nodes: encoded bytes -> HWC uint8 at ``resize.size`` (centre crop, then linear resize)."""
    from nvidia.dali import fn, types

    if resize.channels not in (1, 3):
        raise ValueError(f"resize.channels must be 1 or 3, got {resize.channels}")
    image_type = types.GRAY if resize.channels == 1 else types.RGB
    if resize.center_crop is not None:
        crop = np.asarray(resize.center_crop, dtype=np.int32)
        # peek_image_shape is (H, W, C) read from the header; the anchor is in (H, W) order (axes 0, 1).
        height_width = fn.peek_image_shape(encoded, dtype=types.INT32, adjust_orientation=False)[0:2]
        anchor = (height_width - types.Constant(crop)) // 2
        image = fn.decoders.image_slice(
            encoded,
            anchor,
            types.Constant(crop),
            axes=[0, 1],
            device=decoder_device,
            output_type=image_type,
            adjust_orientation=False,
        )
    else:
        image = fn.decoders.image(encoded, device=decoder_device, output_type=image_type, adjust_orientation=False)
    return fn.resize(image, size=list(resize.size), interp_type=types.INTERP_LINEAR, antialias=True)


def _to_numpy_nhwc(tensor_list: Any) -> np.ndarray:
    """A uniform DALI TensorList (CPU or GPU) -> numpy ``[n, ...]``; may view DALI's buffer, so use
    it before the pipeline runs again."""
    if hasattr(tensor_list, "as_cpu"):
        tensor_list = tensor_list.as_cpu()
    return np.asarray(tensor_list.as_tensor())


class DaliDecoder:
    """Decode original image files with DALI into uint8 ``[n, C, H, W]`` (the ``decode.py`` contract).

    Args:
        device: ``"auto"`` (GPU decoding, ``device="mixed"``, when CUDA is available, else CPU),
            ``"cpu"`` or ``"gpu"``.
        batch_size: samples per DALI run; ``decode`` splits its paths into runs of this size.
        num_threads: DALI worker threads (default: the usable cores, at most 8).

    One pipeline is built per ``ResizeSpec`` and reused across calls. ``.npy`` images (NYUv2) are
    decoded by ``PilDecoder.decode_one``. ``pil_fallbacks`` counts files DALI failed on that PIL
    then decoded.
    """

    def __init__(self, device: str = "auto", batch_size: int = 64, num_threads: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = _resolve_decoder_device(device)
        self.name = f"dali-{self.device}"
        self.batch_size = batch_size
        self.num_threads = num_threads or default_threads()
        self.pil_fallbacks = 0
        self._pipes: dict[ResizeSpec, Any] = {}

    # -- pipelines ---------------------------------------------------------------------------
    def _build(self, resize: ResizeSpec) -> Any:
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device == "gpu"

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=torch.cuda.current_device() if gpu else None,
            prefetch_queue_depth=1,  # fed and run one batch at a time
        )
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            return _decode_graph(encoded, resize, "mixed" if gpu else "cpu")

        pipe = pipeline()
        pipe.build()
        return pipe

    def _pipe(self, resize: ResizeSpec) -> Any:
        pipe = self._pipes.get(resize)
        if pipe is None:
            pipe = self._pipes[resize] = self._build(resize)
        return pipe

    def _discard(self, resize: ResizeSpec) -> None:
        """Drop a pipeline that raised: DALI marks it invalid after an error."""
        self._pipes.pop(resize, None)

    def _run(self, resize: ResizeSpec, blobs: list[np.ndarray]) -> np.ndarray:
        pipe = self._pipe(resize)  # a failure to build is a bug, not a bad file: it propagates
        try:
            pipe.feed_input("encoded", blobs)
            (images,) = pipe.run()
            return _to_numpy_nhwc(images)
        except Exception as err:
            self._discard(resize)
            raise _RunError(str(err)) from err

    # -- the contract ------------------------------------------------------------------------
    def decode(self, paths: list[str], resize: ResizeSpec) -> tuple[np.ndarray, list[str | None]]:
        height, width = resize.size
        out = np.zeros((len(paths), resize.channels, height, width), dtype=np.uint8)
        errors: list[str | None] = [None] * len(paths)
        # One thread reads the next batch's files while DALI decodes the current one.
        with ThreadPoolExecutor(max_workers=1) as reader:
            for batch in read_batches(paths, self.batch_size, _for_dali, reader):
                for i, why in batch.errors.items():
                    errors[i] = why
                if batch.device:
                    self._decode_batch(batch.device, batch.blobs, paths, resize, out, errors)
                for i in batch.host:
                    self._decode_with_pil(i, paths, resize, out, errors)
        return out, errors

    def _decode_batch(self, index, blobs, paths, resize, out, errors) -> None:
        try:
            out[index] = self._run(resize, blobs).transpose(0, 3, 1, 2)
            return
        except _RunError:
            pass
        # One bad sample fails the batch: redo it file by file (fresh pipeline after each failure).
        for i, blob in zip(index, blobs):
            try:
                out[i] = self._run(resize, [blob])[0].transpose(2, 0, 1)
            except _RunError:
                self._decode_with_pil(i, paths, resize, out, errors, counts_as_fallback=True)

    def _decode_with_pil(self, i, paths, resize, out, errors, counts_as_fallback: bool = False) -> None:
        try:
            out[i] = PilDecoder.decode_one(paths[i], resize)
        except Exception as err:
            errors[i] = error_text(err)
            return
        if counts_as_fallback:
            self.pil_fallbacks += 1


class DaliStream:
    """Batches ``(images, labels)`` decoded with DALI straight from the original files of ``records``.

    ``images`` is uint8 ``[B, C, h, w]`` and ``labels`` int64 ``[B, K]``, both on ``device``. Each
    image is decoded, centre-cropped and resized as by ``DaliDecoder``, then: with ``train=True`` a
    random ``crop`` (uniform position) and a horizontal flip with probability 0.5; with
    ``train=False`` the centre ``crop`` (offsets ``((H-h)//2, (W-w)//2)``); ``crop=None`` keeps the
    whole image (train mode still flips).

    Sampling: a permutation of the N samples seeded by ``(seed, epoch)`` (identity without
    ``shuffle``); rank ``rank`` takes every ``world_size``-th entry. Without ``drop_last`` the
    permutation is padded by wrapping around so every rank has ``ceil(N / world_size)`` samples and
    the last batch may be short; with ``drop_last`` it is truncated to ``floor(N / world_size)`` per
    rank and an incomplete last batch is dropped. Crop offsets and flips are drawn from
    ``(seed, epoch)`` per position of the padded permutation, so an epoch is reproducible.

    A file that cannot be decoded (by DALI, nor then by PIL) is skipped, never replaced: its batch
    is one sample shorter. ``skipped`` counts the skips; the path is remembered in ``bad_paths`` and
    left out of later batches (and counted again each time). Files DALI fails on but PIL decodes are
    decoded with PIL (same crop and flip) and counted in ``pil_fallbacks``.

    With a CUDA ``device`` decoding runs on that GPU (``device="mixed"``); otherwise on the CPU.
    Up to ``prefetch`` batches are decoded ahead of the one being consumed. Labels come from
    ``records.labels`` by index; dense (NYUv2) labels and ``.npy`` images are not supported.
    """

    def __init__(
        self,
        records,
        resize: ResizeSpec,
        batch_size: int,
        device: torch.device | str,
        *,
        crop: tuple[int, int] | None,
        train: bool,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        num_threads: int | None = None,
        prefetch: int = 2,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        labels = np.asarray(records.labels)
        if labels.dtype == object:
            raise ValueError(f"{records.dataset}: DaliStream needs class labels; dense (NYUv2) ones use the cache")
        if any(path.endswith(".npy") for path in records.paths):
            raise ValueError(f"{records.dataset}: DaliStream decodes image files; .npy images go through the cache")
        if crop is not None:
            crop = (int(crop[0]), int(crop[1]))
            if crop[0] > resize.size[0] or crop[1] > resize.size[1]:
                raise ValueError(f"crop {crop} is larger than the resized image {resize.size}")
        self.paths = list(records.paths)
        self.labels = labels.astype(np.int64)
        self.resize = resize
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.crop = crop
        self.train = train
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.num_threads = num_threads or default_threads()
        self.prefetch = max(1, prefetch)
        self.epoch = 0
        self.skipped = 0
        self.pil_fallbacks = 0
        self.bad_paths: set[str] = set()
        n = len(self.paths)
        self.num_samples = n // world_size if drop_last else math.ceil(n / world_size)
        if self.num_samples == 0:
            raise ValueError(f"{n} samples cannot fill {world_size} ranks with drop_last=True")
        self._total = self.num_samples * world_size
        self._gpu = self.device.type == "cuda"
        if self._gpu and not torch.cuda.is_available():
            raise RuntimeError(f"device {self.device} requested but CUDA is not available")
        self._pipe: Any = None

    # -- sampling ----------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def epoch_plan(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's ``(indices, offsets [n, 2] (top, left) at the resized size, flips [n])``."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.paths)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            order = np.arange(n)
        order = np.resize(order, self._total)  # wraps around (padding) or truncates (drop_last)
        height, width = self.resize.size
        offsets = np.zeros((self._total, 2), dtype=np.int64)
        flips = np.zeros(self._total, dtype=np.int32)
        if self.crop is not None:
            room = (height - self.crop[0], width - self.crop[1])
            if self.train:
                aug = np.random.default_rng([self.seed, epoch, 1])
                offsets[:, 0] = aug.integers(0, room[0] + 1, self._total)
                offsets[:, 1] = aug.integers(0, room[1] + 1, self._total)
            else:
                offsets[:] = (room[0] // 2, room[1] // 2)
        if self.train:
            flips[:] = np.random.default_rng([self.seed, epoch, 2]).integers(0, 2, self._total)
        mine = slice(self.rank, None, self.world_size)
        return order[mine], offsets[mine], flips[mine]

    # -- pipeline ----------------------------------------------------------------------------
    def _input_names(self) -> tuple[str, ...]:
        return ("encoded", "mirror") + (("pos_y", "pos_x") if self.crop is not None else ())

    def _build(self) -> Any:
        from nvidia.dali import fn, pipeline_def, types

        gpu = self._gpu
        device_id = None
        if gpu:
            device_id = cuda_index(self.device)

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=device_id,
            # Depth 1: the first schedule_run of a deeper queue runs `depth` iterations at once and
            # fails unless that many batches were fed. Read-ahead comes from keeping up to
            # `prefetch` scheduled runs in flight (the dynamic executor runs them in the background).
            prefetch_queue_depth=1,
            exec_dynamic=True,
        )
        def pipeline():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            mirror = fn.external_source(name="mirror", dtype=types.INT32, ndim=0)
            image = _decode_graph(encoded, self.resize, "mixed" if gpu else "cpu")
            crop_args = {}
            if self.crop is not None:
                # External sources must all be used (DALI prunes unused ones, then feeding them fails).
                pos_y = fn.external_source(name="pos_y", dtype=types.FLOAT, ndim=0)
                pos_x = fn.external_source(name="pos_x", dtype=types.FLOAT, ndim=0)
                crop_args = dict(crop=list(self.crop), crop_pos_y=pos_y, crop_pos_x=pos_x)
            # mean 0 / std 1 / uint8 output: a pure crop + flip + HWC->CHW, values unchanged.
            return fn.crop_mirror_normalize(
                image, mirror=mirror, dtype=types.UINT8, output_layout="CHW", mean=[0.0], std=[1.0], **crop_args
            )

        pipe = pipeline()
        pipe.build()
        return pipe

    def _relative_positions(self, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Integer (top, left) -> crop_pos in [0, 1]; DALI's anchor round(pos * room) gives them back."""
        height, width = self.resize.size
        room_y, room_x = height - self.crop[0], width - self.crop[1]
        pos_y = offsets[:, 0] / room_y if room_y > 0 else np.full(len(offsets), 0.5)
        pos_x = offsets[:, 1] / room_x if room_x > 0 else np.full(len(offsets), 0.5)
        return pos_y.astype(np.float32), pos_x.astype(np.float32)

    def _prepare(self, index: np.ndarray, offsets: np.ndarray, flips: np.ndarray) -> dict:
        """Read one batch's files and its DALI inputs; empty/unreadable/known-bad files are skipped."""
        keep, blobs = [], []
        for j, i in enumerate(index):
            path = self.paths[i]
            if path in self.bad_paths:
                self.skipped += 1
                continue
            try:
                blobs.append(read_encoded(path))
            except Exception:
                self._mark_bad(path)
                continue
            keep.append(j)
        batch = {
            "index": index[keep],
            "offsets": offsets[keep],
            "flips": flips[keep],
            "encoded": blobs,
            "mirror": [np.asarray(f, dtype=np.int32) for f in flips[keep]],
        }
        if self.crop is not None:
            pos_y, pos_x = self._relative_positions(offsets[keep])
            batch["pos_y"], batch["pos_x"] = list(pos_y), list(pos_x)
        return batch

    def _mark_bad(self, path: str) -> None:
        self.bad_paths.add(path)
        self.skipped += 1

    def _feed(self, pipe: Any, batch: dict, select: list[int] | None = None) -> None:
        for name in self._input_names():
            values = batch[name] if select is None else [batch[name][k] for k in select]
            pipe.feed_input(name, values)

    def _images_to_torch(self, tensor_list: Any) -> torch.Tensor:
        if self._gpu:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            dense = tensor_list.as_tensor()
            images = torch.empty(tuple(dense.shape()), dtype=torch.uint8, device=self.device)
            feed_ndarray(dense, images, cuda_stream=torch.cuda.current_stream(self.device))
            return images
        return torch.from_numpy(np.array(tensor_list.as_tensor()))

    def _finish(self, batch: dict, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.from_numpy(self.labels[batch["index"]])
        return images, labels.to(self.device, non_blocking=True)

    def _run_sync(self, batch: dict, select: list[int] | None = None) -> torch.Tensor:
        if self._pipe is None:
            self._pipe = self._build()
        try:
            self._feed(self._pipe, batch, select)
            (out,) = self._pipe.run()
            return self._images_to_torch(out)
        except Exception:
            self._pipe = None  # DALI marks a pipeline invalid after an error
            raise

    def _decode_with_pil(self, batch: dict, k: int) -> torch.Tensor:
        """One sample the DALI way, but with PIL: decode, then the batch's crop and flip."""
        image = PilDecoder.decode_one(self.paths[batch["index"][k]], self.resize)
        if self.crop is not None:
            top, left = batch["offsets"][k]
            image = image[:, top : top + self.crop[0], left : left + self.crop[1]]
        if batch["flips"][k]:
            image = image[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(image)).to(self.device)

    def _decode_sync(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Decode a batch with ``run()``; if that fails, sample by sample: a sample DALI fails on is
        retried with PIL (counted in ``pil_fallbacks``) and skipped if PIL fails too."""
        try:
            return self._finish(batch, self._run_sync(batch))
        except Exception:
            pass
        kept, images = [], []
        for k in range(len(batch["index"])):
            try:
                images.append(self._run_sync(batch, [k])[0])
            except Exception:
                try:
                    images.append(self._decode_with_pil(batch, k))
                except Exception:
                    self._mark_bad(self.paths[batch["index"][k]])
                    continue
                self.pil_fallbacks += 1
            kept.append(k)
        if not kept:
            return None
        return self._finish({"index": batch["index"][kept]}, torch.stack(images))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index, offsets, flips = self.epoch_plan()
        stop = min(len(self) * self.batch_size, len(index))
        todo = deque(
            (index[s:e], offsets[s:e], flips[s:e])
            for s, e in ((s, min(s + self.batch_size, stop)) for s in range(0, stop, self.batch_size))
        )
        # Batches are decoded ahead with schedule_run/outputs; a pipeline used that way must not also
        # be used with run(), so the recovery path (_run_sync) keeps its own.
        self._pipe = None
        pipe = self._build()
        inflight: deque[dict] = deque()
        while inflight or todo:
            try:
                while todo and len(inflight) < self.prefetch:
                    batch = self._prepare(*todo.popleft())
                    if not batch["encoded"]:
                        continue
                    inflight.append(batch)
                    self._feed(pipe, batch)
                    pipe.schedule_run()
                if not inflight:
                    continue
                (out,) = pipe.outputs()
                result = self._finish(inflight[0], self._images_to_torch(out))
                inflight.popleft()
            except Exception:
                # A sample failed and the pipeline is no longer valid; which in-flight batch failed
                # is not certain, so redo each synchronously, then go on with a fresh pipeline.
                for batch in list(inflight):
                    recovered = self._decode_sync(batch)
                    if recovered is not None:
                        yield recovered
                inflight.clear()
                pipe = self._build()
                continue
            yield result
