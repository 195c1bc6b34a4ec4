"""Base objectives of unlearnable-example methods (docs/method.md section 5): EM, TAP and SEP.

Each is a loss the perturbation *minimises*, from the surrogate's fused logits
``[B, sum(num_outputs)]`` on the perturbed, augmented batch:

- ``em`` (error-minimising): ``sum_k L_k(f(x'), y_k)``: make the true labels trivially easy.
- ``tap`` (targeted adversarial poisoning): binary tasks ``-L_k(f(x'), y_k)`` (untargeted: push the
  frozen clean surrogate away from the truth, as in the paper's experiments) or, with
  ``targeted=True``, ``L_k(f(x'), 1 - y_k)``; multi-class tasks ``L_k(f(x'), (y_k + floor(C/2)) mod C)``.
- ``sep`` (self-ensemble protection): TAP's loss averaged over the checkpoints of one clean training.

``L_k`` is the victim's per-task loss (BCE-with-logits / cross-entropy). Tasks left learnable by
partial protection are left out of the sum. NYUv2 (dense): EM minimises and TAP/SEP maximise the
sum of the dense task losses (no targets and no error rate: such runs stop after ``max_passes``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .settings import BASES
from ..mtl.losses import ClassificationLoss, DenseLoss, output_layout

#: (stop when the error on true labels is <= this (EM) / >= this (TAP, SEP), default pass cap)
STOP_RULES = {"em": (0.01, 100), "tap": (0.9, 100), "sep": (0.99, 50)}


def shifted_labels(labels: torch.Tensor, num_classes: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """TAP's targets ``[B, K]``: ``1 - y`` for binary tasks, ``(y + floor(C/2)) mod C`` otherwise.
    ``num_classes``: ``[K]`` ints, best a tensor already on the labels' device (a sequence is copied
    there on every call)."""
    classes = torch.as_tensor(num_classes, device=labels.device)
    return (labels + classes // 2) % classes


class Objective:
    """``L_base`` of one base method for a classification or dense dataset.

    Args:
        base: ``"em"``, ``"tap"`` or ``"sep"``.
        num_classes: classes per task (dense: ignored, pass ``dense=True``).
        targeted: binary TAP/SEP tasks minimise the loss to ``1 - y`` instead of maximising it to ``y``.
        protected: indices of the tasks the perturbation works on (None = all).
        dense: NYUv2-style outputs and labels (dicts).
    """

    def __init__(
        self,
        base: str,
        num_classes: Sequence[int],
        *,
        targeted: bool = False,
        protected: Sequence[int] | None = None,
        dense: bool = False,
    ) -> None:
        if base not in BASES:
            raise ValueError(f"base method must be one of {', '.join(BASES)}, got {base!r}")
        self.base, self.targeted, self.dense = base, targeted, dense
        self.num_classes = tuple(int(c) for c in num_classes)
        k = len(self.num_classes)
        chosen = list(range(k)) if protected is None else sorted(set(int(t) for t in protected))
        if not chosen or not all(0 <= t < k for t in chosen):
            raise ValueError(f"protected tasks must be a non-empty subset of 0..{k - 1}, got {protected}")
        self.protected = chosen
        mask = torch.zeros(k)
        mask[chosen] = 1.0
        self._mask = mask
        # Copies of the per-task constants on each device used: copied once, not on every step
        # (a copy from pageable host memory waits for the device, and cannot be captured in a graph).
        self._on_device: dict[torch.device, dict[str, torch.Tensor]] = {}
        if dense:
            self._loss = DenseLoss()
            return
        self._loss = ClassificationLoss(self.num_classes)
        binary = torch.tensor([c == 2 for c in self.num_classes])
        # Per-task sign of the true-label loss and of the target loss in L_base.
        if base == "em":
            true_sign, target_sign = torch.ones(k), torch.zeros(k)
        elif targeted:
            true_sign, target_sign = torch.zeros(k), torch.ones(k)
        else:
            true_sign, target_sign = torch.where(binary, -1.0, 0.0), torch.where(binary, 0.0, 1.0)
        self._true_sign, self._target_sign = true_sign * mask, target_sign * mask
        self._uses_targets = bool(target_sign.any())

    @property
    def stop_error(self) -> float:
        return STOP_RULES[self.base][0]

    @property
    def max_passes(self) -> int:
        return STOP_RULES[self.base][1]

    def _constants(self, device: torch.device) -> dict[str, torch.Tensor]:
        """``mask``, ``true_sign``, ``target_sign`` (float ``[K]``) and ``classes`` (int64 ``[K]``) on ``device``."""
        constants = self._on_device.get(device)
        if constants is None:
            host = {"mask": self._mask, "classes": torch.tensor(self.num_classes, dtype=torch.int64)}
            if not self.dense:
                host.update(true_sign=self._true_sign, target_sign=self._target_sign)
            constants = self._on_device[device] = {name: t.to(device) for name, t in host.items()}
        return constants

    def loss(self, outputs, labels) -> torch.Tensor:
        """Scalar ``L_base`` for one surrogate's outputs (fused logits, or a dict for dense)."""
        if self.dense:
            per_task = self._loss(outputs, labels)
            mask = self._constants(per_task.device)["mask"]
            return (per_task * mask).sum() * (1.0 if self.base == "em" else -1.0)
        true_losses = self._loss(outputs, labels)
        constants = self._constants(true_losses.device)
        total = (constants["true_sign"] * true_losses).sum()
        if self._uses_targets:
            target_losses = self._loss(outputs, shifted_labels(labels, constants["classes"]))
            total = total + (constants["target_sign"] * target_losses).sum()
        return total

    def ensemble_loss(self, outputs_per_model: Sequence, labels) -> torch.Tensor:
        """SEP: the mean of :meth:`loss` over the checkpoints' outputs."""
        return sum(self.loss(o, labels) for o in outputs_per_model) / len(outputs_per_model)

    def errors(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``[K]`` per-task error counts w.r.t. the true labels (on the device; divide by B)."""
        columns = output_layout(self.num_classes)
        errors, start = [], 0
        for k, width in enumerate(columns):
            block = logits[:, start : start + width]
            predicted = (block[:, 0] > 0).long() if width == 1 else block.argmax(1)
            errors.append((predicted != labels[:, k]).sum())
            start += width
        return torch.stack(errors)

    def mean_error(self, error_counts: torch.Tensor, count: int) -> float:
        """Mean error rate over the protected tasks (one host read), NaN for dense datasets."""
        if self.dense or count == 0:
            return math.nan
        return float(error_counts[self.protected].double().mean() / count)

    def should_stop(self, error: float) -> bool:
        """EM: the surrogate already fits the poisons; TAP/SEP: it is fooled enough."""
        if math.isnan(error):
            return False
        return error <= self.stop_error if self.base == "em" else error >= self.stop_error
