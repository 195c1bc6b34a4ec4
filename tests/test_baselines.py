"""Non-gradient baselines of docs/method.md section 5: uniform noise and class-wise AR patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtlue_fast.data import build_cache, synthetic
from mtlue_fast.ue.baselines import (
    ar_patches,
    export_ar_patches,
    export_uniform_noise,
    grid_cells,
    uniform_noise,
)

EPS = 8 / 255


@pytest.fixture(scope="module")
def celeba(tmp_path_factory):
    base = tmp_path_factory.mktemp("celeba")
    root = synthetic.write("celeba", base / "root", 20, 4, seed=0)
    return build_cache("celeba", root, "train", cache_dir=base / "cache", progress=False)


def run(perturb, images, labels, batch_size):
    """Apply ``perturb`` over the dataset in batches, as write_protected does."""
    out = []
    for s in range(0, len(images), batch_size):
        idx = torch.arange(s, min(s + batch_size, len(images)))
        out.append(perturb(images[idx], labels[idx], idx))
    return torch.cat(out)


def test_uniform_noise_bounds_determinism_and_batching():
    images = torch.zeros(13, 3, 9, 7, dtype=torch.uint8)
    labels = torch.zeros(13, 2, dtype=torch.int64)
    a = run(uniform_noise(EPS, seed=3), images, labels, batch_size=13)
    b = run(uniform_noise(EPS, seed=3), images, labels, batch_size=4)
    c = run(uniform_noise(EPS, seed=4), images, labels, batch_size=13)
    assert a.dtype == torch.float32 and a.shape == images.shape
    assert float(a.abs().max()) <= EPS and float(a.abs().max()) > 0.9 * EPS
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(float(a.mean())) < 0.1 * EPS  # centred
    assert not torch.equal(a[0], a[1])  # every row its own draw
    # a row depends on its dataset index only, not on its neighbours
    single = uniform_noise(EPS, seed=3)(images[:1], labels[:1], torch.tensor([7]))
    assert torch.equal(single[0], a[7])


def test_ar_patches_within_eps_and_class_wise():
    num_classes = [2, 3, 2, 4, 2]
    perturb = ar_patches(num_classes, (20, 24), 3, EPS, seed=0)
    labels = torch.tensor([[0, 1, 1, 3, 0], [0, 1, 1, 3, 0], [1, 1, 1, 3, 0], [0, 2, 1, 3, 0], [1, 0, 0, 2, 1]])
    images = torch.zeros(len(labels), 3, 20, 24, dtype=torch.uint8)
    delta = perturb(images, labels, torch.arange(len(labels)))
    assert delta.shape == images.shape and delta.dtype == torch.float32
    assert float(delta.abs().max()) <= EPS
    for patch in perturb.patches:  # each (task, class) patch reaches the budget
        assert torch.allclose(patch.abs().amax(dim=(1, 2, 3)), torch.full((len(patch),), EPS), rtol=1e-6, atol=0)
    assert torch.equal(delta[0], delta[1])  # identical labels, identical perturbation
    assert not torch.equal(delta[0], delta[4])  # different classes differ
    for k in range(len(num_classes)):  # the patches of a task's classes differ
        bank = perturb.patches[k]
        assert all(not torch.equal(bank[i], bank[j]) for i in range(len(bank)) for j in range(i))
    # grid: changing y_k changes exactly task k's cell
    cells = grid_cells(len(num_classes), (20, 24))
    for a, b, k in ((0, 2, 0), (0, 3, 1)):
        changed = (delta[a] != delta[b]).any(0)
        top, left, h, w = cells[k]
        inside = torch.zeros_like(changed)
        inside[top : top + h, left : left + w] = True
        assert changed[inside].float().mean() > 0.9 and not changed[~inside].any()
    # deterministic for a seed, different for another
    assert torch.equal(ar_patches(num_classes, (20, 24), 3, EPS, seed=0)(images, labels, None), delta)
    assert not torch.equal(ar_patches(num_classes, (20, 24), 3, EPS, seed=1)(images, labels, None), delta)


def test_grid_layout():
    assert grid_cells(1, (70, 70)) == [(0, 0, 70, 70)]
    cells = grid_cells(40, (70, 70))  # 7 columns, 6 rows
    assert cells[0] == (0, 0, 12, 10) and cells[7][:2] == (12, 0) and cells[39][1] == 40
    covered = np.zeros((70, 70), int)
    for top, left, h, w in cells:
        covered[top : top + h, left : left + w] += 1
    assert covered.max() == 1 and covered.sum() == 70 * 70 - 2 * 12 * 10  # 2 spare cells stay empty


def test_single_task_patch_covers_the_image():
    perturb = ar_patches([3], (16, 16), 1, EPS, seed=0)
    delta = perturb(torch.zeros(3, 1, 16, 16, dtype=torch.uint8), torch.tensor([[0], [1], [2]]), torch.arange(3))
    assert (delta != 0).float().mean() > 0.95 and float(delta.abs().max()) <= EPS


def test_ar_patches_reject_dense_and_bad_labels():
    perturb = ar_patches([2, 2], (8, 8), 3, EPS)
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    with pytest.raises(NotImplementedError, match="dense"):
        perturb(images, {"seg": torch.zeros(2, 8, 8)}, torch.arange(2))
    with pytest.raises(ValueError, match="out of range"):
        perturb(images, torch.tensor([[0, 2], [0, 0]]), torch.arange(2))
    with pytest.raises(ValueError, match=r"\[B, 2\]"):
        perturb(images, torch.tensor([[0], [0]]), torch.arange(2))


def test_exports_through_write_protected(celeba, tmp_path):
    for export, name in ((export_uniform_noise, "uniform_noise"), (export_ar_patches, "ar_patches")):
        out = export(celeba, tmp_path / name, eps=EPS, seed=0, batch_size=7, progress=False)
        assert out.manifest["method"] == name and out.manifest["settings"]["seed"] == 0
        delta = np.load(out.path / "delta.npy")
        np.testing.assert_array_equal(out.images.astype(np.int16) - celeba.images, delta)
        assert 0 < np.abs(delta).max() <= 8
        np.testing.assert_array_equal(out.labels, celeba.labels)
    ar = np.load(tmp_path / "ar_patches" / "delta.npy")
    same = [(i, j) for i in range(len(celeba)) for j in range(i) if np.array_equal(celeba.labels[i], celeba.labels[j])]
    inner = (celeba.images > 8) & (celeba.images < 247)
    for i, j in same:  # clipping at 0/255 aside, rows with equal labels got the same pattern
        unclipped = inner[i] & inner[j]
        np.testing.assert_array_equal(ar[i][unclipped], ar[j][unclipped])


def test_ar_export_refuses_nyuv2(tmp_path):
    root = synthetic.write("nyuv2", tmp_path / "nyu", 2, 1, seed=0, size=(16, 16))
    clean = build_cache("nyuv2", root, "train", cache_dir=tmp_path / "cache", size=(16, 16), progress=False)
    with pytest.raises(NotImplementedError, match="dense"):
        export_ar_patches(clean, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
