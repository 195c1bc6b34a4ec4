"""Numbers the report is made of: perturbation statistics and the means over victim seeds.

:func:`perturbation_stats` summarises ``delta = protected - clean`` (int16, pixel units 0..255) over a
seeded subset of rows, reading memory maps a chunk at a time; :func:`aggregate_victims` turns the
per-seed victim scores into the top-level ``clean`` / ``protected`` means, the mean ``drop`` and its
sample standard deviation ``drop_std`` (ddof=1); :func:`published_check` compares the training
cache read back from the published files with the protected cache. Plain Python and NumPy; no report-dict checking.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

SIDES = ("clean", "protected")  # computed from ``victims``; callers must not pass them
CHUNK_BYTES = 32 << 20  # float64 working set of one chunk of deltas in perturbation_stats


def perturbation_stats(
    clean_images: Any,
    protected_images: Any,
    labels: Any,
    task_names: Sequence[str],
    num_classes: int | Sequence[int],
    *,
    max_samples: int = 20000,
    seed: int = 0,
    chunk_rows: int | None = None,
) -> dict:
    """Statistics of ``delta = protected - clean`` (int16, pixel units 0..255) over a random subset.

    Args:
        clean_images, protected_images: uint8 ``[N, C, H, W]`` arrays (numpy memory maps are fine:
            only ``chunk_rows`` rows are read at a time).
        labels: int64 ``[N, K]`` class indices (a value outside ``[0, num_classes)``, e.g. -1, marks
            a missing label and leaves the sample out of that task), or a dict of dense label maps
            (NYUv2): then the per-task entries are ``None`` and only the overall figures are computed.
        task_names: the K task names.
        num_classes: classes per task (one int for all tasks, or K ints).
        max_samples: at most this many rows, drawn without replacement with ``seed``.
        chunk_rows: rows per chunk (None: about 32 MiB of float64 deltas).

    Returns:
        ``{"per_task": {name: {"intra_class_std", "mean_abs_delta"} | None}, "mean_abs_delta",
        "max_abs_delta", "samples"}``. ``intra_class_std`` (pixel units): for each class of the task
        with at least 2 samples, the per-pixel population standard deviation of delta over that
        class's samples, averaged over pixels; then averaged over those classes (NaN if none). Low
        means class-consistent perturbations (a shortcut). ``mean_abs_delta`` (pixel units): mean
        ``|delta|`` over all elements of the task's labelled samples (overall: of all samples).
        Sums are float64 (exact for integer deltas); memory is O(chunk + classes * C * H * W).
    """
    n = _check_images(clean_images, protected_images)
    names = [str(t) for t in task_names]
    dense = isinstance(labels, Mapping)
    label_array = None if dense else _check_labels(labels, n, len(names))
    classes = _classes_per_task(num_classes, len(names))
    rows = sample_rows(n, max_samples, seed)
    pixels = int(np.prod(clean_images.shape[1:]))
    step = chunk_rows or max(1, CHUNK_BYTES // (8 * max(pixels, 1)))
    acc = _StatsAccumulator(classes if not dense else [], pixels)
    for start in range(0, len(rows), step):
        idx = rows[start : start + step]
        delta = _chunk_delta(clean_images, protected_images, idx)
        acc.add(delta, None if dense else np.asarray(label_array[idx], dtype=np.int64))
    per_task = {name: None for name in names} if dense else acc.per_task(names)
    return {
        "per_task": per_task,
        "mean_abs_delta": acc.mean_abs(),
        "max_abs_delta": acc.max_abs,
        "samples": int(len(rows)),
    }


def sample_rows(n: int, max_samples: int, seed: int) -> np.ndarray:
    """Sorted row indices: all ``n`` rows, or a seeded subset of ``max_samples`` without replacement."""
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    if n <= max_samples:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_samples, replace=False)).astype(np.int64)


def _check_images(clean: Any, protected: Any) -> int:
    """Number of rows; raises ValueError unless both are ``[N, C, H, W]`` of the same shape."""
    if tuple(clean.shape) != tuple(protected.shape) or len(clean.shape) != 4:
        raise ValueError(
            f"clean and protected images must both be [N, C, H, W] of one shape, got "
            f"{tuple(clean.shape)} and {tuple(protected.shape)}"
        )
    if clean.shape[0] == 0:
        raise ValueError("no images")
    return int(clean.shape[0])


def _check_labels(labels: Any, n: int, k: int) -> Any:
    """``labels`` itself after checking it is ``[n, k]``."""
    shape = tuple(labels.shape)
    if shape != (n, k):
        raise ValueError(f"labels must be [N, K] = [{n}, {k}], got {shape}")
    return labels


def _classes_per_task(num_classes: int | Sequence[int], k: int) -> list[int]:
    """``num_classes`` expanded to one positive int per task."""
    if isinstance(num_classes, numbers.Integral):
        counts = [int(num_classes)] * k
    else:
        counts = [int(c) for c in num_classes]
    if len(counts) != k or min(counts, default=1) < 1:
        raise ValueError(f"num_classes must be a positive int or {k} positive ints, got {num_classes!r}")
    return counts


def _chunk_delta(clean: Any, protected: Any, idx: np.ndarray) -> np.ndarray:
    """``protected - clean`` of rows ``idx`` as int16 ``[B, C*H*W]``."""
    c = np.asarray(clean[idx]).astype(np.int16, copy=False)
    p = np.asarray(protected[idx]).astype(np.int16, copy=False)
    return (p - c).reshape(len(idx), -1)


class _StatsAccumulator:
    """Per-(task, class) float64 sums and sums of squares of delta, and |delta| totals."""

    def __init__(self, classes: list[int], pixels: int) -> None:
        self.classes = classes
        self.offsets = np.concatenate([[0], np.cumsum(classes)]).astype(np.int64)
        groups = int(self.offsets[-1])
        self.pixels = pixels
        self.sums = np.zeros((groups, pixels))
        self.squares = np.zeros((groups, pixels))
        self.counts = np.zeros(groups, dtype=np.int64)
        self.task_abs = np.zeros(len(classes))
        self.task_rows = np.zeros(len(classes), dtype=np.int64)
        self.total_abs = 0.0
        self.total_rows = 0
        self.max_abs = 0

    def add(self, delta: np.ndarray, labels: np.ndarray | None) -> None:
        """Accumulate int16 ``delta [B, D]`` with class indices ``labels [B, K]`` (None: overall only)."""
        row_abs = np.abs(delta).sum(axis=1, dtype=np.int64).astype(np.float64)
        self.total_abs += float(row_abs.sum())
        self.total_rows += len(delta)
        self.max_abs = max(self.max_abs, int(np.abs(delta).max(initial=0)))
        if labels is None or not self.classes:
            return
        onehot, valid = self._onehot(labels)
        d = delta.astype(np.float64)
        self.sums += onehot @ d
        self.squares += onehot @ (d * d)
        self.counts += onehot.sum(axis=1).astype(np.int64)
        self.task_abs += valid @ row_abs
        self.task_rows += valid.sum(axis=1).astype(np.int64)

    def _onehot(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[groups, B]`` one-hot of (task, class) and ``[K, B]`` validity, both float64."""
        classes = np.asarray(self.classes)
        valid = (labels >= 0) & (labels < classes[None, :])  # [B, K]
        onehot = np.zeros((int(self.offsets[-1]), len(labels)))
        b, k = np.nonzero(valid)
        onehot[self.offsets[k] + labels[b, k], b] = 1.0
        return onehot, valid.T.astype(np.float64)

    def per_task(self, names: list[str]) -> dict:
        """``{name: {"intra_class_std", "mean_abs_delta"}}`` (pixel units; NaN where undefined)."""
        out = {}
        for k, name in enumerate(names):
            lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
            stds = [self._class_std(g) for g in range(lo, hi) if self.counts[g] >= 2]
            rows = self.task_rows[k]
            out[name] = {
                "intra_class_std": float(np.mean(stds)) if stds else math.nan,
                "mean_abs_delta": float(self.task_abs[k] / (rows * self.pixels)) if rows else math.nan,
            }
        return out

    def _class_std(self, group: int) -> float:
        """Pixel-averaged population std of one (task, class) group; exact 0 for identical deltas."""
        n = float(self.counts[group])
        s, q = self.sums[group], self.squares[group]
        var = np.maximum(n * q - s * s, 0.0) / (n * n)  # integer-valued numerator: exact in float64
        return float(np.sqrt(var).mean())

    def mean_abs(self) -> float:
        """Mean |delta| over every element seen (pixel units)."""
        return self.total_abs / (self.total_rows * self.pixels) if self.total_rows else math.nan


