"""report: perturbation statistics against direct numpy computations, build_report validation,
write_report's files (atomic, strict JSON, PNG sizes, 40 tasks), summary_table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtlue_fast import report as rep


def strict_json(text: str):
    def no_constants(name: str):
        raise ValueError(f"non-strict JSON constant {name}")

    return json.loads(text, parse_constant=no_constants)


def direct_intra_std(delta: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Per-pixel population std within each class (>= 2 samples), pixel mean, class mean."""
    flat = delta.reshape(len(delta), -1).astype(np.float64)
    stds = [flat[labels == c].std(axis=0).mean() for c in range(num_classes) if (labels == c).sum() >= 2]
    return float(np.mean(stds))


def make_images(rng: np.random.Generator, n: int, shape=(1, 4, 5)) -> np.ndarray:
    return rng.integers(40, 216, size=(n, *shape), dtype=np.uint8)


# ----------------------------------------------------------------------------- perturbation_stats


def test_class_consistent_deltas_have_zero_intra_class_std():
    rng = np.random.default_rng(1)
    n = 30
    clean = make_images(rng, n)
    labels = np.stack([np.arange(n) % 2, rng.integers(0, 2, n)], axis=1).astype(np.int64)
    patterns = rng.integers(-8, 9, size=(2, *clean.shape[1:]))
    delta = patterns[labels[:, 0]]  # a function of task 0's label only
    protected = (clean.astype(np.int16) + delta).astype(np.uint8)
    stats = rep.perturbation_stats(clean, protected, labels, ["a", "b"], 2, chunk_rows=7)
    assert stats["per_task"]["a"]["intra_class_std"] == 0.0
    assert stats["per_task"]["b"]["intra_class_std"] > 0
    assert stats["per_task"]["b"]["intra_class_std"] == pytest.approx(direct_intra_std(delta, labels[:, 1], 2))
    assert stats["mean_abs_delta"] == pytest.approx(np.abs(delta).mean(), abs=1e-12)
    assert stats["max_abs_delta"] == int(np.abs(delta).max()) and stats["samples"] == n


def test_random_deltas_match_numpy_with_ignored_labels_and_memmap(tmp_path):
    rng = np.random.default_rng(2)
    n, classes = 41, [2, 3]
    clean = make_images(rng, n, (3, 3, 4))
    delta = rng.integers(-12, 13, size=clean.shape)
    protected = (clean.astype(np.int16) + delta).astype(np.uint8)
    labels = np.stack([rng.integers(0, 2, n), rng.integers(-1, 3, n)], axis=1).astype(np.int64)  # -1: missing
    np.save(tmp_path / "c.npy", clean)
    np.save(tmp_path / "p.npy", protected)
    c_map, p_map = np.load(tmp_path / "c.npy", mmap_mode="r"), np.load(tmp_path / "p.npy", mmap_mode="r")
    stats = rep.perturbation_stats(c_map, p_map, labels, ["x", "y"], classes, chunk_rows=5)
    for k, name in enumerate(["x", "y"]):
        ok = labels[:, k] >= 0
        got = stats["per_task"][name]
        assert got["intra_class_std"] > 0
        assert got["intra_class_std"] == pytest.approx(direct_intra_std(delta[ok], labels[ok, k], classes[k]), rel=1e-12)
        assert got["mean_abs_delta"] == pytest.approx(np.abs(delta[ok]).mean(), rel=1e-12)
    assert stats["mean_abs_delta"] == pytest.approx(np.abs(delta).mean(), rel=1e-12)
    whole = rep.perturbation_stats(clean, protected, labels, ["x", "y"], classes)  # one chunk
    assert whole["per_task"]["y"]["intra_class_std"] == pytest.approx(stats["per_task"]["y"]["intra_class_std"], rel=1e-12)


