"""mtl.metrics: exact AUC against a pairwise count (with ties), undefined AUCs, accuracy against a loop,
batch-splitting invariance, and the NYUv2 dense metrics against a numpy computation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mtlue_fast.mtl.losses import output_layout
from mtlue_fast.mtl.metrics import ClassificationMetrics, DenseMetrics, roc_auc


def pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """O(n_pos * n_neg): correctly ordered (positive, negative) pairs, ties 1/2."""
    pos, neg = scores[labels > 0], scores[labels <= 0]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / (len(pos) * len(neg)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.bfloat16])
def test_roc_auc_matches_pairwise_count_with_ties(dtype, gen):
    n, k = 157, 6
    scores = torch.randint(-4, 5, (n, k), generator=gen).to(dtype)  # 9 values: many ties
    labels = (torch.rand(n, k, generator=gen) < torch.linspace(0.05, 0.7, k)).long()
    labels[:, 0] = torch.randint(0, 2, (n,), generator=gen) * (scores[:, 0] > 0)  # correlated with score
    got = roc_auc(scores, labels)
    assert got.dtype == torch.float64 and got.shape == (k,)
    want = [pairwise_auc(scores[:, j].double().numpy(), labels[:, j].numpy()) for j in range(k)]
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


def test_roc_auc_continuous_scores_and_edge_cases(gen):
    scores = torch.randn(64, 3, generator=gen)
    labels = torch.randint(0, 2, (64, 3), generator=gen)
    labels[:, 1] = 1  # one class only: undefined
    labels[:, 2] = (scores[:, 2] > 0).long()  # perfectly separated
    got = roc_auc(scores, labels).tolist()
    assert got[0] == pytest.approx(pairwise_auc(scores[:, 0].numpy(), labels[:, 0].numpy()), abs=1e-12)
    assert math.isnan(got[1]) and got[2] == 1.0
    assert roc_auc(-scores, labels)[2].item() == 0.0
    assert torch.isnan(roc_auc(torch.zeros(0, 2), torch.zeros(0, 2))).all()
    assert roc_auc(torch.ones(5, 1), torch.tensor([[0], [1], [0], [1], [1]])).item() == 0.5


def loop_accuracy(logits: torch.Tensor, labels: torch.Tensor, num_classes) -> list[float]:
    correct = [0] * len(num_classes)
    for i in range(logits.shape[0]):
        start = 0
        for k, c in enumerate(num_classes):
            if c == 2:
                pred = int(logits[i, start].item() > 0)
                start += 1
            else:
                pred = int(np.argmax(logits[i, start : start + c].numpy()))
                start += c
            correct[k] += pred == int(labels[i, k])
    return [c / logits.shape[0] for c in correct]


def classification_batch(num_classes, n, gen):
    logits = torch.randn(n, sum(output_layout(num_classes)), generator=gen)
    labels = torch.stack([torch.randint(0, c, (n,), generator=gen) for c in num_classes], dim=1)
    return logits, labels


def test_accuracy_matches_loop(gen):
    num_classes = (9, 5, 2)
    logits, labels = classification_batch(num_classes, 90, gen)
    metrics = ClassificationMetrics(num_classes, task_names=["age", "race", "gender"])
    metrics.update(logits, labels)
    result = metrics.compute()
    want = loop_accuracy(logits, labels, num_classes)
    assert result["accuracy"] == pytest.approx(want)
    assert result["mean_accuracy"] == pytest.approx(sum(want) / 3)
    assert result["primary"] == result["mean_accuracy"]
    assert result["task_names"] == ["age", "race", "gender"]
    assert "auc" not in result


def test_classification_batch_splitting_and_reset(gen):
    num_classes = (2, 4, 2, 2, 3)
    logits, labels = classification_batch(num_classes, 101, gen)
    whole = ClassificationMetrics(num_classes, auc=True)
    whole.update(logits, labels)
    parts = ClassificationMetrics(num_classes, auc=True)
    parts.update(logits[:5] + 100, labels[:5])  # forgotten by reset
    parts.reset()
    for chunk in (slice(0, 1), slice(1, 40), slice(40, 101)):
        parts.update(logits[chunk], labels[chunk])
    a, b = whole.compute(), parts.compute()
    assert a == b
    assert a["auc"][1] is None and a["auc"][4] is None
    binary = [0, 2, 3]
    want = [pairwise_auc(logits[:, c].numpy(), labels[:, k].numpy()) for k, c in zip(binary, [0, 5, 6])]
    assert [a["auc"][k] for k in binary] == pytest.approx(want, abs=1e-12)
    assert a["mean_auc"] == pytest.approx(sum(want) / 3) and a["primary"] == a["mean_auc"]


def test_undefined_auc_is_none_warned_and_left_out(gen):
    names = ["Atelectasis", "Cardiomegaly", "Hernia"]
    logits, labels = classification_batch((2, 2, 2), 50, gen)
    labels[:, 2] = 0  # no positive Hernia
    metrics = ClassificationMetrics((2, 2, 2), task_names=names, auc=True)
    metrics.update(logits[:20], labels[:20])
    metrics.update(logits[20:], labels[20:])
    with pytest.warns(UserWarning, match="Hernia"):
        result = metrics.compute()
    assert result["auc"][2] is None
    defined = result["auc"][:2]
    assert all(isinstance(a, float) for a in defined)
    assert result["mean_auc"] == pytest.approx(sum(defined) / 2)
    assert result["primary"] == result["mean_auc"]
    accuracy = loop_accuracy(logits, labels, (2, 2, 2))
    assert result["accuracy"] == pytest.approx(accuracy)


def test_defined_auc_does_not_warn(gen):
    logits, labels = classification_batch((2, 3), 40, gen)
    labels[:2, 0] = torch.tensor([0, 1])
    metrics = ClassificationMetrics((2, 3), auc=True)
    metrics.update(logits, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = metrics.compute()
    assert result["auc"][1] is None and result["mean_auc"] == result["auc"][0]


# --- dense ------------------------------------------------------------------------------------------


def dense_batch(gen, batch=3, h=9, w=11, classes=5):
    outputs = {
        "segmentation": torch.randn(batch, classes, h, w, generator=gen),
        "depth": torch.rand(batch, 1, h, w, generator=gen) * 4 + 0.5,
        "normal": F.normalize(torch.randn(batch, 3, h, w, generator=gen), dim=1),
    }
    seg = torch.randint(-1, classes - 1, (batch, h, w), generator=gen).to(torch.int8)  # class C-1 never labelled
    depth = torch.rand(batch, 1, h, w, generator=gen) * 4 + 0.5
    depth[torch.rand(depth.shape, generator=gen) < 0.25] = 0
    normal = F.normalize(outputs["normal"] + 0.6 * torch.randn(batch, 3, h, w, generator=gen), dim=1)
    normal = normal * (torch.rand(batch, 1, h, w, generator=gen) > 0.25)
    labels = {"seg": seg, "depth": depth.half(), "normal": normal.half()}
    return outputs, labels


def numpy_dense(outputs, labels, classes):
    pred = outputs["segmentation"].numpy().argmax(1).ravel()
    gt = labels["seg"].numpy().astype(np.int64).ravel()
    keep = gt >= 0
    pred, gt = pred[keep], gt[keep]
    ious = []
    for c in range(classes):
        inter = np.sum((pred == c) & (gt == c))
        union = np.sum((pred == c) | (gt == c))
        if union > 0:
            ious.append(inter / union)
    depth_gt = labels["depth"].numpy().astype(np.float64).ravel()
    depth_pred = outputs["depth"].numpy().astype(np.float64).ravel()
    has_depth = depth_gt > 0
    error = np.abs(depth_pred - depth_gt)[has_depth]
    n_gt = labels["normal"].numpy().astype(np.float64).transpose(0, 2, 3, 1).reshape(-1, 3)
    n_pred = outputs["normal"].numpy().astype(np.float64).transpose(0, 2, 3, 1).reshape(-1, 3)
    has_normal = np.any(n_gt != 0, axis=1)
    n_gt, n_pred = n_gt[has_normal], n_pred[has_normal]
    cos = np.sum(n_gt * n_pred, 1) / (np.linalg.norm(n_gt, axis=1) * np.linalg.norm(n_pred, axis=1))
    angle = np.degrees(np.arccos(np.clip(cos, -1, 1)))
    return {
        "miou": np.mean(ious),
        "pixel_accuracy": np.mean(pred == gt),
        "depth_abs_error": error.mean(),
        "depth_rel_error": np.mean(error / depth_gt[has_depth]),
        "normal_angle_mean": angle.mean(),
        "normal_angle_median": np.median(angle),
        "normal_within_11_25": 100 * np.mean(angle < 11.25),
        "normal_within_22_5": 100 * np.mean(angle < 22.5),
        "normal_within_30": 100 * np.mean(angle < 30),
    }


def check_dense(got, want):
    for key, value in want.items():
        tolerance = 0.005 + 1e-4 if key == "normal_angle_median" else 1e-4
        assert got[key] == pytest.approx(value, abs=tolerance, rel=1e-5), key
    assert got["primary"] == got["miou"]


def test_dense_metrics_match_numpy(gen):
    classes = 5
    outputs, labels = dense_batch(gen, classes=classes)
    metrics = DenseMetrics(classes)
    metrics.update(outputs, labels)
    check_dense(metrics.compute(), numpy_dense(outputs, labels, classes))


@pytest.mark.parametrize("parity", ["odd", "even"])
def test_dense_median_bin_resolution(parity, gen):
    """Median within half a bin of numpy's, for odd and even valid counts (angles from a wide range)."""
    outputs, labels = dense_batch(gen, batch=1, h=8, w=8)
    labels["normal"] = F.normalize(torch.randn(1, 3, 8, 8, generator=gen), dim=1).half()
    if parity == "odd":
        labels["normal"][0, :, 0, 0] = 0
    metrics = DenseMetrics(5, angle_bin_deg=0.5)
    metrics.update(outputs, labels)
    got = metrics.compute()["normal_angle_median"]
    assert abs(got - numpy_dense(outputs, labels, 5)["normal_angle_median"]) <= 0.25 + 1e-4


