"""Victim cells (one folder per victim recipe) and ``python -m mtlue_fast.sweep`` on the synthetic
ChestX-ray sample (smoke preset); every test starts from a copy of one finished protection."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mtlue_fast import config as config_module
from mtlue_fast import run as run_module
from mtlue_fast import sweep as sweep_module
from mtlue_fast import sweep_plan, victim_cells
from mtlue_fast.report import build_report, render_markdown, summarize_cell

SMOKE = ["--dataset", "chestxray", "--preset", "smoke", "--device", "cpu", "--quiet"]
#: report.json's top-level keys of a plain run before victim cells existed; cells only adds ``cells``.
PLAIN_REPORT_KEYS = {
    "backbone", "base", "clean", "clean_cache", "data_root", "dataset", "defense", "drop", "drop_std", "eps", "git",
    "method", "metric", "perturbation_stats", "protected", "surrogate", "synthetic", "tasks", "throughput", "timings",
    "versions", "victim", "victims", "weighting",
}  # fmt: skip


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    """One cache root (synthetic sample and caches) for the module, as users' runs share theirs."""
    root = tmp_path_factory.mktemp("mtlue-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MTLUE_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def protection(cache_root, tmp_path_factory):
    """A run folder with the protection stages finished (no victims yet)."""
    out = tmp_path_factory.mktemp("protection") / "run"
    assert run_module.main([*SMOKE, "--out", str(out), "--stages", "prepare,surrogate,generate,export"]) == 0
    return out


@pytest.fixture
def out(protection, tmp_path, cache_root):
    """A fresh copy of the finished protection."""
    copy = tmp_path / "run"
    shutil.copytree(protection, copy)
    return copy


def run(out, *extra) -> int:
    return run_module.main([*SMOKE, "--out", str(out), *extra])


def sweep(out, *extra) -> int:
    return sweep_module.main([*SMOKE, "--out", str(out), *extra])


def cell_folders(out) -> dict[str, dict]:
    """``{cell name: cell.json}`` of every cell folder."""
    return {p.name: victim_cells.read_cell(p) for p in (out / "victim").iterdir() if victim_cells.read_cell(p)}


def stamps(out) -> dict:
    """mtime of every victim's final.pt."""
    return {p: p.stat().st_mtime_ns for p in (out / "victim").rglob("final.pt")}


def by_fields(cells, **fields) -> list[dict]:
    return [c for c in cells if all(c["fields"][k] == v for k, v in fields.items())]


# ---------------------------------------------------------------------------- the sweep


def test_sweep_2x2_then_one_more_weighting_trains_only_the_new_cells(out, capsys):
    loud = [*SMOKE[:-1], "--out", str(out)]  # without --quiet: the progress lines
    assert sweep_module.main([*loud, "--backbones", "resnet18,resnet50", "--weightings", "ew,uw"]) == 0
    data = json.loads((out / "sweep.json").read_text())
    assert data["mode"] == "product" and len(data["cells"]) == 4 and len(cell_folders(out)) == 4
    assert {(c["fields"]["backbone"], c["fields"]["weighting"]) for c in data["cells"]} == {
        ("resnet18", "ew"), ("resnet18", "uw"), ("resnet50", "ew"), ("resnet50", "uw")}
    for cell in data["cells"]:
        assert cell["seeds"] == [1] and cell["drop"] == pytest.approx(cell["clean"]["mean"] - cell["protected"]["mean"])
        assert set(cell["clean"]["per_task"]) == set(data["tasks"])
    err = capsys.readouterr().err
    assert "sweep: cell 4/4" in err and "s so far" in err
    before = stamps(out)
    assert len(before) == 8  # 4 cells x (clean, protected)

    assert sweep_module.main([*loud, "--backbones", "resnet18,resnet50", "--weightings", "ew,uw,rlw"]) == 0
    data = json.loads((out / "sweep.json").read_text())
    assert len(data["cells"]) == 6 and len(cell_folders(out)) == 6
    trained = [c for c in data["cells"] if c["trained"]]
    assert sorted(c["fields"]["backbone"] for c in trained) == ["resnet18", "resnet50"]
    assert {c["fields"]["weighting"] for c in trained} == {"rlw"}
    after = stamps(out)
    assert {p: after[p] for p in before} == before and len(after) == 12  # the 4 earlier cells untouched
    assert "finished earlier" in capsys.readouterr().err
    markdown = (out / "sweep.md").read_text()
    every = markdown.split("## Every cell")[1]
    assert sum(line.startswith("| resnet") for line in every.splitlines()) == 6
    assert "## Victim backbone" in markdown and "## Task weighting" in markdown
    assert (out / "figures" / "sweep.png").stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["cells"]) == 6 and sum(c["current"] for c in report["cells"]) == 1


