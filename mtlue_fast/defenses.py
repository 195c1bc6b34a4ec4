"""Victim-side defences against unlearnable examples (docs/method.md: the five defences).

A victim who suspects its training data is poisoned can transform it. Two kinds:

* data-level (``jpeg``, ``bdr``, ``grayscale``): applied once to the uint8 training cache by
  :func:`defend_cache`, which writes a new cache folder that :func:`mtlue_fast.data.open_cache`
  opens and the training loop reads like any other cache;
* training-time (``augment``, ``adv``): applied to every float batch on the device, before the
  forward pass, by the object :func:`batch_defense` returns.

``none`` is the undefended victim. The test data is never defended.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data.cache import Cache, open_cache
from .fileio import file_lock, read_json, write_json
from .progress import Progress

DEFENSES = ("none", "jpeg", "bdr", "grayscale", "augment", "adv")
DATA_DEFENSES = ("jpeg", "bdr", "grayscale")
BATCH_DEFENSES = ("augment", "adv")

JPEG_QUALITY = 10
BDR_BITS = 2
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert("L")


def check_defense(name: str) -> str:
    """``name`` if it is one of :data:`DEFENSES`, else ValueError listing the valid names."""
    if not isinstance(name, str) or name not in DEFENSES:
        raise ValueError(f"defense must be one of {', '.join(DEFENSES)}; got {name!r}")
    return name


# ============================================================================ data-level defences


def jpeg_compress(images: np.ndarray, quality: int = JPEG_QUALITY, workers: int = 1) -> np.ndarray:
    """Re-encode each image as JPEG at ``quality`` with Pillow and decode it back.

    Args:
        images: uint8 ``[n, C, H, W]`` with C = 1 (encoded as grayscale) or 3 (RGB).
        quality: Pillow JPEG quality 1..95.
        workers: encoding threads (Pillow releases the GIL while coding).

    Returns:
        uint8 ``[n, C, H, W]``.
    """
    _check_uint8_images(images, "images")
    if images.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels for JPEG, got {images.shape[1]}")
    if not 1 <= int(quality) <= 95:
        raise ValueError(f"quality must be in 1..95, got {quality}")
    out = np.empty_like(images)

    def one(i: int) -> None:
        out[i] = _jpeg_roundtrip(np.asarray(images[i]), int(quality))

    if workers > 1 and len(images) > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(len(images))))
    else:
        for i in range(len(images)):
            one(i)
    return out


def _jpeg_roundtrip(image: np.ndarray, quality: int) -> np.ndarray:
    """One uint8 ``[C, H, W]`` image through a JPEG encode/decode -> uint8 ``[C, H, W]``."""
    from PIL import Image

    pil = Image.fromarray(image[0], "L") if image.shape[0] == 1 else Image.fromarray(image.transpose(1, 2, 0), "RGB")
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        array = np.asarray(decoded.convert(pil.mode))
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def reduce_bit_depth(images: np.ndarray, bits: int = BDR_BITS) -> np.ndarray:
    """Bit-depth reduction: ``round(x / 255 * L) / L * 255`` with ``L = 2**bits - 1`` levels above 0.

    Args:
        images: uint8 array of any shape (e.g. ``[n, C, H, W]``).
        bits: bits kept per channel, 1..8 (2 gives the values 0, 85, 170, 255).

    Returns:
        uint8 array of the same shape.
    """
    _check_uint8_images(images, "images", ndim=None)
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    levels = 2 ** int(bits) - 1
    table = np.rint(np.rint(np.arange(256) / 255.0 * levels) / levels * 255.0).astype(np.uint8)
    return table[images]


def to_grayscale(images: np.ndarray) -> np.ndarray:
    """RGB -> luminance ``0.299 R + 0.587 G + 0.114 B`` (rounded), replicated to 3 channels.

    Args:
        images: uint8 ``[n, 3, H, W]``.

    Returns:
        uint8 ``[n, 3, H, W]`` with three equal channels (the model's input shape is kept).
    """
    _check_uint8_images(images, "images")
    if images.shape[1] != 3:
        raise ValueError(
            f"the grayscale defence needs RGB images (3 channels), got {images.shape[1]}: "
            "on 1-channel data it is a no-op"
        )
    luma = np.einsum("c,nchw->nhw", np.asarray(LUMA, dtype=np.float32), images.astype(np.float32))
    gray = np.clip(np.rint(luma), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, None], 3, axis=1)


def _check_uint8_images(images: np.ndarray, arg: str, ndim: int | None = 4) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise TypeError(f"{arg} must be a uint8 numpy array, got {type(images).__name__} {getattr(images, 'dtype', '')}")
    if ndim is not None and images.ndim != ndim:
        raise ValueError(f"{arg} must be [n, C, H, W], got shape {tuple(images.shape)}")


def defend_cache(
    name: str,
    cache: Cache,
    out_dir: str | Path,
    *,
    progress: bool = True,
    chunk_size: int = 1024,
    workers: int | None = None,
) -> Cache:
    """Apply the data-level defence ``name`` to every image of ``cache``; write and open a new cache.

    The folder ``out_dir`` gets ``images.npy`` (uint8 ``[N, C, H, W]``, same shape as the source),
    the label arrays copied unchanged, and the source manifest with ``defense`` added and
    ``source_digest`` replaced by a digest of (source digest, defence). It is built in a temporary
    folder beside ``out_dir`` and renamed into place, so an interrupted build never looks
    complete. A rerun whose ``out_dir`` already holds the complete result returns it without work.
    Memory is O(``chunk_size`` images).

    Args:
        name: ``"jpeg"``, ``"bdr"`` or ``"grayscale"``; ``"none"`` returns ``cache`` itself.
        cache: the (protected) training cache (:class:`mtlue_fast.data.Cache`).
        out_dir: the new cache's folder; must not be the source's. An existing folder is replaced
            only when it looks like a cache (or is empty).
        progress: print a progress line.
        chunk_size: images transformed at a time.
        workers: JPEG encoding threads (default: up to 8).

    Returns:
        The opened defended cache.
    """
    check_defense(name)
    if name == "none":
        return cache
    if name not in DATA_DEFENSES:
        raise ValueError(
            f"name {name!r} is a training-time defence (use batch_defense); "
            f"defend_cache takes one of {', '.join(DATA_DEFENSES)}"
        )
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    _check_channels(name, int(cache.images.shape[1]))
    out = Path(out_dir)
    if out.resolve() == Path(cache.path).resolve():
        raise ValueError(f"out_dir {out} is the source cache's folder; choose another")
    digest = defended_digest(cache.manifest, name)
    with file_lock(out.parent / f".{out.name}.lock"):
        if _is_complete(out, digest):
            return open_cache(out)
        _check_replaceable(out)
        _remove_stale_builds(out)
        tmp = out.parent / f".{out.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.building"
        tmp.mkdir()  # not mkdtemp: the cache folder keeps the usual (umask) permissions
        try:
            threads = workers or min(8, os.cpu_count() or 1)
            _write_defended(name, cache, tmp, digest, f"defending {out.name} ({name})", progress, int(chunk_size), threads)
            _move_into_place(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return open_cache(out)


def _check_channels(name: str, channels: int) -> None:
    """ValueError when defence ``name`` cannot apply to ``channels``-channel images."""
    if name == "grayscale" and channels != 3:
        raise ValueError(f"defence 'grayscale' needs 3-channel images; this cache has {channels} (it would be a no-op)")
    if name == "jpeg" and channels not in (1, 3):
        raise ValueError(f"defence 'jpeg' needs 1- or 3-channel images; this cache has {channels}")


def defended_digest(manifest: Mapping, name: str) -> str:
    """sha256 of (the source manifest's ``source_digest``, defence ``name``)."""
    source = manifest.get("source_digest")
    if not source:
        raise ValueError("cache: its manifest has no source_digest, so a defended copy cannot be identified")
    return hashlib.sha256(json.dumps([source, name]).encode()).hexdigest()


def _transform(name: str, images: np.ndarray, workers: int) -> np.ndarray:
    """uint8 ``[n, C, H, W]`` -> the defended uint8 ``[n, C, H, W]``."""
    if name == "jpeg":
        return jpeg_compress(images, JPEG_QUALITY, workers)
    if name == "bdr":
        return reduce_bit_depth(images, BDR_BITS)
    return to_grayscale(images)


def _label_arrays(cache: Cache) -> dict[str, np.ndarray]:
    """The cache's label arrays by file stem (``labels`` or NYUv2's ``seg``, ``depth``, ``normal``)."""
    return dict(cache.labels) if isinstance(cache.labels, Mapping) else {"labels": cache.labels}


def _write_defended(name: str, cache: Cache, folder: Path, digest: str, label: str, show: bool, chunk: int,
                    workers: int) -> None:  # fmt: skip
    """Fill ``folder`` with the defended images, the copied labels and the manifest (last)."""
    images = cache.images
    target = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8, shape=images.shape)
    bar = Progress(len(images), label, enabled=show)
    for start in range(0, len(images), chunk):
        stop = min(start + chunk, len(images))
        target[start:stop] = _transform(name, np.ascontiguousarray(images[start:stop]), workers)
        bar.update(stop - start)
    target.flush()
    del target
    bar.close()
    for stem, array in _label_arrays(cache).items():
        _copy_array(array, folder / f"{stem}.npy", chunk)
    manifest = dict(cache.manifest)
    previous = manifest.get("defense")
    manifest.update(
        defense=f"{previous}+{name}" if previous else name,
        defended_from=manifest.get("source_digest"),
        source_digest=digest,
    )
    write_json(folder / "manifest.json", manifest)


def _copy_array(array: np.ndarray, path: Path, chunk: int) -> None:
    """Copy ``array`` into a new ``.npy`` file ``chunk`` rows at a time."""
    target = np.lib.format.open_memmap(path, mode="w+", dtype=array.dtype, shape=array.shape)
    for start in range(0, len(array), chunk):
        target[start : start + chunk] = array[start : start + chunk]
    target.flush()
    del target


def _is_complete(folder: Path, digest: str) -> bool:
    manifest = read_json(folder / "manifest.json")
    if manifest is None or manifest.get("source_digest") != digest:
        return False
    stems = ["labels"] if manifest.get("dataset") != "nyuv2" else ["seg", "depth", "normal"]
    return all((folder / f"{stem}.npy").is_file() for stem in ["images", *stems])


def _check_replaceable(folder: Path) -> None:
    """ValueError when ``folder`` exists and holds something other than a cache."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ValueError(f"out_dir {folder} exists and is not a folder")
    if any(folder.iterdir()) and not ((folder / "manifest.json").is_file() or (folder / "images.npy").is_file()):
        raise ValueError(f"out_dir {folder} exists and does not look like a cache folder; not replaced")


def _remove_stale_builds(folder: Path) -> None:
    """Temporary folders left by interrupted builds of ``folder`` (the caller holds the lock)."""
    for stale in folder.parent.glob(f".{folder.name}.*.building"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in folder.parent.glob(f".{folder.name}.*.old"):
        shutil.rmtree(stale, ignore_errors=True)


def _move_into_place(built: Path, folder: Path) -> None:
    """Rename ``built`` onto ``folder``; an existing ``folder`` is moved aside first, then deleted."""
    if folder.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
        os.replace(folder, aside / "entry")
        os.replace(built, folder)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(built, folder)


# ============================================================================ training-time defences


LossFn = Callable[[object, object], Tensor]


class BatchDefense:
    """A per-batch training-time defence.

    ``defence(x, labels, model, loss_fn) -> x'``: ``x`` float ``[B, C, h, w]`` in [0, 1] on the
    model's device, ``labels`` the batch's labels, ``model`` the victim (in train mode),
    ``loss_fn(model(x), labels)`` its per-task losses ``[K]``. Returns a tensor of ``x``'s shape
    and memory format, in [0, 1], without a graph.

    Random draws come from a ``torch.Generator`` on ``x``'s device, reseeded at every call from
    (``seed``, number of calls so far), so a run is reproducible and nothing is read back to the
    host. ``state_dict`` / ``load_state_dict`` carry the call count for resumed runs.
    """

    name = "base"

    def __init__(self, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {seed!r}")
        self.seed = int(seed)
        self.calls = 0
        self._generators: dict[str, torch.Generator] = {}

    def __call__(self, x: Tensor, labels, model: nn.Module, loss_fn: LossFn) -> Tensor:
        raise NotImplementedError

    def next_generator(self, device: torch.device) -> torch.Generator:
        """This call's generator on ``device`` (seeded from ``seed`` and the call count)."""
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device)
        generator = self._generators[key]
        generator.manual_seed(_call_seed(self.seed, self.calls))
        self.calls += 1
        return generator

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: Mapping) -> None:
        self.calls = int(state["calls"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(seed={self.seed})"


def _call_seed(seed: int, call: int) -> int:
    """A 63-bit seed for call number ``call`` of a defence seeded with ``seed``."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{call}".encode()).digest()[:8], "little") >> 1


def _uniform(generator: torch.Generator, n: int, low: float, high: float, device: torch.device) -> Tensor:
    """``[n]`` float32 uniform in [low, high) on ``device``."""
    return torch.rand(n, generator=generator, device=device).mul_(high - low).add_(low)


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _check_batch(x: Tensor, arg: str = "x") -> None:
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{arg} must be a float tensor [B, C, h, w], got {getattr(x, 'shape', type(x).__name__)}")


def random_resized_crop_flip(
    x: Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Tensor:
    """Per-sample random resized crop plus horizontal flip, resampled bilinearly to the input size.

    Each sample's crop covers a fraction ``U(scale)`` of the image area with width/height aspect
    (in pixels) log-uniform in ``ratio``; a side longer than the image is cut to the image (so
    the area is then smaller). The crop's centre is uniform over the positions keeping it inside,
    and it is flipped left-right with probability 1/2. One ``affine_grid`` + ``grid_sample`` call.

    Args:
        x: float ``[B, C, h, w]``.
        generator: on ``x``'s device.

    Returns:
        float ``[B, C, h, w]`` (values within the input's range: bilinear interpolation).
    """
    b, _, height, width = x.shape
    dev = x.device
    area = _uniform(generator, b, scale[0], scale[1], dev)
    aspect = _uniform(generator, b, math.log(ratio[0]), math.log(ratio[1]), dev).exp_()
    frac_w = (area * aspect * (height / width)).sqrt_().clamp_(max=1.0)
    frac_h = (area / aspect * (width / height)).sqrt_().clamp_(max=1.0)
    centre_x = _uniform(generator, b, -1.0, 1.0, dev).mul_(1.0 - frac_w)
    centre_y = _uniform(generator, b, -1.0, 1.0, dev).mul_(1.0 - frac_h)
    flip = torch.where(torch.rand(b, generator=generator, device=dev) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = frac_w * flip
    theta[:, 0, 2] = centre_x
    theta[:, 1, 1] = frac_h
    theta[:, 1, 2] = centre_y
    grid = F.affine_grid(theta, [b, x.shape[1], height, width], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _luminance(x: Tensor) -> Tensor:
    """``[B, C, h, w]`` -> ``[B, 1, h, w]``: the ITU-R 601 luma for C = 3, the image for C = 1."""
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    weights = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def colour_jitter(
    x: Tensor,
    generator: torch.Generator,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
) -> Tensor:
    """Per-sample brightness, contrast and (RGB only) saturation jitter, in that order.

    Factors are uniform in ``[1 - s, 1 + s]``: brightness scales the image, contrast blends it with
    its mean luminance, saturation with its per-pixel luminance; clamped to [0, 1] after each.

    Args:
        x: float ``[B, C, h, w]`` in [0, 1].
        generator: on ``x``'s device.

    Returns:
        float ``[B, C, h, w]`` in [0, 1].
    """
    b = x.shape[0]

    def factor(strength: float) -> Tensor:
        return _uniform(generator, b, 1.0 - strength, 1.0 + strength, x.device).view(b, 1, 1, 1).to(x.dtype)

    x = (x * factor(brightness)).clamp_(0.0, 1.0)
    mean = _luminance(x).mean((1, 2, 3), keepdim=True)
    x = torch.lerp(mean.expand_as(x), x, factor(contrast)).clamp_(0.0, 1.0)
    if x.shape[1] == 3:
        x = torch.lerp(_luminance(x).expand_as(x), x, factor(saturation)).clamp_(0.0, 1.0)
    return x


class StrongAugmentation(BatchDefense):
    """``augment``: random resized crop (scale 0.35-1, ratio 3/4-4/3) + flip + colour jitter (0.4).

    Classification only: the geometric part would have to move dense label maps too, so dict
    labels raise NotImplementedError.
    """

    name = "augment"

    def __init__(self, seed: int = 0, scale: tuple[float, float] = (0.35, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4):  # fmt: skip
        super().__init__(seed)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
        for arg, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0 <= value < 1:
                raise ValueError(f"{arg} must be in [0, 1), got {value}")
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation

    def __call__(self, x: Tensor, labels, model: nn.Module | None = None, loss_fn: LossFn | None = None) -> Tensor:
        """``x`` float ``[B, C, h, w]`` in [0, 1], ``labels`` int ``[B, K]`` -> augmented ``[B, C, h, w]``."""
        _check_batch(x)
        if isinstance(labels, Mapping) or not isinstance(labels, Tensor) or labels.is_floating_point():
            raise NotImplementedError(
                "defense 'augment' supports classification labels (an int tensor [B, K]) only; dense (NYUv2) "
                "label maps would need the same geometric transform, which is not implemented"
            )
        generator = self.next_generator(x.device)
        with torch.no_grad():
            out = random_resized_crop_flip(x.detach(), generator, self.scale, self.ratio)
            out = colour_jitter(out, generator, self.brightness, self.contrast, self.saturation)
        return out.contiguous(memory_format=_memory_format(x))


@contextlib.contextmanager
def frozen_batchnorm_stats(model: nn.Module) -> Iterator[None]:
    """Inside the block, batch-norm layers in train mode normalise with batch statistics as usual
    but leave their running statistics (and ``num_batches_tracked``) untouched; restored after."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for layer in layers:
        layer.track_running_stats = False
    try:
        yield
    finally:
        for layer in layers:
            layer.track_running_stats = True


class AdversarialTraining(BatchDefense):
    """``adv``: replace the batch by its PGD adversarial example (Madry et al. 2018).

    From a uniform random start in the L-inf ``eps`` ball, ``steps`` steps of
    ``x' <- proj(x' + step_size * sign(grad_x' sum_k L_k))`` where ``proj`` clips to the ``eps`` ball
    around ``x`` and to [0, 1]. The model stays in train mode (batch statistics, as in the training
    forward) but its batch-norm running statistics are not updated by the attack, and no parameter
    gradient is accumulated. Works for any labels ``loss_fn`` accepts (dense dicts included).
    """

    name = "adv"

    def __init__(self, eps: float = 8 / 255, steps: int = 10, step_size: float = 2 / 255, seed: int = 0, amp: bool = False):
        super().__init__(seed)
        self.eps = _check_eps(eps)
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        if not (math.isfinite(step_size) and step_size > 0):
            raise ValueError(f"step_size must be > 0, got {step_size!r}")
        self.steps, self.step_size, self.amp = int(steps), float(step_size), bool(amp)

    def __call__(self, x: Tensor, labels, model: nn.Module, loss_fn: LossFn) -> Tensor:
        """``x`` float ``[B, C, h, w]`` in [0, 1] -> the adversarial batch (detached, same shape)."""
        _check_batch(x)
        generator = self.next_generator(x.device)
        x = x.detach()
        if self.eps == 0 or self.steps == 0:
            return x.clone()
        lower, upper = (x - self.eps).clamp_(min=0.0), (x + self.eps).clamp_(max=1.0)
        adv = torch.empty_like(x).uniform_(-self.eps, self.eps, generator=generator).add_(x)
        adv = torch.minimum(torch.maximum(adv, lower), upper)
        with frozen_batchnorm_stats(model), torch.enable_grad():
            for _ in range(self.steps):
                adv.requires_grad_(True)
                with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
                    outputs = model(adv)
                loss = loss_fn(outputs, labels).float().sum()
                (grad,) = torch.autograd.grad(loss, adv)
                adv = adv.detach().add_(grad.sign_(), alpha=self.step_size)
                adv = torch.minimum(torch.maximum(adv, lower), upper)
        return adv.detach()

    def __repr__(self) -> str:
        return f"AdversarialTraining(eps={self.eps:.5f}, steps={self.steps}, step_size={self.step_size:.5f}, seed={self.seed})"


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or not 0 <= float(eps) <= 1:
        raise ValueError(f"eps must be a number in [0, 1] (the [0, 1] pixel scale), got {eps!r}")
    return float(eps)


def batch_defense(name: str, *, eps: float = 8 / 255, seed: int = 0, amp: bool = False) -> BatchDefense | None:
    """The training-time defence ``name`` (``"augment"`` or ``"adv"``); None for ``"none"`` and
    for the data-level ones (applied to the cache by :func:`defend_cache` instead).

    Args:
        name: one of :data:`DEFENSES`.
        eps: ``adv``'s L-inf budget on the [0, 1] scale.
        seed: base seed of the per-call generators.
        amp: ``adv`` runs its attack forward passes under bf16 autocast.
    """
    check_defense(name)
    _check_eps(eps)
    if name == "augment":
        return StrongAugmentation(seed=seed)
    if name == "adv":
        return AdversarialTraining(eps=eps, seed=seed, amp=amp)
    return None


__all__ = [
    "BATCH_DEFENSES", "DATA_DEFENSES", "DEFENSES", "AdversarialTraining", "BatchDefense", "StrongAugmentation",
    "batch_defense", "check_defense", "colour_jitter", "defend_cache", "defended_digest", "frozen_batchnorm_stats",
    "jpeg_compress", "random_resized_crop_flip", "reduce_bit_depth", "to_grayscale",
]  # fmt: skip
