"""Device-side batches from a uint8 cache: seeded shuffling, sharding, per-sample crop and flip.

``DeviceBatches`` yields ``(images, labels)``: uint8 ``[B, C, h, w]`` and int64 ``[B, K]`` on the
requested device (NYUv2: ``labels`` is a dict of dense maps cropped and flipped with the image).
Where the data lives:

- device ``cuda``, fits on the GPU (``resident="auto"``): the whole uint8 array is copied to the GPU
  once; a batch is one gather that also crops and flips each sample.
- device ``cuda``, too large: a background thread gathers each batch from the memory map into
  pinned host memory and copies it asynchronously on a side stream, one batch ahead (double
  buffering); the crop and flip then run on the GPU.
- device ``cpu``: each sample's window is copied straight from the memory map (numpy slicing, the
  fastest path on a CPU).

Order: epoch e uses the permutation ``default_rng([seed, e])``; rank r of w takes every w-th index
(the permutation is padded by wrapping so that all ranks see the same count, unless ``drop_last``
or ``pad=False``: an evaluation shard, where each sample is on exactly one rank).
Crop offsets and flips come from ``default_rng([seed, e, 1])`` over the whole permutation, so
results do not depend on the device or on the world size's effect on batching.
"""

from __future__ import annotations

import copy
import queue
import threading
import warnings
import weakref
from collections.abc import Iterator

import numpy as np
import torch

from ..devices import cuda_index
from .cache import Cache


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A copy of ``array`` (often a read-only cache memmap) on ``device``. The host tensor is only read
    by the copy, so torch's warning about wrapping a non-writable array does not apply; a writable
    host copy first would double the host memory of a large dataset."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(array)).to(device)

NYUV2_SCALES = (1.0, 1.2, 1.5)
RESIDENT_FRACTION = 0.5  # of free GPU memory the resident datasets not yet copied may take together (resident="auto")
#: Resident ``DeviceBatches`` whose device copy is not made yet (it is made at the first
#: iteration): what they will take counts against the free memory the next one may use.
_PROMISED: weakref.WeakSet = weakref.WeakSet()


class _DeviceCopy:
    """The arrays' copy on the GPU (``(images, labels)``, made at the first iteration), shared by
    the loaders over the same arrays (:meth:`DeviceBatches.reseeded`)."""

    __slots__ = ("data",)

    def __init__(self) -> None:
        self.data: tuple[torch.Tensor, torch.Tensor | dict[str, torch.Tensor]] | None = None


