"""Baselines of docs/method.md section 5: each gives a ``perturb(images, labels, indices) -> delta`` callable for
:func:`mtlue_fast.ue.export.write_protected`, and an ``export_<name>(clean, out_dir, ...)`` shortcut.

Non-gradient baselines (this section):

- :func:`uniform_noise`: i.i.d. uniform noise in [-eps, eps], a fixed draw per training image; the
  sanity floor (random noise does not make data unlearnable).
- :func:`ar_patches`: class-wise autoregressive (AR) patterns, one per (task, class), laid out on a
  grid with one cell per task: an image's perturbation encodes all of its labels.

Perturbations are float32 on the [0, 1] scale, on the device of ``images``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.cache import Cache
from .export import write_protected

__all__ = ["UniformNoise", "uniform_noise", "export_uniform_noise", "ARPatches", "ar_patches", "export_ar_patches"]


def _check_eps(eps: float) -> float:
    eps = float(eps)
    if not 0.0 <= eps <= 127 / 255:
        raise ValueError(f"eps must be in [0, 127/255] on the [0, 1] scale (e.g. 8/255), got {eps}")
    return eps


def _float32_bound(eps: float) -> np.float32:
    """The largest float32 that is <= eps, so float32 perturbations satisfy |delta| <= eps exactly."""
    bound = np.float32(eps)
    return bound if float(bound) <= eps else np.nextafter(bound, np.float32(0))


def _check_seed(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)


# ----------------------------------------------------------------------------- uniform noise


class UniformNoise:
    """``perturb`` callable: for dataset index ``i``, delta = U[-eps, eps] per element ``[C,H,W]``,
    drawn from ``numpy.random.default_rng([seed, i])``, so it depends only on (seed, index, shape),
    never on the batching or the device."""

    def __init__(self, eps: float, seed: int = 0) -> None:
        self.eps, self.seed = _check_eps(eps), _check_seed(seed)

    def sample(self, index: int, shape: Sequence[int]) -> np.ndarray:
        """The float32 perturbation of dataset row ``index`` with ``shape`` ``(C, H, W)``."""
        unit = np.random.default_rng([self.seed, int(index)]).random(tuple(shape), dtype=np.float32)
        bound = _float32_bound(self.eps)
        delta = (unit * np.float32(2.0) - np.float32(1.0)) * bound
        return np.clip(delta, -bound, bound)

    def __call__(self, images: torch.Tensor, labels: object, indices: torch.Tensor) -> torch.Tensor:
        """``[B,C,H,W]`` float32 on ``images.device``; ``labels`` is ignored."""
        shape = tuple(images.shape[1:])
        rows = [self.sample(i, shape) for i in indices.tolist()]
        block = np.stack(rows) if rows else np.zeros((0, *shape), np.float32)
        return torch.from_numpy(block).to(images.device)


def uniform_noise(eps: float, seed: int = 0) -> UniformNoise:
    """Uniform noise in [-eps, eps] per pixel, fixed per dataset index (see :class:`UniformNoise`)."""
    return UniformNoise(eps, seed)


def export_uniform_noise(
    clean: Cache, out_dir: str | Path, eps: float = 8 / 255, seed: int = 0, device: torch.device | str = "cpu", **kw
) -> Cache:
    """Write the uniform-noise protected cache of ``clean`` to ``out_dir``; ``kw`` goes to
    :func:`~mtlue_fast.ue.export.write_protected` (``batch_size``, ``progress``)."""
    return write_protected(clean, out_dir, uniform_noise(eps, seed), method="uniform_noise", eps=eps, device=device,
                           settings={"seed": int(seed)}, **kw)  # fmt: skip


# ----------------------------------------------------------------------------- class-wise AR patches


def grid_cells(num_tasks: int, size: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """``(top, left, height, width)`` of task k's cell, k = 0..num_tasks-1.

    The image ``(H, W)`` is cut into ``rows x cols`` cells with ``cols = ceil(sqrt(K))`` and
    ``rows = ceil(K / cols)`` (boundaries at ``round(i * H / rows)``); tasks fill the cells
    row-major, and cells beyond K stay unperturbed. K = 1 gives the whole image.
    """
    height, width = int(size[0]), int(size[1])
    cols = math.ceil(math.sqrt(num_tasks))
    rows = math.ceil(num_tasks / cols)
    if rows > height or cols > width:
        raise ValueError(f"cannot lay out {num_tasks} task cells ({rows}x{cols}) on a {height}x{width} image")
    ys = [round(i * height / rows) for i in range(rows + 1)]
    xs = [round(j * width / cols) for j in range(cols + 1)]
    cells = []
    for k in range(num_tasks):
        r, c = divmod(k, cols)
        cells.append((ys[r], xs[c], ys[r + 1] - ys[r], xs[c + 1] - xs[c]))
    return cells


def ar_coefficients(rng: np.random.Generator, rho: float = 0.95) -> np.ndarray:
    """Four AR coefficients ``(a_ul, a_u, a_ur, a_l)`` drawn from N(0, 1) and scaled to
    ``sum |a| = rho``; ``rho < 1`` makes the process below stable."""
    if not 0.0 < rho < 1.0:
        raise ValueError(f"rho (sum of |AR coefficients|) must be in (0, 1) for a stable process, got {rho}")
    coef = rng.standard_normal(4)
    return coef * (rho / max(float(np.abs(coef).sum()), 1e-12))


def ar_fields(coef: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Run P 2-D causal AR processes in raster order, all at once.

    ``x[i, j] = a_ul x[i-1, j-1] + a_u x[i-1, j] + a_ur x[i-1, j+1] + a_l x[i, j-1] + e[i, j]``
    with zeros outside the field (the causal half of a 3x3 neighbourhood).

    Args:
        coef: ``[P, 4]`` coefficients ``(a_ul, a_u, a_ur, a_l)`` of each process, ``|a_l| < 1``.
        noise: ``[P, C, H, W]`` driving noise ``e`` (channels share their process's coefficients).

    Returns:
        ``[P, C, H, W]`` float64. Each row is one matrix product: the left-neighbour recursion
        ``x_j = r_j + a_l x_{j-1}`` is ``x = r @ T`` with ``T[t, j] = a_l^(j-t)`` for ``t <= j``.
    """
    p, _, h, w = noise.shape
    steps = np.arange(w)[None, :] - np.arange(w)[:, None]  # j - t
    lower = steps >= 0
    a_ul, a_u, a_ur, a_l = (coef[:, n, None, None] for n in range(4))  # [P, 1, 1]
    transfer = np.where(lower, a_l ** np.maximum(steps, 0), 0.0)  # [P, W, W]
    field = np.zeros(noise.shape)
    above = np.zeros(noise.shape[:2] + (w + 2,))  # the previous row with a zero column each side
    for i in range(h):
        row = a_ul * above[..., :-2] + a_u * above[..., 1:-1] + a_ur * above[..., 2:] + noise[:, :, i]
        field[:, :, i] = row @ transfer
        above[..., 1:-1] = field[:, :, i]
    return field