def test_subset_is_seeded_and_bounded():
    rng = np.random.default_rng(3)
    clean = make_images(rng, 50)
    protected = rng.integers(0, 256, size=clean.shape, dtype=np.uint8)
    labels = rng.integers(0, 2, (50, 1))
    a = rep.perturbation_stats(clean, protected, labels, ["t"], 2, max_samples=20, seed=5)
    b = rep.perturbation_stats(clean, protected, labels, ["t"], 2, max_samples=20, seed=5, chunk_rows=3)
    c = rep.perturbation_stats(clean, protected, labels, ["t"], 2, max_samples=20, seed=6)
    assert a["samples"] == 20 and a["mean_abs_delta"] == pytest.approx(b["mean_abs_delta"], rel=1e-12)
    assert a["per_task"]["t"]["intra_class_std"] == pytest.approx(b["per_task"]["t"]["intra_class_std"], rel=1e-12)
    assert a["mean_abs_delta"] != c["mean_abs_delta"]
    rows = rep.sample_rows(50, 20, 5)
    assert len(set(rows.tolist())) == 20 and np.all(np.diff(rows) > 0)


def test_dense_labels_give_overall_figures_only():
    rng = np.random.default_rng(4)
    clean = make_images(rng, 6, (3, 4, 4))
    delta = rng.integers(-4, 5, size=clean.shape)
    protected = (clean.astype(np.int16) + delta).astype(np.uint8)
    labels = {"seg": np.zeros((6, 4, 4), np.int64), "depth": np.ones((6, 4, 4), np.float32)}
    stats = rep.perturbation_stats(clean, protected, labels, ["segmentation", "depth", "normal"], 13)
    assert stats["per_task"] == {"segmentation": None, "depth": None, "normal": None}
    assert stats["mean_abs_delta"] == pytest.approx(np.abs(delta).mean(), abs=1e-12)
    assert stats["max_abs_delta"] == int(np.abs(delta).max()) and stats["samples"] == 6


def test_shape_errors():
    z = np.zeros((4, 1, 2, 2), np.uint8)
    with pytest.raises(ValueError, match="one shape"):
        rep.perturbation_stats(z, z[:3], np.zeros((4, 1)), ["t"], 2)
    with pytest.raises(ValueError, match="labels"):
        rep.perturbation_stats(z, z, np.zeros((4, 2)), ["t"], 2)


# ----------------------------------------------------------------------------- build_report


def fields(tasks=("smile", "young"), nan_task=None) -> dict:
    clean = {t: 0.9 - 0.01 * i for i, t in enumerate(tasks)}
    prot = {t: 0.5 + 0.01 * i for i, t in enumerate(tasks)}
    if nan_task:
        prot[nan_task] = math.nan
    stats = {"per_task": {t: {"intra_class_std": 1.5, "mean_abs_delta": 3.0} for t in tasks},
             "mean_abs_delta": 3.0, "max_abs_delta": 8, "samples": 100}
    return dict(
        dataset="celeba", synthetic=True, data_root=None, tasks=list(tasks), metric="accuracy",
        clean={"mean": float(np.mean(list(clean.values()))), "per_task": clean},
        protected={"mean": 0.55, "per_task": prot}, clean_cache=Path("/tmp/cache"), eps=8 / 255,
        base="em", method="mtlue", backbone="resnet18", weighting="equal", victim="mtl",
        timings={"generate": 12.5, "victim": 30.0}, throughput={"generate": 800.0},
        versions={"mtlue_fast": "0.1.0", "gpu": None}, git=None, perturbation_stats=stats,
    )


def test_build_report_computes_drop_and_normalises():
    r = rep.build_report(**fields())
    assert r["drop"] == pytest.approx(r["clean"]["mean"] - 0.55)
    assert r["clean_cache"] == "/tmp/cache" and isinstance(r["eps"], float)


@pytest.mark.parametrize(
    "name, value",
    [
        ("dataset", None), ("synthetic", "yes"), ("tasks", "smile"), ("metric", "f1"), ("eps", 8),
        ("eps", "8/255"), ("victim", 3), ("timings", {"victim": "long"}), ("perturbation_stats", {}),
        ("clean", {"mean": 0.5}), ("protected", {"mean": 0.5, "per_task": {"nope": 0.1}}),
        ("protected", {"mean": "high", "per_task": {}}), ("versions", ["x"]), ("git", 1),
    ],
)
def test_build_report_names_the_bad_field(name, value):
    with pytest.raises(ValueError, match=name):
        rep.build_report(**{**fields(), name: value})


def test_build_report_names_the_missing_field():
    f = fields()
    del f["weighting"]
    with pytest.raises(ValueError, match="'weighting' is missing"):
        rep.build_report(**f)


# ----------------------------------------------------------------------------- write_report