def test_dense_batch_splitting(gen):
    classes = 5
    outputs, labels = dense_batch(gen, batch=4, classes=classes)
    whole = DenseMetrics(classes)
    whole.update(outputs, labels)
    parts = DenseMetrics(classes)
    for chunk in (slice(0, 1), slice(1, 3), slice(3, 4)):
        parts.update({k: v[chunk] for k, v in outputs.items()}, {k: v[chunk] for k, v in labels.items()})
    a, b = whole.compute(), parts.compute()
    assert a.keys() == b.keys()
    for key in a:  # counts agree exactly; float sums up to the CPU atan2's size-dependent (SIMD/scalar) rounding
        assert a[key] == pytest.approx(b[key], rel=1e-7 if key == "normal_angle_mean" else 1e-12), key
    check_dense(b, numpy_dense(outputs, labels, classes))


def test_dense_metrics_without_valid_pixels_are_nan(gen):
    outputs, labels = dense_batch(gen)
    labels = {k: (torch.full_like(v, -1) if k == "seg" else torch.zeros_like(v)) for k, v in labels.items()}
    metrics = DenseMetrics(5)
    metrics.update(outputs, labels)
    result = metrics.compute()
    assert all(math.isnan(v) for v in result.values())
    metrics.reset()
    assert all(math.isnan(v) for v in metrics.compute().values())