# =========================================================================== means over victim seeds


def aggregate_victims(victims: Sequence[Mapping], tasks: Sequence[str]) -> dict:
    """``{"clean", "protected", "drop", "drop_std"}`` over checked victims (see :func:`build_report`).

    Args:
        victims: ``[{"seed", "clean", "protected", "drop"}]`` as :func:`build_report` checks them.
        tasks: the report's task order; a task appears in ``per_task`` when any victim has it.
    """
    out: dict[str, Any] = {side: _mean_scores([v[side] for v in victims], tasks) for side in SIDES}
    drops = _defined([v["drop"] for v in victims])
    out["drop"] = float(np.mean(drops)) if drops else None
    out["drop_std"] = float(np.std(drops, ddof=1)) if len(drops) >= 2 else None
    return out


def _defined(values: Sequence[Any]) -> list[float]:
    """The finite numbers among ``values`` (None, NaN and infinities are undefined)."""
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _mean_defined(values: Sequence[Any]) -> float | None:
    """Mean of the defined entries of ``values``; None when there are none."""
    defined = _defined(values)
    return float(np.mean(defined)) if defined else None


def _mean_scores(scores: Sequence[Mapping], tasks: Sequence[str]) -> dict:
    """``{"mean", "per_task"}``: the mean over ``scores`` of each field, ignoring undefined entries."""
    per_task = {
        task: _mean_defined([s["per_task"].get(task) for s in scores])
        for task in tasks
        if any(task in s["per_task"] for s in scores)
    }
    return {"mean": _mean_defined([s["mean"] for s in scores]), "per_task": per_task}