def test_compiled_victims_start_each_cell_with_an_empty_compiler(out, monkeypatch):
    """Kept, every cell's network shapes would fill the compiler's caches until its recompile limit
    silently sends the later cells' victims back to eager mode."""
    compiled, resets = [], []

    def fake_compile(fn, **kwargs):
        compiled.append(getattr(fn, "__qualname__", fn))
        return fn

    victim_train = config_module.RunConfig.victim_train
    # The victims compile (``train.compile`` would also retrain the finished surrogate).
    monkeypatch.setattr(config_module.RunConfig, "victim_train", lambda self, seed: victim_train(self, seed).replace(compile=True))
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(len(compiled)))
    assert sweep(out, "--weightings", "ew,uw,rlw") == 0
    data = json.loads((out / "sweep.json").read_text())
    # The run's own victims (the ew cell) train in its victim stage, before the cells.
    assert [c["trained"] for c in data["cells"]] == [False, True, True]
    assert compiled.count("MultiTaskNet.encode") == 6  # 3 recipes x (clean, protected)
    assert [compiled[:n].count("MultiTaskNet.encode") for n in resets] == [2, 4]  # before each cell's victims


def test_interrupted_sweep_resumes(out, monkeypatch, capsys):
    calls = []
    train = run_module.train

    def interrupted(*args, **kwargs):
        if str(kwargs.get("label")).startswith("victim"):
            calls.append(kwargs.get("label"))
        if len(calls) == 4:  # the run's own pair (2 victims), then the protected victim of the uw cell
            raise KeyboardInterrupt
        return train(*args, **kwargs)

    monkeypatch.setattr(run_module, "train", interrupted)
    assert sweep(out, "--weightings", "ew,uw,rlw") == 130
    assert "rerun the same command" in capsys.readouterr().err
    cells = cell_folders(out)
    assert sorted(c["fields"]["weighting"] for c in cells.values() if c["victims"]) == ["ew"]
    half = next(n for n, c in cells.items() if c["fields"]["weighting"] == "uw")
    clean = out / "victim" / half / "seed-1" / "clean" / "result.json"
    assert clean.exists() and not (out / "victim" / half / "seed-1" / "protected" / "result.json").exists()
    stamp = clean.stat().st_mtime_ns
    monkeypatch.setattr(run_module, "train", train)
    assert sweep(out, "--weightings", "ew,uw,rlw") == 0
    assert clean.stat().st_mtime_ns == stamp  # the finished victim of the half cell was kept
    data = json.loads((out / "sweep.json").read_text())
    assert [c["fields"]["weighting"] for c in data["cells"]] == ["ew", "uw", "rlw"]
    assert [c["trained"] for c in data["cells"]] == [False, True, True]


