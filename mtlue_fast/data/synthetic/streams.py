"""Where the synthetic datasets' randomness comes from, and how their images are rendered in parallel.

Every random draw comes from a ``numpy.random.Generator`` stream keyed by ``(seed, dataset, split,
purpose[, chunk])``; images are rendered in fixed chunks of ``_CHUNK``, each from its own stream, on a
thread pool, so the output does not depend on the thread count or the order. Binary labels come from
a latent Gaussian factor model (correlated co-occurrence) thresholded to the wanted prevalences,
summed without BLAS so that every machine gets the same labels.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

DATASETS = ("celeba", "chestxray", "utkface", "nyuv2")

_SPLIT_ID = {"train": 0, "test": 1, "val": 2}
_LABELS, _META, _PIXELS = 1, 2, 3
_CHUNK = 64  # images rendered together; fixed, so the random streams do not depend on anything else


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
