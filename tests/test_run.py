"""``python -m mtlue_fast.run`` end to end on the synthetic samples (smoke preset), reruns, resume
and bad input."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

from mtlue_fast import run as run_module
from mtlue_fast.run import main

REPORT_FIELDS = (
    "dataset", "synthetic", "data_root", "tasks", "metric", "clean", "protected", "drop", "drop_std", "victims",
    "surrogate", "clean_cache", "eps", "base", "method", "backbone", "weighting", "victim", "timings", "throughput",
    "versions", "git", "perturbation_stats",
)  # fmt: skip


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("mtlue-cache")


@pytest.fixture(autouse=True)
def cache_root(shared_cache, monkeypatch):
    """Every run of this module shares one cache root (synthetic samples and caches), as users' runs do."""
    monkeypatch.setenv("MTLUE_CACHE", str(shared_cache))
    return shared_cache


def smoke(out, dataset="chestxray", *extra):
    return main(["--dataset", dataset, "--preset", "smoke", "--device", "cpu", "--out", str(out), "--quiet", *extra])


def victim_dir(out):
    """The run's current victim cell, ``OUT/victim/<recipe name>`` (mtlue_fast.victim_cells)."""
    return out / "victim" / json.loads((out / "stages.json").read_text())["victim"]["cell"]


def check_outputs(out, dense: bool = False) -> dict:
    assert (out / "config.yaml").exists()
    images = np.load(out / "protected" / "train_images.npy", mmap_mode="r")
    delta = np.load(out / "protected" / "delta.npy", mmap_mode="r")
    assert images.dtype == np.uint8 and delta.dtype == np.int8 and images.shape == delta.shape
    assert np.abs(delta).max() <= 8
    if not dense:
        labels = np.load(out / "protected" / "train_labels.npy")
        assert len(labels) == len(images)
    report = json.loads((out / "report.json").read_text())
    for field in REPORT_FIELDS:
        assert field in report, field
    assert report["synthetic"] is True and report["eps"] == pytest.approx(8 / 255)
    clean_images = np.load(f"{report['clean_cache']}/train_images.npy", mmap_mode="r")
    assert np.array_equal(np.asarray(clean_images).astype(np.int16) + np.asarray(delta), np.asarray(images))
    if not dense:
        for side in ("clean", "protected"):
            assert 0.0 <= report[side]["mean"] <= 1.0
        assert math.isfinite(report["drop"])
    assert (out / "report.md").exists() and (out / "figures" / "metrics.png").exists()
    assert report["surrogate"]["seed"] not in [v["seed"] for v in report["victims"]]
    assert not (out / "synthetic").exists() and not (out / "cache").exists()  # inputs live in the cache root
    return report


