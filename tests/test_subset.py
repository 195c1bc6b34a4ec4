"""Seeded, stratified subsets of a split (``--subset N``, ``--subset-test M``, ``data.subset``): the
selection, the cache entry it makes, the run's digest and report, and the smoke preset on real data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mtlue_fast import config as config_module
from mtlue_fast.data import build_cache, load_records, synthetic
from mtlue_fast.data.subset import select_rows, subset_records
from mtlue_fast.run import default_out, main, parse_args, overrides_from_args


def test_rows_are_stratified_seeded_and_in_order():
    labels = np.zeros((100, 2), dtype=np.int64)
    labels[:20, 0] = 1  # 20 % positives in the first task
    labels[::3, 1] = 1
    rows = select_rows(labels, 30, seed=0)
    assert len(rows) == 30 and len(set(rows.tolist())) == 30 and np.all(np.diff(rows) > 0)
    assert int(labels[rows, 0].sum()) == 6  # the stratum's share, 20 % of 30
    assert select_rows(labels, 30, seed=0).tolist() == rows.tolist()
    assert select_rows(labels, 30, seed=1).tolist() != rows.tolist()
    assert select_rows(labels, 500, seed=0).tolist() == list(range(100))  # more than there are: all
    # quotas 3.18, 1.36, 0.45 of 5: floors 3, 1, 0, the one left to the largest remainder (0.45)
    odd = select_rows(np.array([[0]] * 7 + [[1]] * 3 + [[2]] * 1), 5, seed=3)
    assert np.bincount(np.array([0] * 7 + [1] * 3 + [2])[odd]).tolist() == [3, 1, 1]
    with pytest.raises(ValueError, match=">= 1"):
        select_rows(labels, 0, seed=0)


def test_dense_labels_are_drawn_uniformly(tmp_path):
    root = synthetic.write("nyuv2", tmp_path / "nyu", 8, 2, seed=0, size=(24, 32))
    records = load_records("nyuv2", root, "train")
    chosen, info = subset_records(records, 3, seed=0)
    assert len(chosen) == 3 and info["stratified_by"] is None and info["of"] == 8
    assert set(chosen.paths) <= set(records.paths) and chosen.labels.shape == (3, 3)


def test_a_subset_is_a_cache_entry_of_its_own(tmp_path):
    root = synthetic.write("celeba", tmp_path / "celeba", 30, 6, seed=0)
    kw = {"cache_dir": tmp_path / "cache", "decoder": "pil", "progress": False}
    full = build_cache("celeba", root, "train", **kw)
    part = build_cache("celeba", root, "train", subset=12, subset_seed=0, **kw)
    assert part.path != full.path and len(part) == 12 and len(full) == 30
    assert part.manifest["source_digest"] != full.manifest["source_digest"]
    assert part.manifest["subset"] == {"size": 12, "seed": 0, "selected": 12, "of": 30, "stratified_by": "task '5_o_Clock_Shadow'"}
    assert "subset" not in full.manifest
    rows = [full.manifest["row_files"].index(r) for r in part.manifest["row_files"]]
    assert rows == sorted(rows)
    np.testing.assert_array_equal(part.images, full.images[rows])
    np.testing.assert_array_equal(part.labels, full.labels[rows])
    again = build_cache("celeba", root, "train", subset=12, subset_seed=0, **kw)
    assert again.path == part.path
    assert build_cache("celeba", root, "train", subset=12, subset_seed=1, **kw).path != part.path


def test_flags_config_and_the_smoke_preset():
    args = parse_args(["--dataset", "celeba", "--subset", "100", "--subset-test", "20"])
    over = overrides_from_args(args)
    assert over["data"] == {"subset": 100, "subset_test": 20}
    real = config_module.resolve("celeba", synthetic=False, preset="smoke")
    assert (real.data.subset, real.data.subset_test) == (512, 128)
    assert config_module.resolve("celeba", synthetic=True, preset="smoke").data.subset is None  # the sample is small already
    assert config_module.resolve("celeba", synthetic=False).data.subset is None
    mine = config_module.resolve("celeba", synthetic=False, preset="smoke", overrides=over)
    assert (mine.data.subset, mine.data.subset_test) == (100, 20)
    with pytest.raises(config_module.ConfigError, match="data.subset"):
        config_module.resolve("celeba", synthetic=False, assignments=["data.subset=0"])
    # the subset is part of what names a run: another subset never reuses a run's protection
    assert default_out(mine, "/data") != default_out(real, "/data")


@pytest.mark.filterwarnings("ignore:AUC undefined")  # 16 test images: rare findings have no positive
def test_run_with_a_subset_records_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MTLUE_CACHE", str(tmp_path / "cache"))
    root = synthetic.write("chestxray", tmp_path / "xray", 60, 30, seed=0, size=(32, 32))
    out = tmp_path / "run"
    command = ["--dataset", "chestxray", "--data-root", str(root), "--preset", "smoke", "--device", "cpu", "--out", str(out)]
    assert main([*command, "--stages", "prepare"]) == 0
    err = capsys.readouterr().err
    assert "smoke preset: a seeded, stratified subset of the real data (512 training / 128 test images" in err
    assert "subset: 60 of 60 training images" in err  # a small root: the whole split
    assert main([*command, "--subset", "40", "--subset-test", "16", "--quiet", "--force"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["subset"]["train"]["selected"] == 40 and report["subset"]["test"]["selected"] == 16
    assert report["subset"]["train"]["of"] == 60 and report["subset"]["train"]["stratified_by"] == "task 'Atelectasis'"
    assert np.load(out / "protected" / "delta.npy", mmap_mode="r").shape[0] == 40
