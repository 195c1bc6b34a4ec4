"""Per-task losses of the multi-task models (docs/method.md section 3).

Classification models emit one fused logit tensor ``[B, sum(num_outputs)]``: a binary task (2 classes)
owns one column (its logit), a task with ``C > 2`` classes owns ``C`` columns. :func:`output_layout`
gives that split; the metrics reuse it. NYUv2 models emit a dict of dense maps (see :class:`DenseLoss`).

Every loss returns a float32 vector of per-task *mean* losses, in task order, whatever the input
precision (bf16 under autocast is upcast first); the weighting strategy combines them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["output_layout", "ClassificationLoss", "DenseLoss", "DENSE_TASKS"]

DENSE_TASKS = ("segmentation", "depth", "normal")  # order of DenseLoss's output and of the model's dict
SEG_IGNORE = -1  # segmentation label of unlabeled pixels


def output_layout(num_classes: Sequence[int]) -> tuple[int, ...]:
    """Number of logit columns of each task: 1 for a binary task (``C == 2``), ``C`` otherwise.

    Raises ValueError for a task with fewer than 2 classes.
    """
    layout = []
    for k, c in enumerate(num_classes):
        c = int(c)
        if c < 2:
            raise ValueError(f"task {k}: {c} classes; a classification task needs at least 2")
        layout.append(1 if c == 2 else c)
    return tuple(layout)


class TaskLayout:
    """Where each task's logits live in the fused tensor, in the shapes the vectorised code wants.

    ``binary_tasks``/``binary_columns``: the binary tasks and their logit column (one per task).
    ``multi``: ``(task, first column, end column)`` of each multi-class task. Per-task results are
    computed as ``cat([all binary tasks, then each multi-class task])``; ``gather_order`` (per device,
    cached) puts such a vector back into task order.
    """

    def __init__(self, num_classes: Sequence[int]):
        self.num_classes = tuple(int(c) for c in num_classes)
        self.num_outputs = output_layout(self.num_classes)
        self.num_tasks = len(self.num_classes)
        self.width = sum(self.num_outputs)
        starts = [sum(self.num_outputs[:k]) for k in range(self.num_tasks)]
        self.binary_tasks = [k for k, n in enumerate(self.num_outputs) if n == 1]
        self.binary_columns = [starts[k] for k in self.binary_tasks]
        self.multi = [(k, starts[k], starts[k] + n) for k, n in enumerate(self.num_outputs) if n > 1]
        computed_order = self.binary_tasks + [k for k, _, _ in self.multi]
        self._task_to_slot = [computed_order.index(k) for k in range(self.num_tasks)]
        self._cache: dict[torch.device, tuple[Tensor, Tensor, Tensor]] = {}

    def indices(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """``(binary_columns, binary_tasks, gather_order)`` as int64 tensors on ``device``."""
        if device not in self._cache:
            as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
            self._cache[device] = (
                as_tensor(self.binary_columns),
                as_tensor(self.binary_tasks),
                as_tensor(self._task_to_slot),
            )
        return self._cache[device]

    def check(self, logits: Tensor, labels: Tensor) -> None:
        """Shape checks (no device sync): logits ``[B, width]``, labels ``[B, K]``."""
        if logits.dim() != 2 or logits.shape[1] != self.width:
            raise ValueError(f"logits {tuple(logits.shape)}: expected [B, {self.width}] for layout {self.num_outputs}")
        if labels.shape != (logits.shape[0], self.num_tasks):
            raise ValueError(f"labels {tuple(labels.shape)}: expected [{logits.shape[0]}, {self.num_tasks}]")


class ClassificationLoss:
    """Per-task mean losses of a fused classification head.

    ``loss(logits, labels)``: logits ``[B, sum(output_layout(num_classes))]`` (any float dtype),
    labels int ``[B, K]`` (binary tasks 0/1, multi-class tasks ``0..C-1``) -> float32 ``[K]``:
    BCE-with-logits for binary tasks (all binary columns in one call), cross-entropy for multi-class
    tasks (one call each), each averaged over the batch. Differentiable; holds no parameters.
    """

    def __init__(self, num_classes: Sequence[int]):
        self.layout = TaskLayout(num_classes)

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        layout = self.layout
        layout.check(logits, labels)
        logits = logits.float()
        columns, tasks, order = layout.indices(logits.device)
        parts = []
        if layout.binary_tasks:
            targets = labels.index_select(1, tasks).float()
            bce = F.binary_cross_entropy_with_logits(logits.index_select(1, columns), targets, reduction="none")
            parts.append(bce.mean(0))
        for k, start, stop in layout.multi:
            parts.append(F.cross_entropy(logits[:, start:stop], labels[:, k].long()).reshape(1))
        return torch.cat(parts).index_select(0, order)


def _masked_mean(values: Tensor, valid: Tensor) -> Tensor:
    """Mean of ``values`` over ``valid`` (same shape); 0 when nothing is valid. No host sync."""
    total = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return total / valid.sum().clamp_min(1)


class DenseLoss:
    """Per-task mean losses on NYUv2 -> float32 ``[3]`` in the order segmentation, depth, normal.

    ``outputs``: ``{"segmentation": [B, 13, H, W] logits, "depth": [B, 1, H, W] (metres),
    "normal": [B, 3, H, W] (unit vectors)}``; ``labels``: ``{"seg": int [B, H, W] with -1 = ignore,
    "depth": float [B, 1, H, W] with 0 = missing, "normal": float [B, 3, H, W] with all-zero = missing}``.

    * segmentation: cross-entropy over the labelled pixels;
    * depth: L1 ``|pred - gt|`` over pixels with ``gt > 0``;
    * normal: ``1 - cos(pred, gt)`` over pixels whose label vector is not all zero (the cosine
      normalises both vectors).

    Each is a mean over that task's valid pixels of the whole batch; a batch with no valid pixel for a
    task gives 0 for it (no NaN, zero gradient). Computed in float32.
    """

    def __call__(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor:
        return torch.stack(
            [
                self.segmentation(outputs["segmentation"], labels["seg"]),
                self.depth(outputs["depth"], labels["depth"]),
                self.normal(outputs["normal"], labels["normal"]),
            ]
        )

    @staticmethod
    def segmentation(logits: Tensor, seg: Tensor) -> Tensor:
        """Cross-entropy of ``logits [B, C, H, W]`` against ``seg [B, H, W]`` (-1 ignored) -> scalar."""
        seg = seg.long()
        total = F.cross_entropy(logits.float(), seg, ignore_index=SEG_IGNORE, reduction="sum")
        return total / (seg != SEG_IGNORE).sum().clamp_min(1)

    @staticmethod
    def depth(pred: Tensor, gt: Tensor) -> Tensor:
        """L1 of ``pred`` against ``gt`` (both ``[B, 1, H, W]``) over ``gt > 0`` -> scalar."""
        gt = gt.float()
        return _masked_mean((pred.float() - gt).abs(), gt > 0)

    @staticmethod
    def normal(pred: Tensor, gt: Tensor) -> Tensor:
        """``1 - cosine`` of ``pred`` and ``gt`` (both ``[B, 3, H, W]``) over non-zero labels -> scalar."""
        gt = gt.float()
        cos = F.cosine_similarity(pred.float(), gt, dim=1)
        return _masked_mean(1.0 - cos, (gt != 0).any(dim=1))