def ar_pattern_bank(rngs: Sequence[np.random.Generator], channels: int, height: int, width: int, *,
                    rho: float = 0.95, warmup: int = 8) -> np.ndarray:  # fmt: skip
    """One stable AR pattern per generator: ``[len(rngs), channels, height, width]`` float64, each
    with max |value| = 1.

    Each generator draws its coefficients (:func:`ar_coefficients`), then standard normal noise for
    a field ``warmup`` pixels taller and ``2 * warmup`` wider; the field starts at zero there and is
    cropped to the bottom-centre window, so boundary transients fade out of the pattern.
    """
    m = int(warmup)
    if m < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    coef = np.stack([ar_coefficients(rng, rho) for rng in rngs])
    noise = np.stack([rng.standard_normal((channels, height + m, width + 2 * m)) for rng in rngs])
    pattern = ar_fields(coef, noise)[:, :, m:, m : m + width]
    peak = np.abs(pattern).reshape(len(rngs), -1).max(1)
    return pattern / np.maximum(peak, 1e-12)[:, None, None, None]


class ARPatches:
    """``perturb`` callable for class-wise AR patterns (see :func:`ar_patches`).

    Attributes:
        patches: per task k, float32 ``[num_classes[k], C, h_k, w_k]`` with max |value| = eps each.
        cells: per task k, ``(top, left, h_k, w_k)`` in the ``image_size`` image.
        image_size, channels, eps: as given.
    """

    def __init__(self, patches: list[torch.Tensor], cells: list[tuple[int, int, int, int]],
                 image_size: tuple[int, int], channels: int, eps: float) -> None:  # fmt: skip
        self.patches, self.cells = patches, cells
        self.image_size, self.channels, self.eps = image_size, channels, eps
        self._on_device: dict[torch.device, list[torch.Tensor]] = {}

    def pattern(self, labels: torch.Tensor | np.ndarray | Sequence[Sequence[int]]) -> torch.Tensor:
        """The float32 perturbations ``[B,C,H,W]`` of int labels ``[B,K]`` (on the labels' device)."""
        labels = torch.as_tensor(labels, dtype=torch.int64)
        num_tasks = len(self.patches)
        if labels.ndim != 2 or labels.shape[1] != num_tasks:
            raise ValueError(f"ar_patches: labels must be int [B, {num_tasks}], got {tuple(labels.shape)}")
        device = labels.device
        patches = self._on_device.get(device)
        if patches is None:
            patches = self._on_device[device] = [p.to(device) for p in self.patches]
        counts = torch.tensor([len(p) for p in patches], device=device)
        if labels.numel() and bool(((labels < 0) | (labels >= counts)).any()):
            raise ValueError(f"ar_patches: labels out of range for num_classes {counts.tolist()}")
        delta = torch.zeros((len(labels), self.channels, *self.image_size), dtype=torch.float32, device=device)
        for k, (top, left, h, w) in enumerate(self.cells):
            delta[:, :, top : top + h, left : left + w] = patches[k][labels[:, k]]
        return delta

    def __call__(self, images: torch.Tensor, labels: object, indices: torch.Tensor) -> torch.Tensor:
        """``[B,C,H,W]`` float32 on ``images.device``: sample b's cell k holds the patch of class
        ``labels[b, k]`` of task k. Dense (dict) labels raise NotImplementedError."""
        if isinstance(labels, dict):
            raise NotImplementedError(
                "ar_patches: class-wise patterns need a class label per task; NYUv2's dense labels "
                "(segmentation/depth/normal maps) have none"
            )
        if tuple(images.shape[1:]) != (self.channels, *self.image_size):
            raise ValueError(
                f"ar_patches: patterns were made for [C,H,W] = {(self.channels, *self.image_size)}, "
                f"images are {tuple(images.shape[1:])}"
            )
        return self.pattern(torch.as_tensor(labels).to(images.device))