@pytest.mark.cuda
def test_cuda_updates_do_not_synchronise_and_match_cpu(gen):
    """On the GPU, ``update`` launches work only (after a first call that uploads index tensors)."""
    num_classes = (2, 4, 2, 3)
    logits, labels = classification_batch(num_classes, 64, gen)
    outputs, dense_labels = dense_batch(gen, batch=2, classes=5)
    cpu, gpu = ClassificationMetrics(num_classes, auc=True), ClassificationMetrics(num_classes, auc=True, device="cuda")
    dense_cpu, dense_gpu = DenseMetrics(5), DenseMetrics(5, device="cuda")
    to_gpu = lambda d: {k: v.cuda() for k, v in d.items()}  # noqa: E731
    logits_gpu, labels_gpu = logits.cuda(), labels.cuda()
    outputs_gpu, dense_labels_gpu = to_gpu(outputs), to_gpu(dense_labels)
    for step in range(2):
        cpu.update(logits, labels)
        dense_cpu.update(outputs, dense_labels)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if step else "default")
        try:
            gpu.update(logits_gpu, labels_gpu)
            dense_gpu.update(outputs_gpu, dense_labels_gpu)
            roc_auc(logits_gpu, (labels_gpu > 0).long()[:, :1].expand(-1, logits_gpu.shape[1]))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    a, b = cpu.compute(), gpu.compute()
    assert a["accuracy"] == b["accuracy"] and a["auc"] == pytest.approx(b["auc"], abs=1e-12)
    a, b = dense_cpu.compute(), dense_gpu.compute()
    for key in a:
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=0.011 if key == "normal_angle_median" else 1e-6), key


def test_dense_metrics_skip_tasks_missing_from_outputs(gen):
    outputs, labels = dense_batch(gen)
    full, depth_only = DenseMetrics(5), DenseMetrics(5)
    full.update(outputs, labels)
    depth_only.update({"depth": outputs["depth"]}, labels)
    a, b = full.compute(), depth_only.compute()
    assert b["depth_abs_error"] == a["depth_abs_error"] and b["depth_rel_error"] == a["depth_rel_error"]
    assert all(math.isnan(v) for k, v in b.items() if not k.startswith("depth"))
