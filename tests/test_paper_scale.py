"""bench/paper_scale.py at its CPU smoke size: every stage runs through the package's code and the
JSON has the fields the GPU run is read by."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "paper_scale.py"
STAGES = ("cache_build", "surrogate", "generator", "export", "victim_clean", "victim_protected", "evaluation")


@pytest.fixture(scope="module")
def paper_scale():
    spec = importlib.util.spec_from_file_location("paper_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke(paper_scale, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("paper_scale") / "result.json"
    assert paper_scale.main(["--cpu", "--out", str(out), "--workdir", str(out.parent)]) == 0
    return json.loads(out.read_text())


def test_smoke_json(smoke):
    assert smoke["scale"] == "cpu-smoke" and smoke["device_type"] == "cpu" and smoke["complete"] is True
    assert isinstance(smoke["device"], str) and smoke["device"]
    assert smoke["peak_gpu_memory_bytes"] is None
    assert {"torch", "python", "mtlue_fast"} <= set(smoke["versions"]) and smoke["versions"]["torch"]
    assert smoke["date"] and smoke["command"].startswith("bench/paper_scale.py --cpu")
    assert tuple(smoke["stages"]) == STAGES
    for name, stage in smoke["stages"].items():
        assert stage["images_per_second"] > 0 and stage["full_job_seconds"] > 0, name
        assert stage["steps_timed"] >= 1 and stage["full_job_images"] > 0, name
        assert stage["full_job_seconds"] == pytest.approx(
            stage["instances"] * stage["setup_seconds"] + stage["compute_seconds"] + stage["periods"] * stage["seconds_per_period"]
        )
        assert stage["compute_seconds"] == pytest.approx(stage["full_job_images"] / stage["images_per_second"])
    total = sum(stage["full_job_seconds"] for stage in smoke["stages"].values())
    assert smoke["full_job_seconds"] == pytest.approx(total, rel=1e-12)
    assert smoke["full_job_minutes"] == pytest.approx(total / 60)


def test_smoke_counts_the_paper_job(smoke):
    """Whatever the smoke sizes, the extrapolation counts the paper's job: its images, epochs, passes."""
    stages, settings = smoke["stages"], smoke["settings"]
    assert settings["train_images"] == 162_770 and settings["test_images"] == 19_962
    assert stages["cache_build"]["full_job_images"] == 162_770 + 19_962
    batch = settings["train"]["batch_size"]
    per_epoch = 162_770 - 162_770 % batch
    assert settings["train"]["epochs"] == settings["victims"]["epochs"] == 60
    assert stages["surrogate"]["full_job_images"] == 60 * per_epoch and stages["surrogate"]["periods"] == 60
    assert stages["victim_clean"] == stages["victim_protected"]
    assert stages["generator"]["passes"] == settings["generator_passes"] == 15
    assert stages["export"]["full_job_images"] == 162_770 and stages["export"]["batch_size"] == 256
    assert stages["evaluation"]["evaluations"] == 3 * 60 and stages["evaluation"]["full_job_images"] == 180 * 19_962
    assert settings["generate"]["base"] == "tap" and settings["train"]["backbone"] == "resnet18"
    assert all(t["met"] is None for t in smoke["targets"].values())  # no verdicts at the smoke size
    assert {"data.cache_size", "train.width", "generate.width"} <= set(smoke["paper_settings_changed"])
    assert smoke["victim_images_per_second"] == stages["victim_clean"]["images_per_second"]


def test_paper_settings_come_from_the_config(paper_scale):
    """Without --cpu the config is configs/celeba.yaml's paper settings; --set still applies."""
    args = paper_scale.parse_args(["--set", "train.compile=true"])
    cfg = paper_scale.resolve_config(args)
    assert (cfg.train.width, cfg.train.batch_size, cfg.train.epochs) == (1.0, 512, 60)
    assert (cfg.generate.width, cfg.generate.batch_size, cfg.generate.base) == (1.0, 512, "tap")
    assert cfg.data.cache_size is None and cfg.train.compile is True
    assert paper_scale.changed_paper_settings(cfg) == []  # a speed switch: still the paper's job
    smaller = paper_scale.resolve_config(paper_scale.parse_args(["--set", "train.batch_size=256"]))
    assert paper_scale.changed_paper_settings(smaller) == ["train.batch_size"]


def test_bad_arguments(paper_scale):
    from mtlue_fast.config import ConfigError

    with pytest.raises(ConfigError, match="train.lrr"):
        paper_scale.resolve_config(paper_scale.parse_args(["--set", "train.lrr=1"]))
    with pytest.raises(SystemExit):
        paper_scale.parse_args(["--steps", "0"])
    with pytest.raises(SystemExit, match="generate.base=em"):
        paper_scale.resolve_config(paper_scale.parse_args(["--cpu", "--set", "generate.base=em"]))


def test_a_run_stopped_partway_keeps_the_stages_it_measured(paper_scale, tmp_path, monkeypatch):
    """The JSON is rewritten after every stage: stopped during the export (as by a time limit's
    SIGINT), the file holds the stages before it, marked incomplete, without totals or verdicts."""
    out = tmp_path / "result.json"

    def interrupted(*args, **kwargs):
        assert "generator" in json.loads(out.read_text())["stages"]
        raise KeyboardInterrupt

    monkeypatch.setattr(paper_scale, "time_export", interrupted)
    with pytest.raises(KeyboardInterrupt):
        paper_scale.main(["--cpu", "--out", str(out), "--workdir", str(tmp_path)])
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and partial["full_job_seconds"] is None
    assert set(partial["stages"]) == set(STAGES) - {"export"}
    assert partial["stages_measured"] == ",".join(s for s in STAGES if s != "export")
    assert all(t["met"] is None for t in partial["targets"].values())
    assert partial["victim_images_per_second"] == partial["stages"]["victim_clean"]["images_per_second"]
