"""Part ``pipeline``: the whole pipeline, ``python -m mtlue_fast.run``, on the built-in synthetic data.

Runs (``--pipeline-runs``, default every run of :data:`RUNS`):

- ``celeba``: the synthetic CelebA default (8,000 / 2,000 images, 20 epochs at batch 128) with the
  victims, the surrogate and the generator at full width and the victims trained as long as the
  surrogate (``train.width=1.0``, ``generate.width=1.0``, ``victims.width=1.0``,
  ``victims.epochs=20``); about 110 s on one H200 with 6 TAP passes.
- ``chestxray``: the synthetic ChestX-ray default with 3 victim seeds; about 100 s on one H200.

With ``--cpu`` each run is ``--preset smoke`` made smaller still (:data:`CPU_SETTINGS`; the
surrogate's metrics stand in for the clean victim's; a few seconds each): the plumbing, not a
meaningful drop.
``--pipeline-set KEY=VALUE`` adds a ``--set`` to every run. Each run starts from a fresh cache
(``$MTLUE_CACHE`` in a temporary folder, so ``prepare`` writes and decodes its data) and a
temporary run folder; its ``report.json``, ``stages.json``, ``victims.json`` and ``config.yaml`` are
copied to ``<out>/pipeline/<run>/``.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys

from .runner import Context, PartFailed, progress, run_logged, shares, time_left

#: name -> (arguments, more arguments on a GPU, --set on a GPU, weight of the part's time)
RUNS = {
    "celeba": (["--dataset", "celeba"], [], ["train.width=1.0", "generate.width=1.0", "victims.width=1.0", "victims.epochs=20"], 1.0),
    "chestxray": (["--dataset", "chestxray"], ["--victim-seeds", "3"], [], 1.0),
}
CPU_SETTINGS = [
    "data.synthetic_train=128", "data.synthetic_test=64", "train.epochs=1", "train.batch_size=32",
    "generate.batch_size=32", "generate.stop_subset=64", "victims.reuse_surrogate=true",
]  # fmt: skip
KEPT = ("report.json", "stages.json", "victims.json", "config.yaml")


def command(ctx: Context, name: str, run_dir, extra_sets: list[str]) -> tuple[list[str], list[str]]:
    """The command of run ``name`` and its ``--set`` list."""
    args, gpu_args, gpu_sets, _ = RUNS[name]
    args = args + (gpu_args if ctx.gpu else [])
    sets = (gpu_sets if ctx.gpu else CPU_SETTINGS) + extra_sets
    cmd = [sys.executable, "-m", "mtlue_fast.run", *args, "--device", ctx.device, "--out", str(run_dir), "--quiet"]
    if not ctx.gpu:
        cmd += ["--preset", "smoke"]
    for s in sets:
        cmd += ["--set", s]
    return cmd, sets


def one_run(ctx: Context, name: str, seconds: float) -> tuple[dict, str | None]:
    """Run ``name`` for at most ``seconds``; its results, and the problem (None when it finished)."""
    run_dir, cache = ctx.work / "pipeline" / name, ctx.work / "pipeline-cache" / name
    cmd, sets = command(ctx, name, run_dir, list(getattr(ctx.args, "pipeline_set", None) or []))
    progress(f"  pipeline {name}: {shlex.join(cmd[1:])} (up to {seconds:.0f} s)")
    proc = run_logged(cmd, seconds, ctx.logs / f"pipeline-{name}.log", ctx.env(MTLUE_CACHE=str(cache)))
    results: dict = {"run": proc.brief(), "settings": sets, "preset": "default" if ctx.gpu else "smoke"}
    if ctx.out is not None:
        kept = ctx.out / "pipeline" / name
        kept.mkdir(parents=True, exist_ok=True)
        for file in KEPT:
            if (run_dir / file).is_file():
                shutil.copy(run_dir / file, kept / file)
        results["files"] = str(kept)
    report_path = run_dir / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        results.update(
            metric=report.get("metric"), drop=report.get("drop"), drop_std=report.get("drop_std"),
            clean_mean=(report.get("clean") or {}).get("mean"), protected_mean=(report.get("protected") or {}).get("mean"),
            timings=report.get("timings"), throughput=report.get("throughput"),
        )  # fmt: skip
    elif (run_dir / "stages.json").is_file():
        results["timings"] = {k: v.get("seconds") for k, v in json.loads((run_dir / "stages.json").read_text()).items()}
    if proc.rc == 0 and report_path.is_file():
        return results, None
    results["log_tail"] = "\n".join(proc.tail.splitlines()[-20:])
    return results, f"{name}: run {proc.why()}" + ("" if report_path.is_file() else "; no report.json (stage times from stages.json)")


def part_pipeline(ctx: Context, deadline: float) -> dict:
    names = list(getattr(ctx.args, "pipeline_runs", None) or RUNS)
    results: dict = {}
    problems = []
    for i, name in enumerate(names):
        seconds = shares(time_left(deadline), [RUNS[n][3] for n in names[i:]])[0]
        results[name], problem = one_run(ctx, name, seconds)
        if problem:
            problems.append(problem)
    if problems:
        raise PartFailed("; ".join(problems), results)
    return results
