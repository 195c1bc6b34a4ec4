"""A seeded, stratified subset of one split (``--subset N``, ``data.subset``): quick runs on real data.

Strata: the value of the first task's label (CelebA: its first attribute, ChestX-ray14: its first
finding, UTKFace: the age bin); NYUv2's dense labels give no strata, so its subset is a uniform draw.
Each stratum gets its share of ``n`` by largest remainders (ties: the larger stratum, then the
smaller label), and its rows are drawn without replacement from one ``numpy.random.Generator``
seeded with ``(seed, stratum)``. The chosen rows keep the reader's order. The result depends only
on the records' labels and order, ``n`` and ``seed``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .records import Records

__all__ = ["select_rows", "subset_records"]


def select_rows(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Sorted row indices of a stratified subset of ``n`` rows.

    Args:
        labels: int64 ``[N, K]`` class indices (stratified by column 0), or an object array of
            dense-map paths (NYUv2; a uniform draw).
        n: rows wanted; ``n >= N`` gives every row.
        seed: the draw's seed.
    """
    total = len(labels)
    if n < 1:
        raise ValueError(f"subset size must be >= 1, got {n}")
    if n >= total:
        return np.arange(total)
    if labels.dtype == object or labels.ndim != 2 or labels.shape[1] == 0:
        keys = np.zeros(total, dtype=np.int64)
    else:
        keys = np.asarray(labels[:, 0], dtype=np.int64)
    strata, counts = np.unique(keys, return_counts=True)
    quota = counts * n / total
    share = np.floor(quota).astype(np.int64)
    order = sorted(range(len(strata)), key=lambda s: (-(quota[s] - share[s]), -counts[s], strata[s]))
    for s in order[: n - int(share.sum())]:
        share[s] += 1
    chosen = []
    for stratum, take in zip(strata, share):
        rows = np.flatnonzero(keys == stratum)
        rng = np.random.default_rng([seed, int(stratum) & 0x7FFFFFFF])
        chosen.append(rows[rng.permutation(len(rows))[:take]])
    return np.sort(np.concatenate(chosen))


def subset_records(records: Records, n: int, seed: int) -> tuple[Records, dict]:
    """``records`` restricted to :func:`select_rows` and a description for manifests and reports:
    ``{"size": n, "seed": seed, "selected": k, "of": N, "stratified_by": ...}``."""
    rows = select_rows(records.labels, n, seed)
    dense = records.labels.dtype == object
    info = {
        "size": int(n), "seed": int(seed), "selected": int(len(rows)), "of": len(records),
        "stratified_by": None if dense else f"task {records.task_names[0]!r}",
    }  # fmt: skip
    if len(rows) == len(records):
        return records, info
    chosen = replace(records, paths=[records.paths[i] for i in rows], labels=records.labels[rows])
    return chosen, info
