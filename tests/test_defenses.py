"""Victim defences: the data-level cache transforms (jpeg, bdr, grayscale) and the per-batch ones
(strong augmentation, PGD adversarial training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mtlue_fast.data import open_cache
from mtlue_fast.defenses import (
    DEFENSES,
    AdversarialTraining,
    StrongAugmentation,
    batch_defense,
    check_defense,
    defend_cache,
    frozen_batchnorm_stats,
    reduce_bit_depth,
)


def smooth_images(n: int, channels: int = 3, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 ``[n, C, size, size]`` low-frequency images (gradients and slow waves)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    out = np.empty((n, channels, size, size), np.uint8)
    for i in range(n):
        for c in range(channels):
            fx, fy, phase = rng.uniform(0.5, 1.5, 3)
            wave = 0.5 + 0.3 * np.sin(2 * np.pi * (fx * xx + fy * yy) + 6 * phase) + 0.15 * (xx - yy)
            out[i, c] = np.clip(wave * 255, 0, 255).astype(np.uint8)
    return out


def make_cache(folder: Path, images: np.ndarray, labels=None, dataset: str = "celeba", digest: str = "d0"):
    """A cache folder (images.npy, labels or NYUv2 dense arrays, manifest.json), opened."""
    folder.mkdir(parents=True)
    np.save(folder / "images.npy", images)
    n = len(images)
    if dataset == "nyuv2":
        rng = np.random.default_rng(1)
        h, w = images.shape[-2:]
        np.save(folder / "seg.npy", rng.integers(-1, 13, (n, h, w)).astype(np.int8))
        np.save(folder / "depth.npy", rng.random((n, 1, h, w)).astype(np.float16))
        np.save(folder / "normal.npy", rng.random((n, 3, h, w)).astype(np.float16))
        task_names, num_classes = ["segmentation", "depth", "normal"], [13, 1, 3]
    else:
        np.save(folder / "labels.npy", labels if labels is not None else np.arange(2 * n).reshape(n, 2) % 2)
        task_names, num_classes = ["a", "b"], [2, 2]
    manifest = {
        "dataset": dataset, "split": "train", "task_names": task_names, "num_classes": num_classes,
        "source_digest": digest, "count": n, "channels": int(images.shape[1]), "size": list(images.shape[-2:]),
        "row_files": [f"{i}.png" for i in range(n)],
    }  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return open_cache(folder)


# ---------------------------------------------------------------------------- data-level


def test_jpeg_changes_images_a_little_and_keeps_labels(tmp_path):
    images = smooth_images(6)
    labels = np.array([[0, 1], [1, 0], [1, 1], [0, 0], [1, 0], [0, 1]], dtype=np.int64)
    cache = make_cache(tmp_path / "src", images, labels)
    defended = defend_cache("jpeg", cache, tmp_path / "jpeg", progress=False, chunk_size=4, workers=2)
    reopened = open_cache(tmp_path / "jpeg")
    out = np.asarray(reopened.images)
    assert out.shape == images.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(np.int16) - images.astype(np.int16))
    assert diff.max() > 0
    assert diff.mean() < 20
    np.testing.assert_array_equal(reopened.labels, labels)
    np.testing.assert_array_equal(defended.images, out)
    assert reopened.manifest["defense"] == "jpeg"
    assert reopened.manifest["source_digest"] not in ("d0", None)
    assert reopened.manifest["count"] == 6 and reopened.task_names == ["a", "b"]


def test_jpeg_grayscale_images(tmp_path):
    images = smooth_images(3, channels=1)
    out = np.asarray(defend_cache("jpeg", make_cache(tmp_path / "src", images), tmp_path / "out", progress=False).images)
    assert out.shape == images.shape
    assert 0 < np.abs(out.astype(np.int16) - images).mean() < 20


def test_bdr_keeps_four_levels(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (10, 3, 8, 8), dtype=np.uint8)
    cache = make_cache(tmp_path / "src", images)
    out = np.asarray(defend_cache("bdr", cache, tmp_path / "bdr", progress=False, chunk_size=3).images)
    assert set(np.unique(out).tolist()) <= {0, 85, 170, 255}
    expected = np.rint(np.rint(images / 255 * 3) / 3 * 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)
    assert reduce_bit_depth(np.arange(256, dtype=np.uint8))[[0, 42, 43, 127, 128, 212, 213, 255]].tolist() == [
        0, 0, 85, 85, 170, 170, 255, 255,
    ]  # fmt: skip


def test_grayscale_equal_channels_and_rejects_one_channel(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    images[0, :, 0, 0] = (255, 0, 0)
    out = np.asarray(defend_cache("grayscale", make_cache(tmp_path / "src", images), tmp_path / "g", progress=False).images)
    assert out.shape == images.shape
    np.testing.assert_array_equal(out[:, 0], out[:, 1])
    np.testing.assert_array_equal(out[:, 0], out[:, 2])
    assert out[0, 0, 0, 0] == 76  # round(0.299 * 255)
    gray = make_cache(tmp_path / "src1", images[:, :1].copy())
    with pytest.raises(ValueError, match="grayscale"):
        defend_cache("grayscale", gray, tmp_path / "g1", progress=False)


def test_rerun_reuses_and_new_source_rebuilds(tmp_path):
    cache = make_cache(tmp_path / "src", smooth_images(4))
    defend_cache("bdr", cache, tmp_path / "out", progress=False)
    stamp = (tmp_path / "out" / "images.npy").stat().st_mtime_ns
    again = defend_cache("bdr", cache, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "images.npy").stat().st_mtime_ns == stamp
    assert again.manifest["defense"] == "bdr"
    other = make_cache(tmp_path / "src2", smooth_images(5, seed=3), digest="d1")
    rebuilt = defend_cache("bdr", other, tmp_path / "out", progress=False)
    assert len(rebuilt) == 5
    assert not [p for p in tmp_path.glob(".out.*") if p.is_dir()]  # no temporary folders left


def test_dense_labels_copied(tmp_path):
    cache = make_cache(tmp_path / "src", smooth_images(3, size=16), dataset="nyuv2")
    out = defend_cache("bdr", cache, tmp_path / "out", progress=False, chunk_size=2)
    assert isinstance(out.labels, dict)
    for name in ("seg", "depth", "normal"):
        np.testing.assert_array_equal(out.labels[name], cache.labels[name])


def test_defend_cache_argument_errors(tmp_path):
    cache = make_cache(tmp_path / "src", smooth_images(2))
    with pytest.raises(ValueError, match="training-time"):
        defend_cache("adv", cache, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="out_dir"):
        defend_cache("bdr", cache, tmp_path / "src", progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="out_dir"):
        defend_cache("bdr", cache, tmp_path / "busy", progress=False)
    assert defend_cache("none", cache, tmp_path / "unused") is cache


def test_unknown_names_rejected(tmp_path):
    for call in (lambda: check_defense("blur"), lambda: batch_defense("blur"),
                 lambda: defend_cache("blur", None, tmp_path / "x")):  # fmt: skip
        with pytest.raises(ValueError, match="jpeg, bdr, grayscale, augment, adv"):
            call()
    assert check_defense("adv") == "adv" and DEFENSES[0] == "none"
    assert all(batch_defense(n) is None for n in ("none", "jpeg", "bdr", "grayscale"))
    assert isinstance(batch_defense("augment"), StrongAugmentation)
    assert isinstance(batch_defense("adv", eps=4 / 255), AdversarialTraining)
    with pytest.raises(ValueError, match="eps"):
        batch_defense("adv", eps=-0.1)


# ---------------------------------------------------------------------------- training-time


def test_augment_shape_range_determinism():
    x = torch.rand(6, 3, 24, 20, generator=torch.Generator().manual_seed(0))
    labels = torch.zeros(6, 2, dtype=torch.long)
    first, second = StrongAugmentation(seed=3), StrongAugmentation(seed=3)
    a = first(x, labels, None, None)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.min() >= 0 and a.max() <= 1
    assert (a - x).abs().mean() > 0.01
    torch.testing.assert_close(second(x, labels, None, None), a, rtol=0, atol=0)
    assert not torch.equal(first(x, labels, None, None), a)  # the next call draws anew
    assert not torch.equal(StrongAugmentation(seed=4)(x, labels, None, None), a)
    one_channel = StrongAugmentation()(x[:, :1], labels, None, None)
    assert one_channel.shape == (6, 1, 24, 20)
    cl = StrongAugmentation()(x.contiguous(memory_format=torch.channels_last), labels, None, None)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(NotImplementedError, match="classification"):
        StrongAugmentation()(x, {"seg": torch.zeros(6, 24, 20, dtype=torch.long)}, None, None)


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_adv_within_eps_raises_loss_keeps_bn_stats():
    from mtlue_fast.models import build_model
    from mtlue_fast.mtl.losses import ClassificationLoss

    torch.manual_seed(0)
    model = build_model([2, 3], backbone="resnet18", in_channels=3, crop=(32, 32), width=0.25).train()
    loss_fn = ClassificationLoss([2, 3])
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 32, 32, generator=gen)
    labels = torch.stack([torch.randint(0, 2, (8,), generator=gen), torch.randint(0, 3, (8,), generator=gen)], 1)
    before = bn_state(model)
    eps = 8 / 255
    defence = batch_defense("adv", eps=eps, seed=0)
    adv = defence(x, labels, model, loss_fn)
    assert adv.shape == x.shape and not adv.requires_grad
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    after = bn_state(model)
    assert before.keys() == after.keys() and len(before) > 0
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(m.training and m.track_running_stats for m in model.modules()
                                  if isinstance(m, nn.BatchNorm2d))  # fmt: skip
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad(), frozen_batchnorm_stats(model):  # the train-mode function the attack ascended
        clean, attacked = loss_fn(model(x), labels).sum(), loss_fn(model(adv), labels).sum()
    assert attacked > clean


class TinyDense(nn.Module):
    """A conv + batch norm emitting a depth map, for the dense-label path."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.out = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        return {"depth": self.out(torch.relu(self.bn(self.conv(x))))}


def test_adv_dense_labels():
    torch.manual_seed(0)
    model = TinyDense().train()
    x = torch.rand(2, 3, 8, 8)
    labels = {"depth": torch.rand(2, 1, 8, 8)}

    def loss_fn(outputs, lab):
        return ((outputs["depth"] - lab["depth"]) ** 2).mean().reshape(1)

    before = bn_state(model)
    adv = AdversarialTraining(eps=4 / 255, steps=3, seed=0)(x, labels, model, loss_fn)
    assert (adv - x).abs().max() <= 4 / 255 + 1e-6 and not torch.equal(adv, x)
    assert all(torch.equal(v, bn_state(model)[k]) for k, v in before.items())
