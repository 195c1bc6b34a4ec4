"""Evaluation metrics of the multi-task models (docs/method.md sections 3 and 7), accumulated on the device.

``update`` only launches device work: no ``.item()``, no ``.cpu()``, no boolean-mask indexing (whose
output size needs a sync), no ``torch.bincount`` (its CUDA kernel reads the maximum back to size its
output; fixed-size ``scatter_add_`` histograms with a sink bin replace it). The host reads the
accumulators once, in ``compute``. Calling ``update`` on several batches gives the same result as one
call on their concatenation.

Data-parallel evaluation: each process updates its metrics with its own share of the samples (each
sample on exactly one process), then calls ``merge_ranks()`` once (collective); ``compute()`` then
gives, on every process, what one process computes over all the samples (integer counts and the AUC
exactly, float64 sums up to the order of the additions).

* :func:`roc_auc`: exact ROC-AUC of many tasks at once.
* :class:`ClassificationMetrics`: per-task accuracy (CelebA, UTKFace, ChestX-ray14) and ROC-AUC of the
  binary tasks (ChestX-ray14).
* :class:`DenseMetrics`: NYUv2 segmentation, depth and surface-normal metrics.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .. import dist
from .losses import SEG_IGNORE, TaskLayout

__all__ = ["roc_auc", "ClassificationMetrics", "DenseMetrics", "ANGLE_BIN_DEG", "NORMAL_THRESHOLDS_DEG"]

ANGLE_BIN_DEG = 0.01  # width of the normal-angle histogram bins (the median's resolution)
NORMAL_THRESHOLDS_DEG = (11.25, 22.5, 30.0)


def roc_auc(scores: Tensor, labels: Tensor) -> Tensor:
    """Exact ROC-AUC of each column: ``scores [N, K]`` (higher = more positive), ``labels [N, K]``
    (positive where ``> 0``) -> float64 ``[K]`` on the input's device.

    The AUC is the Mann-Whitney statistic ``U / (n_pos * n_neg)``, where ``U`` counts the
    (positive, negative) pairs ordered correctly and a tie counts 1/2; equivalently
    ``(sum of the positives' ranks - n_pos (n_pos + 1) / 2) / (n_pos n_neg)`` with tied scores given
    their average rank. One sort per task row (all rows at once) and a batched ``torch.searchsorted``
    find each tie group's rank range. NaN for a task whose labels are all one class (or ``N == 0``).
    Scores in half precision or integer types are widened to float64 (exactly); NaN scores are not
    supported.
    """
    if scores.dim() != 2 or labels.shape != scores.shape:
        raise ValueError(f"roc_auc: scores {tuple(scores.shape)} and labels {tuple(labels.shape)} must both be [N, K]")
    n, k = scores.shape
    if n == 0:
        return torch.full((k,), math.nan, dtype=torch.float64, device=scores.device)
    if scores.dtype not in (torch.float32, torch.float64):
        scores = scores.double()
    rows = scores.t().contiguous()  # [K, N]
    ordered, order = torch.sort(rows, dim=1)
    positive = (labels.t() > 0).gather(1, order)  # [K, N], in score order
    first = torch.searchsorted(ordered, ordered, side="left")  # 0-based start of each value's tie group
    past = torch.searchsorted(ordered, ordered, side="right")  # 0-based end (exclusive)
    average_rank = (first + past + 1).double() / 2  # 1-based ranks first+1 .. past, averaged
    n_pos = positive.sum(1, dtype=torch.float64)
    n_neg = n - n_pos
    rank_sum = torch.where(positive, average_rank, 0.0).sum(1)
    u = rank_sum - n_pos * (n_pos + 1) / 2
    defined = (n_pos > 0) & (n_neg > 0)
    return torch.where(defined, u / (n_pos * n_neg).clamp_min(1), math.nan)


class ClassificationMetrics:
    """Per-task accuracy and (optionally) ROC-AUC of a fused classification head.

    ``update(logits, labels)``: logits ``[B, sum(output_layout(num_classes))]``, labels int ``[B, K]``
    (see :mod:`mtlue_fast.mtl.losses`). A binary task predicts positive where its logit ``> 0``; a
    multi-class task predicts the argmax of its columns. With ``auc=True`` the binary tasks' logits
    (as float32) and labels are kept on ``device`` until ``compute``, which concatenates them and calls
    :func:`roc_auc`. Inputs are moved to ``device``.

    ``compute()`` returns host values::

        {"task_names": [str] * K,
         "accuracy": [float] * K, "mean_accuracy": float,           # fractions in [0, 1]
         "auc": [float | None] * K, "mean_auc": float,               # only with auc=True
         "primary": mean_auc if auc else mean_accuracy}

    A task's AUC is None when undefined: multi-class tasks always, binary tasks whose labels seen so far
    are all one class. ``mean_auc`` averages the defined ones (NaN if none is) and a warning names the
    binary tasks left out. Before any update, accuracies are NaN.
    """

    def __init__(
        self,
        num_classes: Sequence[int],
        *,
        task_names: Sequence[str] | None = None,
        auc: bool = False,
        device: str | torch.device = "cpu",
    ):
        self.layout = TaskLayout(num_classes)
        k = self.layout.num_tasks
        if task_names is not None and len(task_names) != k:
            raise ValueError(f"{len(task_names)} task names for {k} tasks")
        self.task_names = list(task_names) if task_names is not None else [f"task{i}" for i in range(k)]
        self.auc = bool(auc)
        if self.auc and not self.layout.binary_tasks:
            warnings.warn("ClassificationMetrics(auc=True): no binary task, every AUC is undefined", stacklevel=2)
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self._correct = torch.zeros(self.layout.num_tasks, dtype=torch.int64, device=self.device)
        self._count = 0  # samples seen: a python int from the batch shapes, no device read
        self._scores: list[Tensor] = []
        self._labels: list[Tensor] = []

    @torch.no_grad()
    def update(self, logits: Tensor, labels: Tensor) -> None:
        """Accumulate one batch (no host sync)."""
        layout = self.layout
        layout.check(logits, labels)
        logits = logits.detach().to(self.device)
        labels = labels.to(self.device)
        columns, tasks, order = layout.indices(self.device)
        parts = []
        if layout.binary_tasks:
            binary_scores = logits.index_select(1, columns)
            binary_labels = labels.index_select(1, tasks) > 0
            parts.append(((binary_scores > 0) == binary_labels).sum(0))
            if self.auc:
                self._scores.append(binary_scores.float())
                self._labels.append(binary_labels)
        for k, start, stop in layout.multi:
            parts.append((logits[:, start:stop].argmax(1) == labels[:, k]).sum().reshape(1))
        self._correct += torch.cat(parts).index_select(0, order)
        self._count += logits.shape[0]

    @torch.no_grad()
    def merge_ranks(self) -> None:
        """Replace this process's accumulators by those of all processes together (collective: every
        rank calls it once, after its last update; a no-op for one process). The correct counts and
        the sample count are summed; with ``auc=True`` the binary tasks' scores and labels of every
        rank are gathered (in rank order: the AUC depends only on the multiset of pairs)."""
        if not dist.info().distributed:
            return
        sums = torch.cat([self._correct, torch.tensor([self._count], dtype=torch.int64, device=self.device)])
        dist.all_reduce_sum(sums)
        self._correct, self._count = sums[:-1].clone(), int(sums[-1])
        binary = len(self.layout.binary_tasks)
        if self.auc and binary:
            if self._scores:
                mine = torch.cat([torch.cat(self._scores), torch.cat(self._labels).float()], dim=1)
            else:
                mine = torch.zeros((0, 2 * binary), dtype=torch.float32, device=self.device)
            # One gather of float32 [n_r, 2 * binary]: the scores, then the 0/1 labels (exact in float32).
            every = dist.gather_rows(mine, dist.row_counts(mine.shape[0], device=self.device))
            self._scores, self._labels = [every[:, :binary]], [every[:, binary:] > 0]

    def compute(self) -> dict:
        """Host values of the metrics so far (see the class docstring)."""
        n = self._count
        correct = self._correct.tolist()
        accuracy = [c / n if n else math.nan for c in correct]
        result: dict = {
            "task_names": list(self.task_names),
            "accuracy": accuracy,
            "mean_accuracy": sum(accuracy) / len(accuracy),
        }
        if self.auc:
            auc: list[float | None] = [None] * self.layout.num_tasks
            if self._scores:
                values = roc_auc(torch.cat(self._scores), torch.cat(self._labels)).tolist()
                for k, value in zip(self.layout.binary_tasks, values):
                    auc[k] = None if math.isnan(value) else value
            undefined = [self.task_names[k] for k in self.layout.binary_tasks if auc[k] is None]
            if undefined:
                warnings.warn(
                    f"AUC undefined (labels all one class) for tasks {undefined}: left out of mean_auc",
                    stacklevel=2,
                )
            defined = [a for a in auc if a is not None]
            result["auc"] = auc
            result["mean_auc"] = sum(defined) / len(defined) if defined else math.nan
            result["primary"] = result["mean_auc"]
        else:
            result["primary"] = result["mean_accuracy"]
        return result


class DenseMetrics:
    """NYUv2 metrics: segmentation mIoU / pixel accuracy, depth errors, surface-normal angle errors.

    ``update(outputs, labels)`` with the dicts of :class:`mtlue_fast.mtl.losses.DenseLoss`
    (``outputs["segmentation"] [B, C, H, W]`` logits, ``["depth"] [B, 1, H, W]``, ``["normal"]
    [B, 3, H, W]``; ``labels["seg"] [B, H, W]`` with -1 = ignore, ``["depth"]`` 0 = missing,
    ``["normal"]`` all-zero = missing). Inputs are moved to ``device``.

    ``compute()`` returns host floats over all valid pixels seen (NaN where a task had none):

    * ``miou``: mean over classes with a non-empty union of ``TP / (TP + FP + FN)``, from a ``C x C``
      confusion matrix of the labelled pixels (fraction in [0, 1]); ``pixel_accuracy``: its trace over
      its total (fraction);
    * ``depth_abs_error``: mean ``|pred - gt|`` (label units, metres); ``depth_rel_error``: mean
      ``|pred - gt| / gt`` (fraction), both over pixels with ``gt > 0``;
    * ``normal_angle_mean`` / ``normal_angle_median`` (degrees) of the angle between prediction and
      label, ``atan2(|p x g|, p . g)`` (scale-free and accurate near 0; 90 for a zero prediction),
      over pixels whose label vector is not all zero; ``normal_within_11_25``, ``normal_within_22_5``,
      ``normal_within_30``: percent of those pixels with angle ``<`` threshold;
    * ``primary``: ``miou``.

    Sums (depth errors, angle sum) accumulate in float64 and counts in int64, so means are exact up to
    float rounding. The median is read from a histogram of ``angle_bin_deg``-wide bins over [0, 180]
    degrees (default 0.01, 18,000 bins): it reports the centre of the bin holding the median (the mean
    of two such centres for an even count), within ``angle_bin_deg / 2`` of the exact median.
    """

    def __init__(
        self,
        num_classes: int = 13,
        *,
        device: str | torch.device = "cpu",
        angle_bin_deg: float = ANGLE_BIN_DEG,
    ):
        if num_classes < 1 or angle_bin_deg <= 0:
            raise ValueError("DenseMetrics needs num_classes >= 1 and angle_bin_deg > 0")
        self.num_classes = int(num_classes)
        self.angle_bin_deg = float(angle_bin_deg)
        self.num_bins = math.ceil(180.0 / self.angle_bin_deg)
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        zeros = lambda n, dtype: torch.zeros(n, dtype=dtype, device=self.device)  # noqa: E731
        c = self.num_classes
        self._confusion = zeros(c * c + 1, torch.int64)  # row-major [gt, pred], last bin = ignored pixels
        self._depth = zeros(2, torch.float64)  # sum |pred - gt|, sum |pred - gt| / gt
        self._depth_count = zeros((), torch.int64)
        self._angle_sum = zeros((), torch.float64)
        self._within = zeros(len(NORMAL_THRESHOLDS_DEG), torch.int64)
        self._histogram = zeros(self.num_bins + 1, torch.int64)  # last bin = missing normals
        # made here, not per update: a blocking host-to-device copy would synchronise
        self._thresholds = torch.tensor(NORMAL_THRESHOLDS_DEG, device=self.device).reshape(-1, 1)

    @torch.no_grad()
    def update(self, outputs: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> None:
        """Accumulate one batch (no host sync). Tasks missing from ``outputs`` (a single-task model) are
        skipped; their metrics stay NaN if never updated."""
        dev = self.device
        if "segmentation" in outputs:
            self._update_segmentation(outputs["segmentation"].detach().to(dev), labels["seg"].to(dev))
        if "depth" in outputs:
            self._update_depth(outputs["depth"].detach().to(dev), labels["depth"].to(dev))
        if "normal" in outputs:
            self._update_normal(outputs["normal"].detach().to(dev), labels["normal"].to(dev))

    def _update_segmentation(self, logits: Tensor, seg: Tensor) -> None:
        c = self.num_classes
        if logits.dim() != 4 or logits.shape[1] != c or seg.shape != logits.shape[:1] + logits.shape[2:]:
            raise ValueError(
                f"segmentation logits {tuple(logits.shape)} / labels {tuple(seg.shape)}: expected [B, {c}, H, W] / [B, H, W]"
            )
        gt = seg.long()
        cell = torch.where(gt != SEG_IGNORE, gt * c + logits.argmax(1), c * c)
        self._confusion.scatter_add_(0, cell.reshape(-1), torch.ones_like(cell).reshape(-1))

    def _update_depth(self, pred: Tensor, gt: Tensor) -> None:
        if pred.shape != gt.shape:
            raise ValueError(f"depth prediction {tuple(pred.shape)} and label {tuple(gt.shape)} differ")
        gt = gt.float()
        valid = gt > 0
        error = (pred.float() - gt).abs()
        zero = torch.zeros((), device=gt.device)
        absolute = torch.where(valid, error, zero).sum(dtype=torch.float64)
        relative = torch.where(valid, error / torch.where(valid, gt, 1.0), zero).sum(dtype=torch.float64)
        self._depth += torch.stack([absolute, relative])
        self._depth_count += valid.sum()

    def _update_normal(self, pred: Tensor, gt: Tensor) -> None:
        if pred.shape != gt.shape or pred.dim() != 4 or pred.shape[1] != 3:
            raise ValueError(
                f"normal prediction {tuple(pred.shape)} / label {tuple(gt.shape)}: expected both [B, 3, H, W]"
            )
        pred, gt = pred.float(), gt.float()
        valid = (gt != 0).any(dim=1)  # [B, H, W]
        cross = torch.linalg.cross(pred, gt, dim=1).norm(dim=1)
        dot = (pred * gt).sum(1)
        angle = torch.rad2deg(torch.atan2(cross, dot))  # [B, H, W], degrees in [0, 180]
        angle = torch.where((pred != 0).any(dim=1), angle, 90.0)  # a zero prediction is orthogonal to all
        zero = torch.zeros((), device=angle.device)
        self._angle_sum += torch.where(valid, angle, zero).sum(dtype=torch.float64)
        within = valid.reshape(1, -1) & (angle.reshape(1, -1) < self._thresholds)
        self._within += within.sum(1)
        bins = (angle / self.angle_bin_deg).long().clamp_(0, self.num_bins - 1)
        bins = torch.where(valid, bins, self.num_bins).reshape(-1)
        self._histogram.scatter_add_(0, bins, torch.ones_like(bins))

    @torch.no_grad()
    def merge_ranks(self) -> None:
        """Replace this process's accumulators by their sums over all processes (collective: every
        rank calls it once, after its last update; a no-op for one process): one all-reduce of the
        int64 counts, one of the float64 sums."""
        if not dist.info().distributed:
            return
        counts = [self._confusion, self._depth_count, self._within, self._histogram]
        flat = dist.all_reduce_sum(torch.cat([t.reshape(-1) for t in counts]))
        self._confusion, self._depth_count, self._within, self._histogram = (
            part.clone().reshape(t.shape) for part, t in zip(flat.split([t.numel() for t in counts]), counts)
        )
        sums = dist.all_reduce_sum(torch.cat([self._depth, self._angle_sum.reshape(1)]))
        self._depth, self._angle_sum = sums[:2].clone(), sums[2].clone()

    def compute(self) -> dict:
        """Host values of the metrics so far (see the class docstring)."""
        c = self.num_classes
        confusion = self._confusion[: c * c].reshape(c, c).double().cpu()
        true_positive = confusion.diagonal()
        union = confusion.sum(0) + confusion.sum(1) - true_positive
        present = union > 0
        labelled = confusion.sum().item()
        miou = (true_positive[present] / union[present]).mean().item() if present.any() else math.nan
        pixel_accuracy = true_positive.sum().item() / labelled if labelled else math.nan

        depth_sums = self._depth.tolist()
        depth_count = int(self._depth_count.item())
        histogram = self._histogram[: self.num_bins].cpu()
        normal_count = int(histogram.sum().item())
        within = self._within.tolist()
        per_normal = (lambda x: x / normal_count) if normal_count else (lambda x: math.nan)
        per_depth = (lambda x: x / depth_count) if depth_count else (lambda x: math.nan)
        result = {
            "miou": miou,
            "pixel_accuracy": pixel_accuracy,
            "depth_abs_error": per_depth(depth_sums[0]),
            "depth_rel_error": per_depth(depth_sums[1]),
            "normal_angle_mean": per_normal(self._angle_sum.item()),
            "normal_angle_median": self._histogram_median(histogram, normal_count),
        }
        for threshold, count in zip(NORMAL_THRESHOLDS_DEG, within):
            result[f"normal_within_{threshold:g}".replace(".", "_")] = 100.0 * per_normal(count)
        result["primary"] = miou
        return result

    def _histogram_median(self, histogram: Tensor, count: int) -> float:
        """Median of ``count`` angles binned in ``histogram``: centre(s) of the bin(s) of the middle
        order statistic(s)."""
        if count == 0:
            return math.nan
        cumulative = histogram.cumsum(0)
        middle = torch.tensor([(count + 1) // 2, count // 2 + 1])  # 1-based ranks; equal when count is odd
        bins = torch.searchsorted(cumulative, middle).double()  # first bin whose cumulative count reaches each rank
        return ((bins + 0.5) * self.angle_bin_deg).mean().item()