def published_check(published, protected, clean, rows_per_chunk: int = 1024) -> dict:
    """How the training cache read back from the published files compares with the protected cache
    the export wrote (same rows, same order) and the clean cache: ``mean``/``max_abs_diff_vs_protected_cache``
    in levels, the perturbation each carries (``mean_abs_delta_*``: mean |images - clean|) and their
    correlation (``delta_correlation``: 1 when the files give back the cache's perturbation)."""
    stems = lambda cache: [str(Path(rel).with_suffix("")) for rel in cache.manifest.get("row_files", [])]  # noqa: E731
    out = {"train_cache": str(published.path), "count": len(published), "protected_count": len(protected)}
    if len(published) != len(protected) or stems(published) != stems(protected):
        out["note"] = "the published training split does not hold the protected cache's rows in order; not compared"
        return out
    total = diff_sum = files_sum = cache_sum = dot = files_sq = cache_sq = 0.0
    most = 0
    for start in range(0, len(published), rows_per_chunk):
        stop = start + rows_per_chunk
        x = np.asarray(clean.images[start:stop], dtype=np.float64)
        files = np.asarray(published.images[start:stop], dtype=np.float64)
        cache = np.asarray(protected.images[start:stop], dtype=np.float64)
        d_files, d_cache = files - x, cache - x
        total += files.size
        diff_sum += np.abs(files - cache).sum()
        most = max(most, int(np.abs(files - cache).max()))
        files_sum += np.abs(d_files).sum()
        cache_sum += np.abs(d_cache).sum()
        dot += (d_files * d_cache).sum()
        files_sq += (d_files**2).sum()
        cache_sq += (d_cache**2).sum()
    out.update(
        mean_abs_diff_vs_protected_cache=diff_sum / max(total, 1), max_abs_diff_vs_protected_cache=most,
        mean_abs_delta_files=files_sum / max(total, 1), mean_abs_delta_cache=cache_sum / max(total, 1),
        delta_correlation=dot / np.sqrt(files_sq * cache_sq) if files_sq and cache_sq else None,
    )  # fmt: skip
    return out