def test_chestxray_smoke_run_then_rerun_skips(tmp_path, capsys):
    out = tmp_path / "run"
    assert smoke(out) == 0
    report = check_outputs(out)
    assert report["metric"] == "auc" and len(report["tasks"]) == 14
    assert "drop" in capsys.readouterr().out
    stamps = {p: p.stat().st_mtime_ns for p in (out / "surrogate" / "final.pt", out / "generator" / "generator.pt", out / "protected" / "images.npy")}
    assert main(["--dataset", "chestxray", "--preset", "smoke", "--device", "cpu", "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # same command: every stage is already done
    err = capsys.readouterr().err
    for stage in ("surrogate", "generate", "export", "victim"):
        assert f"{stage}: skipped, finished earlier with the same settings" in err
    shutil.rmtree(out / "generator")  # a stage's output deleted by hand: the stage is redone, not skipped
    (out / "victims.json").unlink()
    assert main(["--dataset", "chestxray", "--preset", "smoke", "--device", "cpu", "--out", str(out)]) == 0
    assert (out / "generator" / "generator.pt").exists() and (out / "victims.json").exists()
    err = capsys.readouterr().err
    assert "generate: skipped" not in err and "victim: skipped" not in err
    assert "surrogate: skipped" in err


def test_independent_victims_several_seeds(tmp_path):
    out = tmp_path / "run"
    assert smoke(out, "chestxray", "--victim-seeds", "2") == 0
    report = check_outputs(out)
    assert report["surrogate"] == {"seed": 0, "backbone": "resnet18", "weighting": "ew", "width": 0.25, "epochs": 2}
    assert (report["backbone"], report["weighting"], report["width"], report["epochs"]) == ("resnet18", "ew", 0.25, 2)
    assert [v["seed"] for v in report["victims"]] == [1, 2]
    drops = [v["clean"]["mean"] - v["protected"]["mean"] for v in report["victims"]]
    assert [v["drop"] for v in report["victims"]] == pytest.approx(drops)
    assert report["drop"] == pytest.approx(np.mean(drops)) and report["drop_std"] == pytest.approx(np.std(drops, ddof=1))
    for seed in (1, 2):
        for side in ("clean", "protected"):
            assert (victim_dir(out) / f"seed-{seed}" / side / "final.pt").exists()
    first_pair = (victim_dir(out) / "seed-1" / "protected" / "final.pt").stat().st_mtime_ns
    assert smoke(out, "chestxray", "--victim-seeds", "3", "--resume") == 0  # one more pair, the others kept
    assert (victim_dir(out) / "seed-1" / "protected" / "final.pt").stat().st_mtime_ns == first_pair
    assert [v["seed"] for v in json.loads((out / "report.json").read_text())["victims"]] == [1, 2, 3]
    # the clean victim is not the surrogate: another seed gives other initial weights
    surrogate = torch.load(out / "surrogate" / "final.pt", weights_only=False)
    victim = torch.load(victim_dir(out) / "seed-1" / "clean" / "final.pt", weights_only=False)
    first = next(iter(surrogate["model"]))
    assert not torch.equal(surrogate["model"][first], victim["model"][first])


def test_victim_only_change_reuses_the_protected_export(tmp_path, capsys):
    out = tmp_path / "run"
    assert smoke(out) == 0
    stages = json.loads((out / "stages.json").read_text())
    stamps = {p: p.stat().st_mtime_ns for p in (out / "surrogate" / "final.pt", out / "generator" / "generator.pt", out / "protected" / "images.npy")}
    assert smoke(out, "chestxray", "--weighting", "uw") == 2  # other settings in OUT: refused without --resume
    assert smoke(out, "chestxray", "--weighting", "uw", "--resume") == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    again = json.loads((out / "stages.json").read_text())
    for stage in ("surrogate", "generate", "export"):
        assert again[stage]["digest"] == stages[stage]["digest"]
    assert again["victim"]["digest"] != stages["victim"]["digest"]
    report = json.loads((out / "report.json").read_text())
    assert report["weighting"] == "uw" and report["surrogate"]["weighting"] == "ew"


def test_default_out_is_stable_and_a_refused_run_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    command = ["--dataset", "chestxray", "--preset", "smoke", "--device", "cpu"]
    assert main([*command, "--stages", "prepare,surrogate"]) == 0
    assert main([*command, "--stages", "prepare,surrogate"]) == 0
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("chestxray-mtlue-tap-")
    assert "surrogate: skipped" in capsys.readouterr().err
    assert main([*command, "--set", "train.lr=0.002", "--stages", "prepare"]) == 0  # other protection settings
    assert len(list((tmp_path / "runs").iterdir())) == 2
    assert main([*command, "--backbone", "vgg16_bn", "--stages", "prepare"]) == 2  # victims only: same folder
    assert "--resume" in capsys.readouterr().err
    celeba_like = tmp_path / "celeba_root"
    celeba_like.mkdir()
    (celeba_like / "list_attr_celeba.txt").write_text("1\nSmiling\n")
    before = sorted((tmp_path / "runs").iterdir())
    assert main(["--dataset", "chestxray", "--data-root", str(celeba_like), "--quiet"]) == 2
    assert main(["--dataset", "chestxray", "--data-root", str(tmp_path / "missing"), "--quiet"]) == 2
    assert sorted((tmp_path / "runs").iterdir()) == before


def test_force_redoes_every_stage_and_keeps_foreign_files(tmp_path):
    out = tmp_path / "run"
    assert smoke(out) == 0
    surrogate = (out / "surrogate" / "final.pt").stat().st_mtime_ns
    (out / "my_notes.txt").write_text("mine")
    assert smoke(out, "chestxray", "--set", "train.lr=0.002", "--force") == 0
    assert (out / "surrogate" / "final.pt").stat().st_mtime_ns != surrogate  # retrained, not reused
    assert (out / "my_notes.txt").read_text() == "mine"
    assert "lr: 0.002" in (out / "config.yaml").read_text()
    check_outputs(out)


@pytest.mark.slow
def test_changed_setting_reruns_only_what_depends_on_it(tmp_path):
    out = tmp_path / "run"
    assert smoke(out) == 0
    surrogate = (out / "surrogate" / "final.pt").stat().st_mtime_ns
    generator = (out / "generator" / "generator.pt").stat().st_mtime_ns
    assert smoke(out, "chestxray", "--set", "generate.lambda_inter=50") == 2  # another run's settings: refused
    assert smoke(out, "chestxray", "--set", "generate.lambda_inter=50", "--resume") == 0
    assert (out / "surrogate" / "final.pt").stat().st_mtime_ns == surrogate
    assert (out / "generator" / "generator.pt").stat().st_mtime_ns != generator


def test_interrupted_run_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"

    def interrupted(self):
        raise KeyboardInterrupt

    generate = run_module.Run.generate
    monkeypatch.setattr(run_module.Run, "generate", interrupted)
    assert smoke(out) == 130
    assert "rerun the same command" in capsys.readouterr().err
    surrogate = (out / "surrogate" / "final.pt").stat().st_mtime_ns
    monkeypatch.setattr(run_module.Run, "generate", generate)  # not undo(): that would drop MTLUE_CACHE too
    assert smoke(out) == 0
    assert (out / "surrogate" / "final.pt").stat().st_mtime_ns == surrogate  # not retrained
    check_outputs(out)


@pytest.mark.parametrize("dataset", ["celeba", pytest.param("utkface", marks=pytest.mark.slow)])
def test_smoke_runs_for_other_formats(tmp_path, dataset):
    assert smoke(tmp_path / dataset, dataset) == 0
    check_outputs(tmp_path / dataset)


def test_nyuv2_smoke_run(tmp_path):
    assert smoke(tmp_path / "nyuv2", "nyuv2") == 0
    report = check_outputs(tmp_path / "nyuv2", dense=True)
    assert isinstance(report["metric"], dict)


@pytest.mark.parametrize("method", ["random", pytest.param("ar", marks=pytest.mark.slow)])
def test_baseline_methods(tmp_path, method):
    assert smoke(tmp_path / method, "chestxray", "--method", method, "--stages", "prepare,export,report,victim,surrogate") == 0
    assert json.loads((tmp_path / method / "report.json").read_text())["method"] == method


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_bad_input_gives_one_clear_message(tmp_path, capsys):
    assert main(["--dataset", "chestxray", "--data-root", str(tmp_path / "missing"), "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert "does not exist" in _error(capsys) and not (tmp_path / "a").exists()
    celeba_like = tmp_path / "celeba_root"
    celeba_like.mkdir()
    (celeba_like / "list_attr_celeba.txt").write_text("1\nSmiling\n")
    assert main(["--dataset", "chestxray", "--data-root", str(celeba_like), "--out", str(tmp_path / "b"), "--quiet"]) == 2
    assert "error:" in _error(capsys) and not (tmp_path / "b").exists()
    assert smoke(tmp_path / "c", "chestxray", "--set", "train.epoch=3") == 2
    assert "unknown config key 'train.epoch'" in _error(capsys)
    assert smoke(tmp_path / "d", "chestxray", "--stages", "prepare,train") == 2
    assert "unknown stage 'train'" in _error(capsys)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert smoke(foreign) == 2
    assert "not an mtlue_fast run" in _error(capsys) and (foreign / "notes.txt").read_text() == "keep me"
    if not torch.cuda.is_available():
        assert main(["--dataset", "chestxray", "--device", "cuda", "--out", str(tmp_path / "e"), "--quiet"]) == 2
        assert "no CUDA GPU" in _error(capsys)
    assert main(["--dataset", "mnist"]) == 2


@pytest.mark.slow
def test_stl_victims_sep_partial_protection_and_image_export(tmp_path):
    out = tmp_path / "run"
    code = smoke(out, "utkface", "--victim", "stl", "--base", "sep", "--export-images", "--protect-tasks", "age,race",
                 "--set", "sep_every=1")
    assert code == 0
    report = check_outputs(out)
    assert report["victim"] == "stl" and report["base"] == "sep"
    assert len(list((out / "surrogate").glob("epoch_*.pt"))) == 2
    assert any((out / "protected" / "images").rglob("*.png"))
    tasks = sorted(p.name for p in (victim_dir(out) / "seed-1" / "protected").iterdir() if p.is_dir())
    assert tasks == ["task_age", "task_gender", "task_race"]


@pytest.mark.slow
@pytest.mark.parametrize("defense", ["grayscale", "augment"])
def test_defended_runs_train_both_victims_under_the_defence(tmp_path, cache_root, defense):
    out = tmp_path / defense
    assert smoke(out, "celeba", "--defense", defense) == 0
    report = check_outputs(out)
    assert report["defense"] == defense
    for side in ("clean", "protected"):
        stored = json.loads((victim_dir(out) / "seed-1" / side / "result.json").read_text())
        if defense == "augment":
            assert stored["config"]["defense"] == "augment"
    if defense == "grayscale":
        assert any((cache_root / "defended").glob("grayscale-*"))  # the defended clean data, shared


def test_victims_side_by_side_equal_victims_trained_alone(tmp_path, capsys):
    """victims.processes=2: each victim trains in a process of its own at one thread, and ends with
    the very weights of the same victim trained in this process at one thread."""
    threads = torch.get_num_threads()
    out = tmp_path / "run"
    try:
        torch.set_num_threads(1)
        assert smoke(out, "chestxray", "--victim-seeds", "2") == 0
        cell = victim_dir(out)
        alone = {p.relative_to(cell): torch.load(p, weights_only=False)["model"] for p in sorted(cell.glob("seed-*/*/final.pt"))}
        first = json.loads((out / "report.json").read_text())["victims"]
        for folder in cell.glob("seed-*"):
            shutil.rmtree(folder)
        (out / "victims.json").unlink()
        torch.set_num_threads(2)
        capsys.readouterr()
        assert main(["--dataset", "chestxray", "--preset", "smoke", "--device", "cpu", "--out", str(out),
                     "--victim-seeds", "2", "--resume", "--set", "victims.processes=2"]) == 0  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert "training 4 networks side by side: 2 processes of 1 thread" in capsys.readouterr().err
    side = {p.relative_to(cell): torch.load(p, weights_only=False)["model"] for p in sorted(cell.glob("seed-*/*/final.pt"))}
    assert side.keys() == alone.keys() and len(side) == 4
    for name, weights in alone.items():
        for key, value in weights.items():
            assert torch.equal(value, side[name][key]), (name, key)
    again = json.loads((out / "report.json").read_text())["victims"]
    assert [(v["clean"], v["protected"]) for v in again] == [(v["clean"], v["protected"]) for v in first]


def test_deterministic_runs_fix_the_cublas_workspace_before_any_gpu_work(tmp_path, monkeypatch):
    """PyTorch reads CUBLAS_WORKSPACE_CONFIG once, at the first GPU matrix product: a resumed run's
    earlier stages would otherwise fix it before the deterministic training starts."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen = []

    def stop(name):
        seen.append(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "resolve_device", stop)
    args = run_module.parse_args(["--dataset", "chestxray", "--out", str(tmp_path / "r"), "--quiet", "--set", "train.deterministic=true"])
    with pytest.raises(KeyboardInterrupt):
        run_module.run(args)
    assert seen == [":4096:8"]


def test_deterministic_dense_training_is_refused_on_a_gpu(tmp_path):
    from test_train import make_dense_cache

    from mtlue_fast.train import TrainConfig, train

    config = TrainConfig(width=0.25, batch_size=4, epochs=1, progress=False, deterministic=True)
    with pytest.raises(ValueError, match="'deterministic' cannot be true for dense tasks on a GPU"):
        train(make_dense_cache(8, 0), make_dense_cache(4, 1), tmp_path / "t", config, device="cuda")
    assert not (tmp_path / "t").exists()
