"""report: perturbation statistics against direct numpy computations, build_report's means and std
over victim seeds (against numpy) and validation, write_report's files (atomic, strict JSON, PNG
sizes, 40 tasks, dense), the sample grid, summary_table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtlue_fast import machine
from mtlue_fast import report as rep
from mtlue_fast.report import files as report_files


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

SIDES = ("clean", "protected")


def random_victims(rng: np.random.Generator, tasks, seeds, undefined=()) -> list[dict]:
    """Victims with random scores; ``undefined``: ``(victim index, side, task or "mean")`` set to None
    or NaN (alternately)."""
    victims = []
    for seed in seeds:
        entry = {"seed": int(seed)}
        for side, (lo, hi) in zip(SIDES, ((0.7, 0.95), (0.4, 0.7))):
            per_task = {t: float(rng.uniform(lo, hi)) for t in tasks}
            entry[side] = {"mean": float(rng.uniform(lo, hi)), "per_task": per_task}
        victims.append(entry)
    for k, (i, side, task) in enumerate(undefined):
        gap = None if k % 2 == 0 else math.nan
        if task == "mean":
            victims[i][side]["mean"] = gap
        else:
            victims[i][side]["per_task"][task] = gap
    return victims


def fields(rng=None, tasks=("smile", "young"), seeds=(1, 2, 3), undefined=(), backbone="resnet34", weighting="dwa") -> dict:
    rng = rng if rng is not None else np.random.default_rng()
    stats = {"per_task": {t: {"intra_class_std": 1.5, "mean_abs_delta": 3.0} for t in tasks},
             "mean_abs_delta": 3.0, "max_abs_delta": 8, "samples": 100}
    return dict(
        dataset="celeba", synthetic=True, data_root=None, tasks=list(tasks), metric="accuracy",
        surrogate={"seed": 0, "backbone": "resnet18", "weighting": "equal"},
        victims=random_victims(rng, tasks, seeds, undefined), clean_cache=Path("/tmp/cache"), eps=8 / 255,
        base="em", method="mtlue", backbone=backbone, weighting=weighting, victim="mtl",
        timings={"generate": 12.5, "victim": 30.0}, throughput={"generate": 800.0},
        versions={"mtlue_fast": "0.1.0", "gpu": None}, git=None, perturbation_stats=stats,
    )  # fmt: skip


def as_array(victims, side, task=None) -> np.ndarray:
    """``[seeds]`` float64 of one side's mean (task None) or one task's score, None -> NaN."""
    values = [v[side]["mean"] if task is None else v[side]["per_task"].get(task) for v in victims]
    return np.array([math.nan if x is None else x for x in values], dtype=np.float64)


@pytest.mark.parametrize("num_seeds", [2, 3, 5])
def test_means_drop_and_std_over_seeds_match_numpy(num_seeds):
    rng = np.random.default_rng()
    tasks = [f"task{i}" for i in range(int(rng.integers(1, 7)))]
    seeds = rng.choice(1000, size=num_seeds, replace=False) + 1
    f = fields(rng, tasks, seeds)
    r = rep.build_report(**f)
    drops = as_array(f["victims"], "clean") - as_array(f["victims"], "protected")
    for side in SIDES:
        assert r[side]["mean"] == pytest.approx(np.mean(as_array(f["victims"], side)), rel=1e-12)
        for t in tasks:
            assert r[side]["per_task"][t] == pytest.approx(np.mean(as_array(f["victims"], side, t)), rel=1e-12)
    assert [v["drop"] for v in r["victims"]] == pytest.approx(drops.tolist(), rel=1e-12)
    assert [v["seed"] for v in r["victims"]] == seeds.tolist()
    assert r["drop"] == pytest.approx(np.mean(drops), rel=1e-12)
    assert r["drop_std"] == pytest.approx(np.std(drops, ddof=1), rel=1e-12)
    assert r["clean_cache"] == "/tmp/cache" and isinstance(r["eps"], float)
    assert f["victims"][0].get("drop") is None  # the caller's dicts are not modified


def test_undefined_scores_are_ignored_and_all_undefined_is_none():
    rng = np.random.default_rng()
    tasks = ["a", "b", "c"]
    undefined = [(0, "protected", "a"), (1, "protected", "a"), (2, "protected", "a"),  # a: never defined
                 (1, "clean", "b"), (2, "protected", "mean")]  # fmt: skip
    f = fields(rng, tasks, (4, 5, 6), undefined)
    r = rep.build_report(**f)
    assert r["protected"]["per_task"]["a"] is None
    assert r["clean"]["per_task"]["b"] == pytest.approx(np.nanmean(as_array(f["victims"], "clean", "b")), rel=1e-12)
    assert r["protected"]["mean"] == pytest.approx(np.nanmean(as_array(f["victims"], "protected")), rel=1e-12)
    drops = as_array(f["victims"], "clean") - as_array(f["victims"], "protected")
    assert math.isnan(r["victims"][2]["drop"]) and np.isnan(drops[2])
    assert r["drop"] == pytest.approx(np.nanmean(drops), rel=1e-12)
    assert r["drop_std"] == pytest.approx(np.nanstd(drops, ddof=1), rel=1e-12)
    only = fields(rng, tasks, (4, 5), [(0, "clean", "mean")])  # one defined drop: no std
    r = rep.build_report(**only)
    assert r["drop_std"] is None and r["drop"] == pytest.approx(r["victims"][1]["drop"])


def test_one_victim_has_no_std_and_a_task_missing_everywhere_is_left_out():
    f = fields(seeds=(7,))
    for side in SIDES:
        f["victims"][0][side]["per_task"].pop("young")
    r = rep.build_report(**f)
    assert r["drop_std"] is None and r["drop"] == pytest.approx(r["victims"][0]["drop"])
    assert list(r["clean"]["per_task"]) == ["smile"]


@pytest.mark.parametrize("name", SIDES)
def test_top_level_scores_are_refused(name):
    with pytest.raises(ValueError, match=rf"'{name}' is computed from 'victims'"):
        rep.build_report(**fields(), **{name: {"mean": 0.5, "per_task": {}}})


def victim(seed=1, **over) -> dict:
    scores = {"mean": 0.5, "per_task": {"smile": 0.5}}
    return {"seed": seed, "clean": scores, "protected": scores, **over}


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("dataset", None, "dataset"), ("synthetic", "yes", "synthetic"), ("tasks", "smile", "tasks"),
        ("metric", "f1", "metric"), ("eps", 8, "eps"), ("eps", "8/255", "eps"), ("victim", 3, "victim"),
        ("timings", {"victim": "long"}, "timings"), ("perturbation_stats", {}, "perturbation_stats"),
        ("versions", ["x"], "versions"), ("git", 1, "git"), ("defense", 3, "defense"), ("stl", "x", "stl"),
        ("surrogate", "resnet18", "'surrogate' must be a dict"),
        ("surrogate", {"seed": 0, "backbone": "resnet18"}, "'surrogate' lacks 'weighting'"),
        ("surrogate", {"seed": "0", "backbone": "r", "weighting": "e"}, "'surrogate.seed' must be an integer"),
        ("surrogate", {"seed": True, "backbone": "r", "weighting": "e"}, "'surrogate.seed' must be an integer"),
        ("surrogate", {"seed": 0, "backbone": 18, "weighting": "e"}, "'surrogate.backbone' must be a string"),
        ("victims", [], "'victims' must be a non-empty list"),
        ("victims", {"seed": 1}, "'victims' must be a non-empty list"),
        ("victims", [{"seed": 1, "clean": {"mean": 0.5, "per_task": {}}}], r"'victims\[0\]' lacks 'protected'"),
        ("victims", [victim(), victim(2.0)], r"'victims\[1\].seed' must be an integer"),
        ("victims", [victim(), victim(), victim(3)], r"repeats victim seeds \[1\]"),
        ("victims", [victim(clean={"mean": 0.5})], r"'victims\[0\].clean' must have 'mean' and 'per_task'"),
        ("victims", [victim(protected={"mean": 0.5, "per_task": {"nope": 0.1}})], "names unknown tasks"),
        ("victims", [victim(protected={"mean": "high", "per_task": {}})], r"'victims\[0\].protected.mean' must be"),
    ],
)  # fmt: skip
def test_build_report_names_the_bad_field(name, value, message):
    with pytest.raises(ValueError, match=message):
        rep.build_report(**{**fields(), name: value})


@pytest.mark.parametrize("name", ["weighting", "surrogate", "victims"])
def test_build_report_names_the_missing_field(name):
    f = fields()
    del f[name]
    with pytest.raises(ValueError, match=f"'{name}' is missing"):
        rep.build_report(**f)


def test_defense_may_be_a_name_or_a_dict():
    assert rep.build_report(**fields(), defense="jpeg")["defense"] == "jpeg"
    assert rep.build_report(**fields(), defense={"name": "adv", "eps": 8 / 255})["defense"]["name"] == "adv"


# ----------------------------------------------------------------------------- write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_write_report_files_strict_json_and_figures(tmp_path, monkeypatch):
    written = []
    real = report_files.atomic_path

    def spy(path):
        written.append(Path(path))
        return real(path)

    monkeypatch.setattr(report_files, "atomic_path", spy)
    rng = np.random.default_rng()
    f = fields(rng, undefined=[(0, "protected", "young"), (1, "protected", "young"), (2, "protected", "young")])
    r = rep.build_report(**f, stl={"mean": 0.8, "per_task": {"smile": 0.85}}, defense="jpeg")
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
    assert all(v["protected"]["per_task"]["young"] is None for v in data["victims"])
    assert data["drop"] == pytest.approx(r["drop"]) and data["drop_std"] == pytest.approx(r["drop_std"])
    assert data["surrogate"] == {"seed": 0, "backbone": "resnet18", "weighting": "equal"}
    assert text.index('"backbone"') < text.index('"dataset"')  # sorted keys
    md = (out / "report.md").read_text()
    for needle in ("SYNTHETIC", "smile", "young", "8/255", "resnet34", "resnet18", "dwa", "n/a", "Perturbation statistics",
                   "stl", "| seed | clean mean | protected mean | drop |", f"{r['drop']:.4f} ± {r['drop_std']:.4f}",
                   "3 victim seeds", "surrogate (attacked by the generator)", "the drop measures transfer"):  # fmt: skip
        assert needle in md, needle
    for v in r["victims"]:
        assert f"| {v['seed']} | {v['clean']['mean']:.4f} | {v['protected']['mean']:.4f} | {v['drop']:.4f} |" in md
    assert md.count("trained under the defence `jpeg`, so the drop is what the protection still costs a defended victim") == 1
    width, height = png_size(out / "figures" / "metrics.png")
    assert width >= 1200 and 400 < height < 1500
    width, height = png_size(out / "figures" / "samples.png")
    assert 5 * 100 < width < 2500 and 3 * 100 < height < 1200


def test_recipe_table_shows_width_and_epochs_and_names_what_differs():
    f = fields(backbone="resnet18", weighting="equal")
    f["surrogate"] = {**f["surrogate"], "width": 0.25, "epochs": 20}
    md = rep.render_markdown(rep.build_report(**f, width=0.5, epochs=12))
    assert "| model | seed(s) | backbone | weighting | width | epochs |" in md
    assert "| surrogate (attacked by the generator) | 0 | resnet18 | equal | 0.25 | 20 |" in md
    assert "| victims, mtl (measure the protection) | 1, 2, 3 | resnet18 | equal | 0.5 | 12 |" in md
    assert "differs from the surrogate's (width, epochs): the drop measures transfer" in md
    same = rep.render_markdown(rep.build_report(**f, width=0.25, epochs=20))
    assert "measures transfer" not in same


def test_forty_tasks_and_grayscale_samples(tmp_path):
    names = [f"Attribute_Number_{i:02d}_Long_Name" for i in range(40)]
    f = {**fields(tasks=tuple(names), seeds=(1,)), "synthetic": False, "metric": "auc"}
    r = rep.build_report(**f)
    rng = np.random.default_rng()
    clean = make_images(rng, 20, (1, 64, 64))
    prot = (clean.astype(np.int16) + rng.integers(-4, 5, clean.shape)).astype(np.uint8)
    rep.write_report(tmp_path, r, clean_images=clean, protected_images=prot)
    width, height = png_size(tmp_path / "figures" / "metrics.png")
    assert width >= 40 * rep.INCHES_PER_TASK * rep.DPI and 500 < height < 2000
    width, height = png_size(tmp_path / "figures" / "samples.png")
    assert 8 * 100 < width < 2500 and 3 * 100 < height < 1200
    md = (tmp_path / "report.md").read_text()
    assert "SYNTHETIC" not in md and "1 victim seed, no std" in md and "| victim defence | none |" in md
    assert "costs a defended victim" not in md and "transfer" in md
    assert rep.samples_figure(clean[:1], prot[:1]).get_size_inches()[0] > rep.TILE_INCHES


def test_samples_rows_show_amplified_absolute_delta():
    rng = np.random.default_rng()
    clean = make_images(rng, 3, (3, 8, 8))
    prot = clean.copy()
    prot[1, 0, 2, 3] += 6
    figure = rep.samples_figure(clean, prot, count=3)
    axes = figure.get_axes()
    assert len(axes) == 9 and [a.get_ylabel().split("\n")[0] for a in axes[::3]] == ["clean", "protected", "|delta| x42.5"]
    shown = axes[7].get_images()[0].get_array()  # |delta| row, second image: RGB [H, W, 3]
    assert shown[2, 3, 0] == 255 and shown.sum() == 255
    same = rep.samples_figure(clean, clean, count=3)
    assert "all zero" in same.get_axes()[6].get_ylabel()


def test_dense_report_renders(tmp_path):
    tasks = ["segmentation", "depth", "normal"]
    rng = np.random.default_rng()
    f = fields(rng, tuple(tasks), seeds=(3, 4))
    f["metric"] = {"segmentation": "miou", "depth": "depth_abs_error (m)", "normal": "normal_angle_mean (deg)"}
    for v in f["victims"]:
        v["clean"]["per_task"]["normal"] = float(rng.uniform(25, 35))
        v["protected"]["per_task"]["normal"] = float(rng.uniform(35, 50))
    f["perturbation_stats"] = {**f["perturbation_stats"], "per_task": dict.fromkeys(tasks)}
    data = rep.write_report(tmp_path, rep.build_report(**f))
    normals = [v["clean"]["per_task"]["normal"] for v in f["victims"]]
    assert data["clean"]["per_task"]["normal"] == pytest.approx(np.mean(normals))
    assert "miou" in (tmp_path / "report.md").read_text()
    assert png_size(tmp_path / "figures" / "metrics.png")[0] >= 1200
    assert not (tmp_path / "figures" / "samples.png").exists()
    assert len(rep.metrics_figure(data).get_axes()) == 3


def test_summary_table():
    r = rep.build_report(**fields(undefined=[(0, "protected", "young"), (1, "protected", "young"), (2, "protected", "young")]))
    table = rep.summary_table(r)
    lines = table.splitlines()
    assert "smile" in table and "young" in table and "n/a" in table
    assert f"{r['drop']:.4f} ± {r['drop_std']:.4f}" in lines[-1] and "3 victim seeds" in lines[-1]
    assert len({len(line) for line in lines[:-1] if line.strip()}) == 1  # aligned columns
    one = rep.summary_table(rep.build_report(**fields(seeds=(9,))))
    assert "1 victim seed, no std" in one.splitlines()[-1] and "±" not in one


def test_versions_and_git(monkeypatch):
    v = rep.versions()
    assert {"mtlue_fast", "torch", "cuda", "dali", "gpu"} <= set(v)
    g = rep.git_revision()
    assert g is None or (len(g) >= 40 and int(g, 16) >= 0)

    def boom(*args, **kwargs):
        raise OSError("no git")

    monkeypatch.setattr(machine.subprocess, "run", boom)
    assert rep.git_revision() is None and machine.git_revision is rep.git_revision


def test_cpu_model_reads_lscpu_then_proc_cpuinfo(monkeypatch):
    import subprocess

    class Done:
        stdout = "Architecture: x86_64\nModel name:          Test CPU 9000\nThread(s) per core: 1\n"

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done())
    assert rep.cpu_model() == "Test CPU 9000"

    def missing(*a, **k):
        raise FileNotFoundError("lscpu")

    monkeypatch.setattr(subprocess, "run", missing)
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    assert rep.cpu_model() == (names[0] if names else "unknown")
    assert machine.cpu_model is rep.cpu_model  # the report's re-export of the one probe