class DeviceBatches:
    """Iterate over a cache in batches on a device.

    Args:
        images: uint8 ``[N, C, H, W]`` (a memory map is fine).
        labels: int64 ``[N, K]``, or a dict of dense maps ``[N, H, W]`` / ``[N, c, H, W]`` (NYUv2) that
            are cropped and flipped together with the image (``normal``'s x component changes sign).
        batch_size: samples per batch on this rank.
        device: where batches are delivered.
        crop: ``(h, w)`` window; None keeps the full image.
        train: random window position and horizontal flip (p = 0.5) per sample; otherwise the
            centre window and no flip.
        shuffle: permute each epoch (default: ``train``).
        seed: base seed of the permutation and augmentation.
        drop_last: drop a final incomplete batch (and the ranks' padding).
        rank, world_size: this process's shard.
        pad: without ``drop_last``, wrap the permutation so that every rank delivers as many
            samples (training: the ranks' steps stay in lockstep; up to ``world_size - 1`` samples
            are then seen twice per epoch). False makes an evaluation shard: rank r takes
            positions r, r + w, r + 2w, ... of the N samples, so each sample is on exactly one
            rank and the ranks' counts differ by at most one (a rank may have none). No effect
            with ``drop_last`` (which never pads) or one process.
        resident: ``"auto"``, True or False: keep the whole array on the GPU.
        with_indices: yield ``(images, labels, indices)`` with the dataset indices of the batch.
        scales: random-scale crop after the window (train only; NYUv2's augmentation): each sample
            draws a scale s from ``scales``, a window of size (h/s, w/s) at a uniform position is
            resized back to (h, w) (image bilinear; maps nearest, depth divided by s). Default None
            (off); :meth:`from_cache` turns it on with (1.0, 1.2, 1.5) for NYUv2.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray | dict[str, np.ndarray],
        batch_size: int,
        device: torch.device | str = "cpu",
        *,
        crop: tuple[int, int] | None = None,
        train: bool = True,
        shuffle: bool | None = None,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        resident: str | bool = "auto",
        with_indices: bool = False,
        scales: tuple[float, ...] | None = None,
        pad: bool = True,
    ) -> None:
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N,C,H,W], got {images.dtype} {images.shape}")
        n, _, height, width = images.shape
        dense = isinstance(labels, dict)
        label_rows = {len(v) for v in labels.values()} if dense else {len(labels)}
        if label_rows != {n}:
            raise ValueError(f"labels must have {n} rows like images, got {sorted(label_rows)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.crop = tuple(crop) if crop is not None else (height, width)
        if not (0 < self.crop[0] <= height and 0 < self.crop[1] <= width):
            raise ValueError(f"crop {crop} must fit the {height}x{width} images")
        self.images, self.labels, self.dense = images, labels, dense
        self.batch_size, self.device = batch_size, torch.device(device)
        self.train = train
        self.shuffle = train if shuffle is None else shuffle
        self.seed, self.drop_last, self.rank, self.world_size = seed, drop_last, rank, world_size
        self.pad = bool(pad)
        self.with_indices = with_indices
        if scales is not None and (not scales or min(scales) < 1.0):
            raise ValueError(f"scales must be a non-empty sequence of values >= 1, got {scales}")
        self.scales = tuple(scales) if scales is not None and train else None
        self.epoch = 0
        self._device_copy = _DeviceCopy()
        self.resident = self.device.type == "cuda" and (resident is True or (resident == "auto" and self._fits_on_gpu()))
        if self.resident:
            _PROMISED.add(self)

    @classmethod
    def from_cache(cls, cache: Cache, batch_size: int, device: torch.device | str = "cpu", **kwargs) -> DeviceBatches:
        if cache.manifest.get("dataset") == "nyuv2":
            kwargs.setdefault("scales", NYUV2_SCALES)
        return cls(cache.images, cache.labels, batch_size, device, **kwargs)

    def reseeded(self, seed: int) -> DeviceBatches:
        """The same loader with another order and augmentation seed, from its first epoch, sharing
        this one's copy of the data on the GPU (two loaders over one dataset: one copy)."""
        twin = copy.copy(self)  # shallow: the arrays and the device copy are shared
        twin.seed, twin.epoch = seed, 0
        return twin

    # ------------------------------------------------------------------ order and windows

    @property
    def num_samples(self) -> int:
        """Samples this rank delivers per epoch."""
        n = len(self.images)
        if not (self.pad or self.drop_last):
            return len(range(self.rank, n, self.world_size))
        per_rank = n // self.world_size if self.drop_last else -(-n // self.world_size)
        return per_rank - per_rank % self.batch_size if self.drop_last else per_rank

    def __len__(self) -> int:
        return self.num_samples // self.batch_size if self.drop_last else -(-self.num_samples // self.batch_size)

    def _span(self) -> int:
        """Positions of the (wrapped) permutation that the ranks share out, every w-th to each."""
        return self.num_samples * self.world_size if self.pad or self.drop_last else len(self.images)

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s order next (iteration otherwise advances the epoch by one each time)."""
        self.epoch = epoch

    def epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """This rank's (indices, tops, lefts, flips) for ``epoch``, each ``[num_samples]``."""
        n, _, height, width = self.images.shape
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        total = self._span()
        if total > n:
            order = np.concatenate([order, order[: total - n]])  # wrap so every rank has as many
        h, w = self.crop
        if self.train:
            aug = np.random.default_rng([self.seed, epoch, 1])
            tops = aug.integers(0, height - h + 1, len(order))
            lefts = aug.integers(0, width - w + 1, len(order))
            flips = aug.random(len(order)) < 0.5
        else:
            tops = np.full(len(order), (height - h) // 2)
            lefts = np.full(len(order), (width - w) // 2)
            flips = np.zeros(len(order), dtype=bool)
        shard = slice(self.rank, total, self.world_size)
        return order[shard][: self.num_samples], tops[shard][: self.num_samples], lefts[shard][: self.num_samples], flips[shard][: self.num_samples]

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[tuple]:
        epoch = self.epoch
        self.epoch += 1
        plan = self.epoch_plan(epoch)
        starts = range(0, self.num_samples, self.batch_size)
        batches = [tuple(part[s : s + self.batch_size] for part in plan) for s in starts]
        batches = [b for b in batches if len(b[0]) == self.batch_size or not self.drop_last]
        scale_plan = self.scale_plan(epoch)
        if self.device.type == "cpu":
            outputs = (self._host_windows(*b) + (b[0],) for b in batches)
        else:
            # The epoch's whole plan goes to the device in one asynchronous copy; each batch then
            # slices it there, so no batch waits on a host-to-device copy of its indices or windows.
            on_device = _plan_on_device(plan, self.device)
            if scale_plan is not None:
                scale_plan = tuple(_pinned(torch.from_numpy(np.asarray(p, dtype=np.float32))).to(self.device, non_blocking=True) for p in scale_plan)
            device_batches = [(b, on_device[:, s : s + len(b[0])]) for b, s in zip(batches, starts)]
            outputs = (self._device_batch(*b) for b in device_batches) if self.resident else self._streamed(device_batches)
        for start, (images, labels, indices) in zip(starts, outputs):
            if scale_plan is not None:
                images, labels = random_scale_crop(images, labels, *(p[start : start + len(images)] for p in scale_plan))
            yield self._finish(images, labels, indices)

    def scale_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """This rank's (scale, relative top, relative left) per sample for ``epoch``, or None."""
        if self.scales is None:
            return None
        total = self._span()
        rng = np.random.default_rng([self.seed, epoch, 2])
        scale = np.asarray(self.scales)[rng.integers(0, len(self.scales), total)]
        rel_top, rel_left = rng.random(total), rng.random(total)
        shard = slice(self.rank, total, self.world_size)
        return scale[shard], rel_top[shard], rel_left[shard]

    def _finish(self, images, labels, indices):
        if not isinstance(indices, torch.Tensor):
            indices = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return (images, labels, indices) if self.with_indices else (images, labels)

    def _host_windows(self, idx, tops, lefts, flips):
        """CPU path: copy each sample's window (flipped where asked) out of the memory map."""
        h, w = self.crop
        images = np.empty((len(idx), self.images.shape[1], h, w), dtype=np.uint8)
        dense_out = {k: np.empty((len(idx), *v.shape[1:-2], h, w), dtype=v.dtype) for k, v in self.labels.items()} if self.dense else {}
        for row, (i, top, left, flip) in enumerate(zip(idx.tolist(), tops.tolist(), lefts.tolist(), flips.tolist())):
            cols = slice(left + w - 1, left - 1 if left > 0 else None, -1) if flip else slice(left, left + w)
            images[row] = self.images[i, :, top : top + h, cols]
            for name, maps in dense_out.items():
                maps[row] = self.labels[name][i, ..., top : top + h, cols]
        if self.dense:
            labels = {k: torch.from_numpy(v) for k, v in dense_out.items()}
            _negate_flipped_normals(labels, torch.from_numpy(flips))
        else:
            labels = torch.from_numpy(np.asarray(self.labels[idx], dtype=np.int64))
        return torch.from_numpy(images), labels

    def _on_device(self):
        if self._device_copy.data is None:
            images = _to_device(self.images, self.device)
            if self.dense:
                labels = {k: _to_device(v, self.device) for k, v in self.labels.items()}
            else:
                labels = torch.from_numpy(np.asarray(self.labels, dtype=np.int64)).to(self.device)
            self._device_copy.data = (images, labels)
        return self._device_copy.data

    def _device_batch(self, batch, plan):
        """GPU-resident path: one gather per array (batch selection, crop and flip together).
        ``plan``: this batch's ``[4, B]`` slice of the epoch's device plan (index, top, left, flip)."""
        images, labels = self._on_device()
        index, windows = plan[0], self._windows(plan)
        out_labels = (
            {k: window_gather(v, index, *windows) for k, v in labels.items()} if self.dense else labels[index]
        )
        if self.dense:
            _negate_flipped_normals(out_labels, windows[2])
        return window_gather(images, index, *windows), out_labels, index

    def _windows(self, plan: torch.Tensor):
        return plan[1], plan[2], plan[3].bool(), self.crop

    def _streamed(self, batches):
        """Pinned host gather in a background thread, async copy on a side stream, crop on the GPU."""
        stream = torch.cuda.Stream(self.device)
        ready: queue.Queue = queue.Queue(maxsize=2)  # double buffering
        stop = threading.Event()

        def produce():
            try:
                for (idx, _tops, _lefts, _flips), plan in batches:
                    if stop.is_set():
                        return
                    order = np.argsort(idx)  # sorted reads from the memory map, restored below
                    images = torch.from_numpy(self.images[idx[order]]).pin_memory()
                    if self.dense:
                        labels = {k: torch.from_numpy(np.asarray(v[idx[order]])).pin_memory() for k, v in self.labels.items()}
                    else:
                        labels = torch.from_numpy(np.asarray(self.labels[idx[order]], dtype=np.int64)).pin_memory()
                    restore = torch.from_numpy(np.argsort(order)).pin_memory()
                    ready.put((images, labels, restore, plan))
            except BaseException as err:  # surfaced in the consumer
                ready.put(err)
            ready.put(None)

        worker = threading.Thread(target=produce, daemon=True)
        worker.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                images, labels, restore, plan = item
                with torch.cuda.stream(stream):
                    images_dev = images.to(self.device, non_blocking=True)
                    labels_dev = {k: v.to(self.device, non_blocking=True) for k, v in labels.items()} if self.dense else labels.to(self.device, non_blocking=True)
                    position = restore.to(self.device, non_blocking=True)
                current = torch.cuda.current_stream(self.device)
                current.wait_stream(stream)
                for t in (images_dev, position, *(labels_dev.values() if self.dense else (labels_dev,))):
                    t.record_stream(current)  # made on the side stream, used on this one
                windows = self._windows(plan)
                out_images = window_gather(images_dev, position, *windows)
                if self.dense:
                    out_labels = {k: window_gather(v, position, *windows) for k, v in labels_dev.items()}
                    _negate_flipped_normals(out_labels, windows[2])
                else:
                    out_labels = labels_dev[position]
                yield out_images, out_labels, plan[0]
        finally:
            stop.set()

    def _nbytes(self) -> int:
        """Bytes of the images and labels on the device when resident."""
        label_bytes = sum(v.nbytes for v in self.labels.values()) if self.dense else self.labels.nbytes
        return self.images.nbytes + label_bytes

    def _fits_on_gpu(self) -> bool:
        """Whether this dataset, with the resident ones not copied yet (a training and a test set are
        made before either iterates), takes at most :data:`RESIDENT_FRACTION` of the free memory.
        Free: the device's, plus what PyTorch's allocator holds cached but unused (earlier stages'
        freed tensors), which this process can use and ``mem_get_info`` does not count."""
        free, _total = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        index = cuda_index(self.device)
        promised = sum(b._nbytes() for b in list(_PROMISED) if b._device_copy.data is None and cuda_index(b.device) == index)
        return self._nbytes() + promised <= RESIDENT_FRACTION * free


def _pinned(t: torch.Tensor) -> torch.Tensor:
    """``t`` in page-locked memory (what makes a host-to-device copy asynchronous), when CUDA is up."""
    return t.pin_memory() if torch.cuda.is_available() else t


def _plan_on_device(plan: tuple[np.ndarray, ...], device: torch.device) -> torch.Tensor:
    """An epoch's ``(indices, tops, lefts, flips)`` as one int64 ``[4, num_samples]`` tensor on
    ``device``, copied asynchronously from pinned memory."""
    stacked = np.stack([np.asarray(part, dtype=np.int64) for part in plan])
    return _pinned(torch.from_numpy(stacked)).to(device, non_blocking=True)


def to_unit_float(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float32 in [0, 1] (times 1/255, as the fused ops scale), optionally
    in channels-last memory format."""
    from ..ops.reference import UINT8_SCALE

    x = images.to(torch.float32).mul_(UINT8_SCALE)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def window_gather(
    data: torch.Tensor,
    index: torch.Tensor,
    tops: torch.Tensor,
    lefts: torch.Tensor,
    flips: torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    """``data[index[b], ..., tops[b]:tops[b]+h, cols_b]`` for every b in one gather (any dtype).

    ``data`` is ``[N, ..., H, W]``; ``cols_b`` runs right to left where ``flips[b]``. Returns
    ``[B, ..., h, w]``, contiguous.
    """
    h, w = size
    batch = index.shape[0]
    j = torch.arange(w, device=data.device)
    rows = tops[:, None] + torch.arange(h, device=data.device)  # [B, h]
    cols = lefts[:, None] + torch.where(flips[:, None], w - 1 - j, j)  # [B, w]
    middle = data.shape[1:-2]
    view = data.reshape(data.shape[0], -1, *data.shape[-2:])  # [N, M, H, W]
    m = torch.arange(view.shape[1], device=data.device)
    out = view[index[:, None, None, None], m[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]
    return out.reshape(batch, *middle, h, w)


def random_scale_crop(
    images: torch.Tensor,
    labels: torch.Tensor | dict[str, torch.Tensor],
    scales: np.ndarray,
    rel_tops: np.ndarray,
    rel_lefts: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor | dict[str, torch.Tensor]]:
    """Per sample, the window of size (H/s, W/s) at (rel_top, rel_left) of the free range, resized
    back to (H, W): images bilinear (uint8 kept), dense maps nearest, depth divided by s (things
    look closer). Class labels pass through unchanged. Shapes: images ``[B, C, H, W]``.
    """
    import torch.nn.functional as F

    batch, _, height, width = images.shape
    device = images.device
    s = torch.as_tensor(scales, dtype=torch.float32, device=device)
    # Window centre in normalised [-1, 1] coordinates; the window spans 2/s of that range.
    centre_y = (1 - 1 / s) * (2 * torch.as_tensor(rel_tops, dtype=torch.float32, device=device) - 1)
    centre_x = (1 - 1 / s) * (2 * torch.as_tensor(rel_lefts, dtype=torch.float32, device=device) - 1)
    theta = torch.zeros(batch, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2] = 1 / s, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = 1 / s, centre_y
    grid = F.affine_grid(theta, [batch, 1, height, width], align_corners=False)

    def sample(t: torch.Tensor, mode: str) -> torch.Tensor:
        flat = t.reshape(batch, -1, *t.shape[-2:]).float()
        out = F.grid_sample(flat, grid, mode=mode, padding_mode="border", align_corners=False)
        return out.reshape(batch, *t.shape[1:-2], height, width)

    out_images = sample(images, "bilinear").round_().clamp_(0, 255).to(torch.uint8)
    if not isinstance(labels, dict):
        return out_images, labels
    out_labels = {name: sample(m, "nearest").to(m.dtype) for name, m in labels.items()}
    if "depth" in out_labels:
        out_labels["depth"] = (out_labels["depth"].float() / s.view(-1, 1, 1, 1)).to(labels["depth"].dtype)
    return out_images, out_labels


def _negate_flipped_normals(labels: dict[str, torch.Tensor], flips: torch.Tensor) -> None:
    """A horizontal flip mirrors surface normals: their x component changes sign."""
    normal = labels.get("normal")
    if normal is not None:
        sign = torch.where(flips.to(normal.device), -1.0, 1.0).to(normal.dtype)
        normal[:, 0] *= sign[:, None, None]