def test_one_axis_sweep_shares_the_run_recipe(out):
    assert sweep(out, "--one-axis", "--weightings", "ew,rlw", "--defenses", "none,bdr") == 0
    data = json.loads((out / "sweep.json").read_text())
    assert data["mode"] == "one-axis" and len(data["cells"]) == 3  # ew/none is the run's own, in both tables
    assert [t["axis"] for t in data["tables"]] == ["weighting", "defense"]
    markdown = (out / "sweep.md").read_text()
    assert "| ew (run) |" in markdown and "| none (run) |" in markdown and "| bdr |" in markdown
    bdr = by_fields(data["cells"], defense="bdr", weighting="ew")[0]
    assert 0.0 <= bdr["clean"]["mean"] <= 1.0 and bdr["name"].startswith("resnet18-ew-mtl-bdr-")
    assert (out / "victim" / "defended-bdr").is_dir()  # the defended protected data, shared by bdr cells


# ---------------------------------------------------------------------------- cells in plain runs


def test_plain_run_report_keeps_its_keys_and_gains_cells(out, monkeypatch):
    monkeypatch.setattr(run_module.Run, "report_cells", lambda self, *args: None)  # the report as before cells
    assert run(out) == 0
    without = json.loads((out / "report.json").read_text())
    monkeypatch.undo()
    assert run(out, "--stages", "report") == 0
    report = json.loads((out / "report.json").read_text())
    assert PLAIN_REPORT_KEYS <= set(report) and set(report) == set(without)  # "cells": null in the first
    assert without["cells"] is None and isinstance(report["cells"], list)
    for key in set(report) - {"cells", "timings"}:
        assert report[key] == without[key], key
    (cell,) = report["cells"]
    assert cell["current"] and cell["fields"]["backbone"] == report["backbone"] == "resnet18"
    assert cell["fields"]["weighting"] == report["weighting"] and cell["fields"]["defense"] == "none"
    for side in ("clean", "protected"):
        assert cell[side] == report[side]
    assert cell["drop"] == report["drop"] and cell["victims"] == report["victims"]
    stages = json.loads((out / "stages.json").read_text())
    name = stages["victim"]["cell"]
    assert name == cell["name"] and name.startswith("resnet18-ew-mtl-nodefense-") and name.endswith(cell["digest"][:8])
    assert (out / "victim" / name / "seed-1" / "protected" / "final.pt").exists()
    assert "## Victim recipes" not in (out / "report.md").read_text()  # one cell: no table


def test_victim_only_resume_change_keeps_the_earlier_cell(out):
    assert run(out) == 0
    first = stamps(out)
    assert run(out, "--weighting", "uw") == 2  # another run's settings: refused without --resume
    assert run(out, "--weighting", "uw", "--resume") == 0
    assert {p: stamps(out)[p] for p in first} == first and len(stamps(out)) == 4
    report = json.loads((out / "report.json").read_text())
    assert report["weighting"] == "uw" and len(report["cells"]) == 2
    current = [c for c in report["cells"] if c["current"]]
    assert [c["fields"]["weighting"] for c in current] == ["uw"] and current[0]["drop"] == report["drop"]
    markdown = (out / "report.md").read_text()
    assert "## Victim recipes" in markdown and "(this run)" in markdown
    both = stamps(out)
    assert run(out, "--weighting", "ew", "--resume") == 0  # back to the first recipe: nothing retrained
    assert stamps(out) == both
    report = json.loads((out / "report.json").read_text())
    assert report["weighting"] == "ew" and len(report["cells"]) == 2


def test_victims_of_another_width_are_a_cell_of_their_own(out):
    assert run(out) == 0
    first = stamps(out)
    assert run(out, "--set", "victims.width=0.5", "--resume") == 0
    assert {p: stamps(out)[p] for p in first} == first and len(stamps(out)) == 4
    report = json.loads((out / "report.json").read_text())
    current = [c for c in report["cells"] if c["current"]]
    assert [c["fields"].get("width") for c in current] == [0.5]
    assert [c["fields"].get("width") for c in report["cells"] if not c["current"]] == [None]
    wide = next(p for p in stamps(out) if p not in first)
    stem = "backbone.conv1.weight"
    wide_stem = torch.load(wide, map_location="cpu", weights_only=False)["model"][stem]
    narrow_stem = torch.load(next(iter(first)), map_location="cpu", weights_only=False)["model"][stem]
    assert wide_stem.shape[0] == 2 * narrow_stem.shape[0]  # width 0.5 against the smoke preset's 0.25


