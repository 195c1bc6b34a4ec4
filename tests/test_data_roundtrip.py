"""Synthetic datasets through the real-data readers, the cache and the batch iterator."""

from __future__ import annotations

import filecmp

import numpy as np
import pytest

from mtlue_fast.data import build_cache, load_records, synthetic
from mtlue_fast.data.loader import DeviceBatches

SMALL = {"celeba": None, "chestxray": (64, 64), "utkface": (70, 70), "nyuv2": (72, 96)}


@pytest.mark.parametrize("dataset", list(SMALL))
def test_synthetic_dataset_reads_caches_and_batches(tmp_path, dataset):
    root = synthetic.write(dataset, tmp_path / dataset, 40, 12, seed=3)
    train, test = load_records(dataset, root, "train"), load_records(dataset, root, "test")
    if dataset == "utkface":  # one folder, split 80/20 by the reader; two malformed names skipped
        assert len(train) + len(test) == 52 and train.skipped.counts == {"unparseable_names": 2}
    else:
        assert (len(train), len(test)) == (40, 12) and train.skipped.total == 0
    assert not set(train.paths) & set(test.paths)
    if dataset != "nyuv2":
        assert train.labels.min() >= 0 and (train.labels.max(0) < np.array(train.num_classes)).all()
    cache = build_cache(dataset, root, "train", tmp_path / "cache", size=SMALL[dataset], decoder="pil", progress=False)
    assert len(cache) == len(train) and cache.images.std() > 10  # real content, not blank
    crop = (cache.images.shape[2] - 4, cache.images.shape[3] - 4)
    images, labels = next(iter(DeviceBatches.from_cache(cache, 8, "cpu", crop=crop, train=True)))
    assert images.shape == (8, cache.images.shape[1], *crop)


@pytest.mark.parametrize("dataset", list(SMALL))
def test_synthetic_is_deterministic_for_a_seed(tmp_path, dataset):
    first = synthetic.write(dataset, tmp_path / "a", 8, 4, seed=11)
    second = synthetic.write(dataset, tmp_path / "b", 8, 4, seed=11)
    other = synthetic.write(dataset, tmp_path / "c", 8, 4, seed=12)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    _, mismatch, errors = filecmp.cmpfiles(first, second, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors
    other_files = sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    common = [str(f) for f in files if f in set(other_files)]
    assert files != other_files or filecmp.cmpfiles(first, other, common, shallow=False)[1]


def test_refuses_to_write_into_a_non_empty_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(ValueError):
        synthetic.write("celeba", tmp_path, 4, 2, seed=0)
    assert (tmp_path / "mine.txt").read_text() == "user data"
