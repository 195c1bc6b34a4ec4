"""mtl.losses: the fused-head layout, per-task classification losses against one functional call per
task, float32 results from bf16 inputs, dense losses against a hand-written masked computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtlue_fast.mtl.losses import ClassificationLoss, DenseLoss, output_layout

NUM_CLASSES = (9, 2, 5, 2, 2, 3)


def random_batch(num_classes, batch, gen):
    layout = output_layout(num_classes)
    logits = torch.randn(batch, sum(layout), generator=gen) * 3
    labels = torch.stack([torch.randint(0, c, (batch,), generator=gen) for c in num_classes], dim=1)
    return logits, labels


def loop_losses(logits, labels, num_classes):
    """One torch.nn.functional call per task, in a Python loop."""
    out, start = [], 0
    for k, c in enumerate(num_classes):
        if c == 2:
            out.append(F.binary_cross_entropy_with_logits(logits[:, start], labels[:, k].float()))
            start += 1
        else:
            out.append(F.cross_entropy(logits[:, start : start + c], labels[:, k]))
            start += c
    return torch.stack(out)


def test_output_layout():
    assert output_layout([9, 5, 2]) == (9, 5, 1)
    assert output_layout([2] * 4) == (1, 1, 1, 1)
    assert output_layout([]) == ()
    with pytest.raises(ValueError):
        output_layout([3, 1])


@pytest.mark.parametrize("num_classes", [NUM_CLASSES, (2, 2, 2), (4, 7)])
def test_classification_loss_matches_per_task_calls(num_classes, gen):
    logits, labels = random_batch(num_classes, 33, gen)
    got = ClassificationLoss(num_classes)(logits, labels)
    assert got.shape == (len(num_classes),) and got.dtype == torch.float32
    torch.testing.assert_close(got, loop_losses(logits, labels, num_classes))


def test_classification_loss_bf16_gives_float32_and_gradients(gen):
    logits, labels = random_batch(NUM_CLASSES, 16, gen)
    low = logits.bfloat16().requires_grad_()
    got = ClassificationLoss(NUM_CLASSES)(low, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, loop_losses(low.detach().float(), labels, NUM_CLASSES))
    got.sum().backward()
    assert low.grad is not None and low.grad.dtype == torch.bfloat16 and low.grad.abs().sum() > 0


def test_classification_loss_gradient_matches_loop(gen):
    logits, labels = random_batch(NUM_CLASSES, 12, gen)
    weights = torch.rand(len(NUM_CLASSES), generator=gen)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    (ClassificationLoss(NUM_CLASSES)(a, labels) * weights).sum().backward()
    (loop_losses(b, labels, NUM_CLASSES) * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_classification_loss_rejects_wrong_shapes(gen):
    logits, labels = random_batch(NUM_CLASSES, 4, gen)
    loss = ClassificationLoss(NUM_CLASSES)
    with pytest.raises(ValueError):
        loss(logits[:, :-1], labels)
    with pytest.raises(ValueError):
        loss(logits, labels[:, :-1])


def dense_batch(gen, batch=2, h=6, w=7, classes=13):
    outputs = {
        "segmentation": torch.randn(batch, classes, h, w, generator=gen),
        "depth": torch.rand(batch, 1, h, w, generator=gen) * 5,
        "normal": F.normalize(torch.randn(batch, 3, h, w, generator=gen), dim=1),
    }
    seg = torch.randint(-1, classes, (batch, h, w), generator=gen).to(torch.int8)
    depth = torch.rand(batch, 1, h, w, generator=gen) * 5 + 0.1
    depth[torch.rand(depth.shape, generator=gen) < 0.3] = 0
    normal = F.normalize(torch.randn(batch, 3, h, w, generator=gen), dim=1)
    normal = normal * (torch.rand(batch, 1, h, w, generator=gen) > 0.3)
    labels = {"seg": seg, "depth": depth.half(), "normal": normal.half()}
    return outputs, labels


def test_dense_loss_matches_masked_reference(gen):
    outputs, labels = dense_batch(gen)
    got = DenseLoss()(outputs, labels)
    assert got.shape == (3,) and got.dtype == torch.float32

    seg = labels["seg"].long()
    keep = seg >= 0
    logits = outputs["segmentation"].permute(0, 2, 3, 1)[keep]
    seg_ref = F.cross_entropy(logits, seg[keep])
    depth_gt = labels["depth"].float()
    depth_ref = (outputs["depth"] - depth_gt).abs()[depth_gt > 0].mean()
    normal_gt = labels["normal"].float()
    has = normal_gt.abs().sum(1) > 0
    pred = outputs["normal"].permute(0, 2, 3, 1)[has]
    gt = normal_gt.permute(0, 2, 3, 1)[has]
    normal_ref = (1 - (pred * gt).sum(1) / (pred.norm(dim=1) * gt.norm(dim=1))).mean()
    torch.testing.assert_close(got, torch.stack([seg_ref, depth_ref, normal_ref]))


def test_dense_loss_all_invalid_is_zero_with_finite_gradients(gen):
    outputs, labels = dense_batch(gen)
    labels = {
        "seg": torch.full_like(labels["seg"], -1),
        "depth": torch.zeros_like(labels["depth"]),
        "normal": torch.zeros_like(labels["normal"]),
    }
    outputs = {k: v.requires_grad_() for k, v in outputs.items()}
    got = DenseLoss()(outputs, labels)
    assert torch.equal(got, torch.zeros(3))
    got.sum().backward()
    for v in outputs.values():
        assert torch.isfinite(v.grad).all() and not v.grad.any()


def test_dense_loss_bf16_gradients_flow(gen):
    outputs, labels = dense_batch(gen)
    outputs = {k: v.bfloat16().requires_grad_() for k, v in outputs.items()}
    got = DenseLoss()(outputs, labels)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    got.sum().backward()
    for v in outputs.values():
        assert torch.isfinite(v.grad.float()).all() and v.grad.abs().sum() > 0


@pytest.mark.cuda
def test_losses_on_cuda_match_cpu(gen):
    logits, labels = random_batch(NUM_CLASSES, 20, gen)
    loss = ClassificationLoss(NUM_CLASSES)
    torch.testing.assert_close(loss(logits.cuda(), labels.cuda()).cpu(), loss(logits, labels))
    outputs, dense_labels = dense_batch(gen)
    got = DenseLoss()({k: v.cuda() for k, v in outputs.items()}, {k: v.cuda() for k, v in dense_labels.items()})
    torch.testing.assert_close(got.cpu(), DenseLoss()(outputs, dense_labels))