@pytest.mark.parametrize("name, own", [("width", 0.5), ("epochs", 1)])
def test_victim_width_or_epochs_in_the_recipe_only_when_they_differ(name, own):
    cfg = config_module.resolve("chestxray", synthetic=True, preset="smoke")
    assert name not in cfg.identity()["victims"]  # unset: digests of earlier runs unchanged
    assert name not in victim_cells.victim_recipe_fields(cfg)
    digest = victim_cells.recipe_digest("e" * 64, cfg)
    surrogates = getattr(cfg.train, name)
    same = config_module.resolve("chestxray", synthetic=True, preset="smoke", assignments=[f"victims.{name}={surrogates}"])
    assert victim_cells.victim_recipe_fields(same) == victim_cells.victim_recipe_fields(cfg)
    assert same.identity() == cfg.identity()  # the surrogate's value named: the same run
    assert victim_cells.recipe_digest("e" * 64, same) == digest
    other = config_module.resolve("chestxray", synthetic=True, preset="smoke", assignments=[f"victims.{name}={own}"])
    assert victim_cells.victim_recipe_fields(other)[name] == own
    assert victim_cells.recipe_digest("e" * 64, other) != digest
    assert getattr(other.victim_train(1), name) == own and getattr(other.train, name) == surrogates  # the surrogate keeps its own
    with pytest.raises(config_module.ConfigError, match=f"victims.{name}"):
        config_module.resolve("chestxray", synthetic=True, preset="smoke", assignments=[f"victims.{name}=0"])


def test_victims_of_other_epochs_train_that_long_and_the_surrogate_does_not(out, capsys):
    assert run(out, "--set", "victims.epochs=1", "--resume") == 0
    report = json.loads((out / "report.json").read_text())
    (cell,) = [c for c in report["cells"] if c["current"]]
    assert cell["fields"]["epochs"] == 1
    for kind in ("clean", "protected"):
        history = (out / "victim" / cell["name"] / "seed-1" / kind / "metrics.jsonl").read_text().splitlines()
        assert len(history) == 1
    assert len((out / "surrogate" / "metrics.jsonl").read_text().splitlines()) == 2  # the smoke preset's 2 epochs
    capsys.readouterr()
    assert run(out, "--set", "victims.epochs=1", "--reuse-surrogate-as-clean", "--resume") == 2  # a clean victim of 2 epochs is not one of 1
    assert "width and epochs" in capsys.readouterr().err


def _to_legacy_layout(out, recipe: str | None) -> None:
    """Rewrite a finished run as the victim layout before cells wrote it: ``victim/seed-<s>`` and
    stages.json's victim ``recipe`` (``None``: the legacy digest of this run's settings)."""
    stages = json.loads((out / "stages.json").read_text())
    cell = out / "victim" / stages["victim"].pop("cell")
    for pair in cell.glob("seed-*"):
        pair.rename(out / "victim" / pair.name)
    shutil.rmtree(cell)
    if recipe is None:
        cfg = config_module.resolve("chestxray", synthetic=True, preset="smoke", overrides={"device": "cpu"})
        runner = run_module.Run(cfg, out, None, torch.device("cpu"), lambda text: None)
        runner.prepare()
        recipe = runner._legacy_victim_recipe()
    stages["victim"]["recipe"] = recipe
    (out / "stages.json").write_text(json.dumps(stages))


