"""DeviceBatches: crop/flip correctness, order, sharding, dense labels; GPU paths equal the CPU path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtlue_fast.data.loader import DeviceBatches, window_gather


def make_data(n=37, channels=3, height=10, width=12, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, channels, height, width), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n)  # sample id, to follow samples through the loader
    labels = np.stack([np.arange(n), rng.integers(0, 2, n)], 1).astype(np.int64)
    return images, labels


def expected_window(image, top, left, size, flip):
    h, w = size
    window = image[..., top : top + h, left : left + w]
    return window[..., ::-1] if flip else window


def test_window_gather_matches_slicing(gen):
    data = torch.randint(0, 256, (6, 2, 9, 11), generator=gen, dtype=torch.uint8)
    index = torch.tensor([5, 0, 3, 3])
    tops, lefts = torch.tensor([0, 4, 2, 1]), torch.tensor([5, 0, 3, 1])
    flips = torch.tensor([True, False, True, False])
    out = window_gather(data, index, tops, lefts, flips, (5, 6))
    for b in range(4):
        expected = expected_window(data[index[b]].numpy(), int(tops[b]), int(lefts[b]), (5, 6), bool(flips[b]))
        assert np.array_equal(out[b].numpy(), expected)
    assert out.is_contiguous() and out.shape == (4, 2, 5, 6)


def test_train_batches_crop_flip_and_labels_follow_images():
    images, labels = make_data()
    batches = DeviceBatches(images, labels, 8, "cpu", crop=(6, 7), train=True, seed=3, with_indices=True)
    idx, tops, lefts, flips = batches.epoch_plan(0)
    seen = []
    for b, (x, y, index) in enumerate(batches):
        assert x.dtype == torch.uint8 and y.dtype == torch.int64 and x.shape[1:] == (3, 6, 7)
        for row in range(len(x)):
            k = b * 8 + row
            assert index[row] == idx[k] and y[row, 0] == idx[k]
            expected = expected_window(images[idx[k]], tops[k], lefts[k], (6, 7), flips[k])
            assert np.array_equal(x[row].numpy(), expected)
        seen += index.tolist()
    assert sorted(seen) == list(range(37)) and len(batches) == 5
    assert 0.25 < flips.mean() < 0.75 and len(set(tops.tolist())) > 1


def test_test_mode_centre_crop_in_order():
    images, labels = make_data()
    batches = DeviceBatches(images, labels, 16, "cpu", crop=(6, 8), train=False)
    x, y = next(iter(batches))
    assert y[:, 0].tolist() == list(range(16))
    assert np.array_equal(x.numpy(), images[:16, :, 2:8, 2:10])


def test_epochs_are_seeded_and_differ():
    images, labels = make_data()
    first = DeviceBatches(images, labels, 8, crop=(6, 6), seed=1)
    second = DeviceBatches(images, labels, 8, crop=(6, 6), seed=1)
    epoch0 = [y[:, 0].tolist() for _, y in first]
    assert epoch0 == [y[:, 0].tolist() for _, y in second]
    epoch1 = [y[:, 0].tolist() for _, y in first]  # iterating again advances the epoch
    assert epoch1 != epoch0
    first.set_epoch(0)
    assert [y[:, 0].tolist() for _, y in first] == epoch0
    other_seed = DeviceBatches(images, labels, 8, crop=(6, 6), seed=2)
    assert [y[:, 0].tolist() for _, y in other_seed] != epoch0


@pytest.mark.parametrize("drop_last", [False, True])
def test_sharding_is_disjoint_and_covering(drop_last):
    images, labels = make_data(n=37)
    ranks = [DeviceBatches(images, labels, 5, crop=(6, 6), seed=4, rank=r, world_size=3, drop_last=drop_last) for r in range(3)]
    ids = [[i for _, y in shard for i in y[:, 0].tolist()] for shard in ranks]
    assert len({len(s) for s in ids}) == 1 and all(len(s) == shard.num_samples for s, shard in zip(ids, ranks))
    if drop_last:
        flat = [i for s in ids for i in s]
        assert len(flat) == len(set(flat)) and all(len(s) % 5 == 0 for s in ids)
        assert all(len(y) == 5 for shard in ranks for _, y in shard)
    else:
        assert set().union(*map(set, ids)) == set(range(37))  # 37 -> 13 per rank, 2 wrapped repeats
        assert sum(len(s) for s in ids) == 39


def test_dense_labels_cropped_and_flipped_with_the_image():
    n, height, width = 6, 8, 10
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 3, height, width), dtype=np.uint8)
    dense = {
        "seg": rng.integers(-1, 13, (n, height, width)).astype(np.int8),
        "depth": rng.random((n, 1, height, width)).astype(np.float16),
        "normal": rng.standard_normal((n, 3, height, width)).astype(np.float16),
    }
    batches = DeviceBatches(images, dense, 6, crop=(5, 7), train=True, seed=9)
    idx, tops, lefts, flips = batches.epoch_plan(0)
    assert flips.any()
    x, y = next(iter(batches))
    for row in range(n):
        args = (tops[row], lefts[row], (5, 7), flips[row])
        assert np.array_equal(x[row].numpy(), expected_window(images[idx[row]], *args))
        assert np.array_equal(y["seg"][row].numpy(), expected_window(dense["seg"][idx[row]], *args))
        assert np.array_equal(y["depth"][row].numpy(), expected_window(dense["depth"][idx[row]], *args))
        normal = expected_window(dense["normal"][idx[row]], *args).copy()
        if flips[row]:
            normal[0] = -normal[0]
        assert np.array_equal(y["normal"][row].numpy(), normal)


def test_bad_arguments():
    images, labels = make_data()
    with pytest.raises(ValueError, match="uint8"):
        DeviceBatches(images.astype(np.float32), labels, 4)
    with pytest.raises(ValueError, match="37 rows"):
        DeviceBatches(images, labels[:5], 4)
    with pytest.raises(ValueError, match="crop"):
        DeviceBatches(images, labels, 4, crop=(11, 4))
    with pytest.raises(ValueError, match="rank"):
        DeviceBatches(images, labels, 4, rank=2, world_size=2)


@pytest.mark.cuda
@pytest.mark.parametrize("resident", [True, False])
def test_gpu_paths_equal_the_cpu_path(resident):
    images, labels = make_data(n=50)
    common = dict(crop=(6, 7), train=True, seed=5, with_indices=True)
    cpu = list(DeviceBatches(images, labels, 16, "cpu", **common))
    gpu = list(DeviceBatches(images, labels, 16, "cuda", resident=resident, **common))
    assert len(cpu) == len(gpu)
    for a, b in zip(cpu, gpu):
        assert b[0].is_cuda and all(torch.equal(u, v.cpu()) for u, v in zip(a, b))


def test_a_reseeded_loader_is_the_one_built_with_that_seed_and_shares_the_device_copy():
    images, labels = make_data(n=50)
    common = dict(crop=(6, 7), train=True, drop_last=True, with_indices=True)
    first = DeviceBatches(images, labels, 16, "cpu", seed=5, **common)
    list(first)  # the twin starts from its own first epoch, whatever the original has done
    twin = first.reseeded(6)
    for a, b in zip(list(twin), list(DeviceBatches(images, labels, 16, "cpu", seed=6, **common)), strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert first.seed == 5 and first.epoch == 1
    assert twin._on_device() is first._on_device()  # one copy, made by whichever iterates first


@pytest.mark.cuda
def test_a_reseeded_resident_loader_makes_no_second_gpu_copy():
    images, labels = make_data(n=64, height=40, width=48)  # 368,640 bytes; a batch's windows are 2,016
    first = DeviceBatches(images, labels, 16, "cuda", resident=True, crop=(6, 7), train=False, shuffle=True, seed=1)
    twin = first.reseeded(2)
    list(first)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    batches = list(twin)
    torch.cuda.synchronize()
    assert len(batches) == 4 and torch.cuda.memory_allocated() - before < images.nbytes // 4  # no second copy
    assert twin._device_copy.data is first._device_copy.data


def test_random_scale_crop_geometry():
    from mtlue_fast.data.loader import random_scale_crop

    rng = np.random.default_rng(0)
    seg = torch.from_numpy(rng.integers(-1, 13, (2, 8, 12)).astype(np.int8))
    depth = torch.from_numpy(rng.random((2, 1, 8, 12)).astype(np.float32))
    images = torch.from_numpy(rng.integers(0, 256, (2, 3, 8, 12), dtype=np.uint8))
    labels = {"seg": seg, "depth": depth}
    same_images, same = random_scale_crop(images, labels, np.array([1.0, 1.0]), np.array([0.3, 0.9]), np.array([0.5, 0.1]))
    assert torch.equal(same_images, images) and torch.equal(same["seg"], seg) and torch.allclose(same["depth"], depth)
    # Scale 2 at the top-left / bottom-right: each pixel of the quarter window becomes a 2x2 block.
    _, out = random_scale_crop(images, labels, np.array([2.0, 2.0]), np.array([0.0, 1.0]), np.array([0.0, 1.0]))
    quarter = [seg[0, :4, :6], seg[1, 4:, 6:]]
    for b in range(2):
        assert torch.equal(out["seg"][b], quarter[b].repeat_interleave(2, 0).repeat_interleave(2, 1))
    expected_depth = depth[0, 0, :4, :6].repeat_interleave(2, 0).repeat_interleave(2, 1) / 2
    assert torch.allclose(out["depth"][0, 0], expected_depth)


def test_nyuv2_batches_use_random_scale_by_default():
    n = 8
    rng = np.random.default_rng(1)
    dense = {"seg": rng.integers(-1, 13, (n, 8, 12)).astype(np.int8), "depth": rng.random((n, 1, 8, 12)).astype(np.float16),
             "normal": rng.standard_normal((n, 3, 8, 12)).astype(np.float16)}  # fmt: skip
    images = rng.integers(0, 256, (n, 3, 8, 12), dtype=np.uint8)

    class FakeCache:
        manifest = {"dataset": "nyuv2"}

    FakeCache.images, FakeCache.labels = images, dense
    train = DeviceBatches.from_cache(FakeCache, 8, train=True, seed=0)
    test = DeviceBatches.from_cache(FakeCache, 8, train=False)
    assert train.scales == (1.0, 1.2, 1.5) and test.scales is None
    x, y = next(iter(train))
    assert x.shape == (8, 3, 8, 12) and y["seg"].dtype == torch.int8 and y["depth"].dtype == torch.float16
    with pytest.raises(ValueError, match="scales"):
        DeviceBatches(images, dense, 4, scales=(0.5,))


def test_resident_datasets_share_the_free_gpu_memory(monkeypatch):
    """A training and a test set are both made before either is copied: together they may take
    RESIDENT_FRACTION of the free memory, where free includes what PyTorch holds cached but unused."""
    from mtlue_fast.data import loader

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (900, 4000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 300)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 100)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    images = np.zeros((4, 1, 10, 10), dtype=np.uint8)  # 400 bytes; labels 4 x int8: 4 bytes
    labels = np.zeros((4, 1), dtype=np.int8)
    first = DeviceBatches(images, labels, 2, "cuda")  # 404 <= 0.5 * (900 + 200)
    second = DeviceBatches(images, labels, 2, "cuda:0")  # 808 > 550: streams instead
    assert first.resident and not second.resident
    first._device_copy.data = ("copied", None)  # once copied, the memory is allocated, no longer promised
    del second
    third = DeviceBatches(images, labels, 2, "cuda")
    assert third.resident
    assert DeviceBatches(images, labels, 2, "cuda", resident=True).resident  # forced: no check
    third._device_copy.data = ("copied", None)
    loader._PROMISED.clear()
