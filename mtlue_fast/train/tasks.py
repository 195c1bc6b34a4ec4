"""What a training run sees of a cache: the selected tasks' labels, their layout and the crop.

MTL victims use every task; an STL victim (or a partial run) selects some. Classification labels
are columns of ``[N, K]``; NYUv2's dense tasks are label maps named differently from the tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..data.specs import NYUV2_SEG_CLASSES, get_spec

#: NYUv2 task -> (label array in the cache, output channels)
DENSE_TASKS = {"segmentation": ("seg", NYUV2_SEG_CLASSES), "depth": ("depth", 1), "normal": ("normal", 3)}


@dataclass(frozen=True)
class TaskView:
    """One cache restricted to some tasks.

    Attributes:
        images: uint8 ``[N, C, H, W]`` (memory map).
        labels: int64 ``[N, K']`` of the selected tasks, or (dense) the selected label maps by name.
        task_names, num_classes: of the selected tasks, in cache order.
        dense: NYUv2-style per-pixel labels.
        crop: the victim's crop ``(h, w)`` at this cache's resolution.
        identity: the cache's digest (so a run knows when its data changed).
    """

    images: np.ndarray
    labels: np.ndarray | dict[str, np.ndarray]
    task_names: tuple[str, ...]
    num_classes: tuple[int, ...]
    dense: bool
    crop: tuple[int, int]
    identity: str

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)


def select_tasks(cache, tasks: Sequence[int | str] | None = None, crop: tuple[int, int] | None = None) -> TaskView:
    """The :class:`TaskView` of ``cache`` (a :class:`mtlue_fast.data.Cache` or anything with its
    ``images``, ``labels``, ``task_names``, ``num_classes``, ``manifest``) for ``tasks`` (indices or
    names; None = all). ``crop`` None takes the dataset's victim crop scaled to the cache's size."""
    names = list(cache.task_names)
    if tasks is None:
        index = list(range(len(names)))
    else:
        index = []
        for task in tasks:
            if isinstance(task, str):
                if task not in names:
                    raise ValueError(f"unknown task {task!r}; this dataset has {', '.join(names)}")
                index.append(names.index(task))
            elif isinstance(task, (int, np.integer)) and 0 <= task < len(names):
                index.append(int(task))
            else:
                raise ValueError(f"task index {task!r} out of range [0, {len(names)})")
        if not index or len(set(index)) != len(index):
            raise ValueError(f"tasks must be a non-empty list without repeats, got {list(tasks)}")
    dataset = cache.manifest.get("dataset")
    dense = isinstance(cache.labels, dict)
    if dense:
        labels = {DENSE_TASKS[names[i]][0]: cache.labels[DENSE_TASKS[names[i]][0]] for i in index}
    else:
        labels = np.asarray(cache.labels)[:, index] if len(index) != len(names) else np.asarray(cache.labels)
    return TaskView(
        images=cache.images,
        labels=labels,
        task_names=tuple(names[i] for i in index),
        num_classes=tuple(int(cache.num_classes[i]) for i in index),
        dense=dense,
        crop=tuple(crop) if crop is not None else victim_crop(dataset, cache.images.shape[-2:]),
        identity=str(cache.manifest.get("source_digest") or cache.manifest.get("digest") or ""),
    )


def victim_crop(dataset: str | None, size: Sequence[int]) -> tuple[int, int]:
    """The dataset's victim crop scaled to a cache of ``size (H, W)`` (docs/method.md section 2: CelebA 64 of 70,
    ChestX-ray 224 of 256, UTKFace 128 of 140, NYUv2 the whole image); the full size if unknown."""
    height, width = int(size[0]), int(size[1])
    if dataset is None:
        return height, width
    spec = get_spec(dataset)
    cache_h, cache_w = spec.resize.size
    crop_h, crop_w = spec.crop
    return max(1, min(height, round(height * crop_h / cache_h))), max(1, min(width, round(width * crop_w / cache_w)))
