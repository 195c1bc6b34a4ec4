"""Datasets in their original formats, the uint8 cache, and device-side batches (docs/method.md section 2)."""

from __future__ import annotations

from pathlib import Path

from .formats import READERS
from .records import DatasetFormatError, Records, SkipLog
from .specs import DATASETS, SPECS, DatasetSpec, check_split, get_spec

__all__ = [
    "DATASETS", "SPECS", "Cache", "DatasetFormatError", "DatasetSpec", "Records", "SkipLog",
    "build_cache", "default_cache_root", "get_spec", "load_records", "open_cache",
]  # fmt: skip


def load_records(dataset: str, root: str | Path, split: str, *, strict: bool = False) -> Records:
    """Read one split of ``dataset`` from its original on-disk layout under ``root``.

    Skipped items (malformed rows, missing images, unparseable names) are counted in
    ``records.skipped``; ``strict=True`` raises on the first one instead. An empty split raises.
    """
    get_spec(dataset)
    check_split(split)
    return READERS[dataset](root, split, strict=strict)


from .cache import Cache, build_cache, default_cache_root, open_cache  # noqa: E402  (needs load_records)