def test_sweep_refuses_other_recipes_when_the_surrogate_stands_in_for_the_clean_victims(out, capsys):
    assert sweep(out, "--weightings", "ew,uw", "--reuse-surrogate-as-clean", "--resume") == 2
    err = capsys.readouterr().err
    assert "cannot train the recipe" in err and "uw" in err
    assert "--reuse-surrogate-as-clean needs the surrogate's own recipe (resnet18 / ew / width 0.25 / 2 epochs" in err


def test_legacy_victim_folders_move_into_their_cell(out, capsys):
    assert run(out, "--victim-seeds", "2", "--resume") == 0
    before = {p.relative_to(p.parents[3]): p.stat().st_mtime_ns for p in (out / "victim").rglob("final.pt")}
    _to_legacy_layout(out, None)
    assert (out / "victim" / "seed-1").is_dir()
    assert run_module.main([*SMOKE[:-1], "--out", str(out), "--victim-seeds", "2"]) == 0
    assert "moved 2 victim pair(s) of the earlier folder layout" in capsys.readouterr().err
    assert not (out / "victim" / "seed-1").exists()
    after = {p.relative_to(p.parents[3]): p.stat().st_mtime_ns for p in (out / "victim").rglob("final.pt")}
    assert after == before  # moved, not retrained
    (cell,) = cell_folders(out).values()
    assert [v["seed"] for v in cell["victims"]] == [1, 2]


def test_legacy_victim_folders_of_other_settings_are_removed(out, capsys):
    assert run(out) == 0
    _to_legacy_layout(out, "0" * 64)
    assert run_module.main([*SMOKE[:-1], "--out", str(out)]) == 0
    assert "removed 1 victim pair(s) of the earlier folder layout" in capsys.readouterr().err
    assert not (out / "victim" / "seed-1").exists() and len(cell_folders(out)) == 1


@pytest.mark.slow
def test_a_new_export_removes_the_stale_cells(out, capsys):
    assert sweep(out, "--weightings", "ew,rlw") == 0
    assert len(cell_folders(out)) == 2
    assert run_module.main([*SMOKE[:-1], "--out", str(out), "--set", "generate.lambda_inter=50", "--resume"]) == 0
    assert "removed 2 victim cell(s) of an earlier protected export" in capsys.readouterr().err
    (cell,) = cell_folders(out).values()
    assert cell["fields"]["weighting"] == "ew"
    assert len(json.loads((out / "report.json").read_text())["cells"]) == 1


# ---------------------------------------------------------------------------- plan, arguments, report pieces


def test_plan_product_and_one_axis():
    base = {"backbone": "resnet18", "weighting": "ew", "victim": "mtl", "defense": "none"}
    axes = {"backbone": ["resnet18", "resnet50"], "weighting": ["ew", "uw"]}
    product = sweep_plan.plan(base, axes, one_axis=False)
    assert len(product.recipes) == 4 and [t[0] for t in product.tables] == ["backbone", "weighting"]
    one = sweep_plan.plan(base, axes, one_axis=True)
    assert one.recipes == [base, {**base, "backbone": "resnet50"}, {**base, "weighting": "uw"}]
    assert one.tables == [("backbone", [0, 1]), ("weighting", [0, 2])]
    paper = sweep_plan.paper_axes()
    assert len(sweep_plan.plan(base, paper, one_axis=True).recipes) == 5 + 8 + 5  # the run's recipe once
    assert sweep_plan.unsupported({**base, "defense": "grayscale"}, dense=False, channels=1) is not None
    assert sweep_plan.unsupported({**base, "defense": "grayscale"}, dense=False, channels=3) is None
    assert sweep_plan.paper_axes(dense=True)["backbone"] == ["resnet18", "resnet50"]
    assert sweep_plan.unsupported({**base, "backbone": "vgg16_bn"}, dense=True, channels=3) is not None