def ar_patches(
    num_classes: Sequence[int],
    image_size: Sequence[int],
    channels: int,
    eps: float,
    seed: int = 0,
    *,
    rho: float = 0.95,
    warmup: int = 8,
) -> ARPatches:
    """Class-wise AR patterns for a K-task classification dataset.

    For every task k and class c a patch is drawn by :func:`ar_pattern_bank` from
    ``numpy.random.default_rng([seed, k, c])`` (random AR coefficients per (task, class)), sized to
    task k's cell of :func:`grid_cells` and scaled so its max |value| = eps. A sample's perturbation
    holds, in cell k, the patch of its class y_k of task k; a single-task dataset's patch covers the
    whole image. Generated once here; applying it is a gather per task.

    Args:
        num_classes: classes per task, ``K`` entries (binary tasks: 2).
        image_size: ``(H, W)`` of the images (the cache's working resolution).
        channels: 1 or 3.
        eps: L-inf budget on the [0, 1] scale.
        seed: non-negative int.
        rho: sum of |AR coefficients|, in (0, 1); closer to 1 gives smoother, more correlated patterns.
        warmup: pixels of burn-in around each patch.
    """
    eps, seed = _check_eps(eps), _check_seed(seed)
    num_classes = [int(n) for n in num_classes]
    if not num_classes or min(num_classes) < 1:
        raise ValueError(f"num_classes must be a non-empty list of positive ints, got {num_classes}")
    height, width = (int(s) for s in image_size)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    cells = grid_cells(len(num_classes), (height, width))
    patches = []
    for k, (n_classes, (_, _, h, w)) in enumerate(zip(num_classes, cells)):
        rngs = [np.random.default_rng([seed, k, c]) for c in range(n_classes)]
        bank = ar_pattern_bank(rngs, channels, h, w, rho=rho, warmup=warmup)
        bound = float(_float32_bound(eps))
        patches.append(torch.from_numpy((bank * bound).astype(np.float32)).clamp_(-bound, bound))
    return ARPatches(patches, cells, (height, width), channels, eps)


def export_ar_patches(
    clean: Cache, out_dir: str | Path, eps: float = 8 / 255, seed: int = 0, device: torch.device | str = "cpu",
    *, rho: float = 0.95, warmup: int = 8, **kw,
) -> Cache:  # fmt: skip
    """Write the class-wise AR-pattern protected cache of ``clean`` to ``out_dir``; ``kw`` goes to
    :func:`~mtlue_fast.ue.export.write_protected` (``batch_size``, ``progress``).

    Raises:
        NotImplementedError: NYUv2 (dense labels, no classes per image).
    """
    if isinstance(clean.labels, dict) or clean.manifest.get("dataset") == "nyuv2":
        raise NotImplementedError(
            "ar_patches: class-wise patterns need a class label per task; NYUv2's dense labels have none"
        )
    _, channels, height, width = clean.images.shape
    perturb = ar_patches(clean.num_classes, (height, width), channels, eps, seed, rho=rho, warmup=warmup)
    settings = {"seed": int(seed), "rho": float(rho), "warmup": int(warmup)}
    return write_protected(clean, out_dir, perturb, method="ar_patches", eps=eps, device=device,
                           settings=settings, **kw)  # fmt: skip
