"""What a reader returns: the files of one split, their labels, and what was skipped."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np


class DatasetFormatError(ValueError):
    """The dataset on disk does not have the expected layout (missing root, index file, ...)."""


@dataclass
class SkipLog:
    """Counts of skipped items by reason, with a few examples each, for the one-line summary.

    With ``strict=True`` the first skip raises instead.
    """

    dataset: str
    strict: bool = False
    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, item: str) -> None:
        if self.strict:
            raise DatasetFormatError(f"{self.dataset}: {reason.replace('_', ' ')}: {item} (strict=True)")
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 3:
            shown.append(item)

    def merge(self, other: SkipLog) -> None:
        for reason, count in other.counts.items():
            self.counts[reason] += count
            shown = self.examples.setdefault(reason, [])
            shown.extend(other.examples.get(reason, [])[: 3 - len(shown)])

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """``"celeba: skipped 3 (2 missing images, e.g. 000007.jpg; 1 malformed row, ...)"``."""
        if not self.counts:
            return f"{self.dataset}: nothing skipped"
        parts = [
            f"{n} {reason.replace('_', ' ')}" + (f", e.g. {', '.join(self.examples[reason])}" if self.examples.get(reason) else "")
            for reason, n in sorted(self.counts.items())
        ]
        return f"{self.dataset}: skipped {self.total} ({'; '.join(parts)})"

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": self.examples}


@dataclass
class Records:
    """The files of one split of a dataset and their labels.

    Attributes:
        dataset: dataset name (``celeba``, ``chestxray``, ``utkface``, ``nyuv2``).
        split: ``train`` or ``test``.
        root: the dataset root the paths were found under.
        paths: absolute image paths, ``N`` of them, in a deterministic order.
        labels: int64 ``[N, K]`` class indices (binary tasks 0/1); NYUv2: object ``[N, 3]`` with the
            paths of the segmentation, depth and normal maps of each image.
        task_names: the ``K`` task names in order.
        num_classes: classes per task (NYUv2: 13 segmentation classes, 1 depth, 3 normal channels).
        skipped: what the reader skipped, and why.
    """

    dataset: str
    split: str
    root: str
    paths: list[str]
    labels: np.ndarray
    task_names: list[str]
    num_classes: list[int]
    skipped: SkipLog

    def __len__(self) -> int:
        return len(self.paths)

    def __post_init__(self) -> None:
        if len(self.paths) == 0:
            raise DatasetFormatError(
                f"{self.dataset}: the {self.split} split under {self.root} is empty ({self.skipped.summary()})"
            )
        if len(self.labels) != len(self.paths) or self.labels.shape[1] != len(self.task_names):
            raise ValueError(f"{self.dataset}: labels {self.labels.shape} do not match {len(self.paths)} paths")