def test_write_report_files_strict_json_and_figures(tmp_path, monkeypatch):
    written = []
    real = rep.atomic_path

    def spy(path):
        written.append(Path(path))
        return real(path)

    monkeypatch.setattr(rep, "atomic_path", spy)
    r = rep.build_report(**fields(nan_task="young"), stl={"mean": 0.8, "per_task": {"smile": 0.85}})
    rng = np.random.default_rng(5)
    clean = make_images(rng, 5, (3, 16, 20))
    prot = (clean.astype(np.int16) + rng.integers(-8, 9, clean.shape)).astype(np.uint8)
    out = tmp_path / "run"
    got = rep.write_report(out, r, clean_images=clean, protected_images=prot)
    expected = {out / "report.json", out / "report.md", out / "figures" / "metrics.png", out / "figures" / "samples.png"}
    assert set(written) == expected and all(p.is_file() for p in expected)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    text = (out / "report.json").read_text()
    data = strict_json(text)
    assert data == got and data["protected"]["per_task"]["young"] is None
    assert text.index('"backbone"') < text.index('"dataset"')  # sorted keys
    md = (out / "report.md").read_text()
    for needle in ("SYNTHETIC", "smile", "young", "8/255", "resnet18", "n/a", "Perturbation statistics", "stl"):
        assert needle in md
    with Image.open(out / "figures" / "samples.png") as im:
        assert im.mode == "RGB" and 5 * 48 < im.width < 2000 and 3 * 48 < im.height < 800
    with Image.open(out / "figures" / "metrics.png") as im:
        assert 300 < im.width < 2000 and 250 < im.height < 800


def test_forty_tasks_and_grayscale_samples(tmp_path):
    names = [f"Attribute_Number_{i:02d}_Long_Name" for i in range(40)]
    r = rep.build_report(**{**fields(tuple(names)), "synthetic": False, "metric": "auc"})
    rng = np.random.default_rng(6)
    clean = make_images(rng, 20, (1, 64, 64))
    prot = (clean.astype(np.int16) + rng.integers(-4, 5, clean.shape)).astype(np.uint8)
    rep.write_report(tmp_path, r, clean_images=clean, protected_images=prot)
    with Image.open(tmp_path / "figures" / "metrics.png") as im:
        assert 40 * 20 < im.width < 3000 and 300 < im.height < 1000
    with Image.open(tmp_path / "figures" / "samples.png") as im:
        assert 8 * 64 < im.width < 1500 and 3 * 64 < im.height < 600
    assert "SYNTHETIC" not in (tmp_path / "report.md").read_text()
    assert rep.samples_figure(clean[:1], prot[:1]).width > 48


def test_dense_report_renders(tmp_path):
    tasks = ["segmentation", "depth", "normal"]
    f = fields(tuple(tasks))
    f["metric"] = {"segmentation": "miou", "depth": "depth_abs_error (m)", "normal": "normal_angle_mean (deg)"}
    f["clean"] = {"mean": 0.3, "per_task": {"segmentation": 0.3, "depth": 0.6, "normal": 31.0}}
    f["protected"] = {"mean": 0.1, "per_task": {"segmentation": 0.1, "depth": 1.2, "normal": 45.0}}
    f["perturbation_stats"] = {**f["perturbation_stats"], "per_task": dict.fromkeys(tasks)}
    data = rep.write_report(tmp_path, rep.build_report(**f))
    assert data["drop"] == pytest.approx(0.2)
    assert "miou" in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "figures" / "samples.png").exists()


def test_summary_table():
    r = rep.build_report(**fields(nan_task="young"))
    table = rep.summary_table(r)
    lines = table.splitlines()
    assert "smile" in table and "young" in table and "n/a" in table
    assert f"{r['drop']:.4f}" in lines[-1]
    assert len({len(line) for line in lines[:-1] if line.strip()}) == 1  # aligned columns


def test_versions_and_git(monkeypatch):
    v = rep.versions()
    assert {"mtlue_fast", "torch", "cuda", "dali", "gpu"} <= set(v)
    g = rep.git_revision()
    assert g is None or (len(g) >= 40 and int(g, 16) >= 0)

    def boom(*args, **kwargs):
        raise OSError("no git")

    monkeypatch.setattr(rep.subprocess, "run", boom)
    assert rep.git_revision() is None
