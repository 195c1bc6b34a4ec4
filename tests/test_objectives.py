"""EM / TAP / SEP base losses: signs, targets, partial protection, error counts and stop rules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtlue_fast.ue.objectives import Objective, shifted_labels

CLASSES = (2, 9, 2)  # two binary tasks around a 9-class one: logits [B, 1 + 9 + 1]


def _batch(gen, b=6):
    logits = torch.randn(b, 11, generator=gen, dtype=torch.float64)
    labels = torch.stack([torch.randint(0, c, (b,), generator=gen) for c in CLASSES], 1)
    return logits, labels


def _task_losses(logits, labels):
    return [
        F.binary_cross_entropy_with_logits(logits[:, 0], labels[:, 0].double()),
        F.cross_entropy(logits[:, 1:10], labels[:, 1]),
        F.binary_cross_entropy_with_logits(logits[:, 10], labels[:, 2].double()),
    ]


def test_shifted_labels():
    labels = torch.tensor([[0, 0, 1], [1, 8, 0], [1, 4, 1]])
    assert shifted_labels(labels, CLASSES).tolist() == [[1, 4, 0], [0, 3, 1], [0, 8, 0]]


def test_em_minimises_the_true_label_losses(gen):
    logits, labels = _batch(gen)
    expected = sum(_task_losses(logits, labels))
    torch.testing.assert_close(Objective("em", CLASSES).loss(logits, labels), expected.float(), rtol=1e-5, atol=1e-6)


def test_tap_untargeted_binary_and_shifted_multiclass(gen):
    logits, labels = _batch(gen)
    true = _task_losses(logits, labels)
    shifted = _task_losses(logits, shifted_labels(labels, CLASSES))
    expected = -true[0] + shifted[1] - true[2]
    torch.testing.assert_close(Objective("tap", CLASSES).loss(logits, labels), expected.float(), rtol=1e-5, atol=1e-6)
    targeted = Objective("tap", CLASSES, targeted=True).loss(logits, labels)
    torch.testing.assert_close(targeted, sum(shifted).float(), rtol=1e-5, atol=1e-6)


def test_partial_protection_leaves_tasks_out(gen):
    logits, labels = _batch(gen)
    true = _task_losses(logits, labels)
    torch.testing.assert_close(Objective("em", CLASSES, protected=[2]).loss(logits, labels), true[2].float(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="protected tasks"):
        Objective("em", CLASSES, protected=[3])


def test_sep_averages_the_checkpoints(gen):
    (a, labels), (b, _) = _batch(gen), _batch(gen)
    objective = Objective("sep", CLASSES)
    torch.testing.assert_close(objective.ensemble_loss([a, b], labels), (objective.loss(a, labels) + objective.loss(b, labels)) / 2)


def test_errors_and_stop_rules():
    logits = torch.tensor([[2.0] + [0.0] * 8 + [5.0] + [-1.0], [-2.0] + [9.0] + [0.0] * 8 + [1.0]])
    labels = torch.tensor([[1, 8, 0], [1, 0, 1]])
    objective = Objective("em", CLASSES)
    assert objective.errors(logits, labels).tolist() == [1, 0, 0]
    assert objective.mean_error(objective.errors(logits, labels), 2) == pytest.approx(1 / 6)
    assert Objective("em", CLASSES).should_stop(0.005) and not Objective("em", CLASSES).should_stop(0.2)
    assert Objective("tap", CLASSES).should_stop(0.95) and not Objective("tap", CLASSES).should_stop(0.5)
    assert not Objective("sep", CLASSES).should_stop(math.nan)
    with pytest.raises(ValueError, match="base method"):
        Objective("pgd", CLASSES)


@pytest.mark.parametrize("base", ["em", "tap", "sep"])
def test_loss_copies_its_constants_to_the_device_once(gen, monkeypatch, base):
    """The per-task signs, mask and class counts reach the outputs' device on the first call only: a
    copy from host memory on every generator step would wait for the GPU and break graph capture."""
    logits, labels = _batch(gen)
    objective = Objective(base, CLASSES)
    first = objective.loss(logits, labels)
    made = []
    to, as_tensor, tensor = torch.Tensor.to, torch.as_tensor, torch.tensor
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: made.append("Tensor.to") or to(self, *a, **k))
    monkeypatch.setattr(torch, "as_tensor", lambda data, *a, **k: made.append("as_tensor") or as_tensor(data, *a, **k)
                        if not torch.is_tensor(data) else as_tensor(data, *a, **k))  # fmt: skip
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append("tensor") or tensor(*a, **k))
    again = objective.loss(logits, labels)
    monkeypatch.undo()
    assert made == [], f"{base}: host-to-device copies on a later call: {made}"
    torch.testing.assert_close(again, first)