def test_cell_names_and_recipe_digests():
    cfg = config_module.resolve("chestxray", synthetic=True, preset="smoke")
    fields = victim_cells.victim_recipe_fields(cfg)
    assert fields["backbone"] == "resnet18" and fields["weighting"] == "ew" and fields["defense"] == "none"
    digest = victim_cells.recipe_digest("e" * 64, cfg)
    name = victim_cells.cell_name(fields, digest)
    assert name.startswith("resnet18-ew-mtl-nodefense") and name.endswith("-" + digest[:8])
    explicit = sweep_plan.recipe_config(cfg, {**fields, "backbone": "resnet18"})  # named, not inherited: same cell
    assert victim_cells.recipe_digest("e" * 64, explicit) == digest
    more_seeds = config_module.resolve("chestxray", synthetic=True, preset="smoke", overrides={"victims": {"seeds": 3}})
    assert victim_cells.recipe_digest("e" * 64, more_seeds) == digest  # seeds are pairs within the cell
    assert victim_cells.recipe_digest("f" * 64, cfg) != digest  # another export
    other = sweep_plan.recipe_config(cfg, {**fields, "defense": "jpeg"})
    assert victim_cells.recipe_digest("e" * 64, other) != digest


def test_sweep_arguments(tmp_path, capsys):
    args, run_args = sweep_module.parse_args(["--dataset", "chestxray", "--backbone", "resnet50", "--backbones", "resnet18"])
    assert run_args.backbone == "resnet50" and args.backbones == "resnet18"  # run's flag is not an abbreviation
    assert sweep(tmp_path / "a") == 2
    assert "nothing to sweep" in capsys.readouterr().err
    assert sweep(tmp_path / "b", "--backbones", "resnet18,lenet") == 2
    assert "--backbones: unknown backbone 'lenet'" in capsys.readouterr().err
    assert sweep(tmp_path / "c", "--weightings", "ew", "--stages", "prepare") == 2
    assert "--stages" in capsys.readouterr().err
    assert sweep(tmp_path / "d", "--axes", "paper", "--product") == 2
    assert not any((tmp_path / n).exists() for n in "abcd")


def test_report_cells_schema_and_markdown():
    scores = {"mean": 0.8, "per_task": {"a": 0.8}}
    low = {"mean": 0.5, "per_task": {"a": 0.5}}
    victims = [{"seed": 1, "clean": scores, "protected": low}, {"seed": 2, "clean": scores, "protected": scores}]
    cell = summarize_cell({"name": "n", "digest": "d", "fields": {"backbone": "resnet18"}, "victims": victims}, ["a"])
    assert cell["seeds"] == [1, 2] and cell["drop"] == pytest.approx(0.15) and cell["drop_std"] == pytest.approx(0.2121, abs=1e-4)
    with pytest.raises(ValueError, match="cells"):
        summarize_cell({"name": "n", "fields": {}, "victims": victims}, ["a"], "cells[0]")
    stats = {"per_task": {}, "mean_abs_delta": 1.0, "max_abs_delta": 8, "samples": 1}
    fields = dict(dataset="chestxray", synthetic=True, data_root=None, tasks=["a"], metric="auc", victims=victims,
                  surrogate={"seed": 0, "backbone": "resnet18", "weighting": "ew"}, clean_cache="c", eps=8 / 255,
                  base="tap", method="mtlue", backbone="resnet18", weighting="ew", victim="mtl", timings={},
                  throughput={}, versions={}, git=None, perturbation_stats=stats)  # fmt: skip
    one = {"name": "x", "digest": "d", "fields": {"backbone": "resnet18", "weighting": "ew"}, "victims": victims, "current": True}
    two = {**one, "name": "y", "fields": {"backbone": "resnet18", "weighting": "uw"}, "current": False}
    assert "## Victim recipes" not in render_markdown(build_report(**fields, cells=[one]))
    text = render_markdown(build_report(**fields, cells=[one, two]))
    assert "## Victim recipes" in text and "| **resnet18** (this run) | ew |" in text and "| resnet18 | uw |" in text
    with pytest.raises(ValueError, match="'cells' must be a list"):
        build_report(**fields, cells="x")
