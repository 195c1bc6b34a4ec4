"""``python -m mtlue_fast.sweep``: measure one protected export against many victim recipes.

Takes every argument of ``python -m mtlue_fast.run`` (dataset, data root, out, config, preset,
``--set``, ``--victim-seeds`` ...: they choose the run, and ``--victim-seeds N`` the pairs per cell)
plus the axes to sweep:

- ``--backbones a,b``, ``--weightings x,y``, ``--victims mtl,stl``, ``--defenses none,jpeg``;
- ``--axes paper``: every backbone, weighting strategy and defence, one axis at a time;
- ``--product`` (the default for listed axes: every combination) or ``--one-axis`` (each axis on its
  own, the others at the run's settings: the paper's tables).

It first runs the protection stages and the run's own victims (skipped when finished, as ``run``
does), then trains the missing *cells* (one victim recipe with N seeds, :mod:`mtlue_fast.victim_cells`):
a cell finished earlier is recognised by its recipe digest and skipped; an interrupted sweep
continues where it stopped (a cell counts once all its pairs are done; a half-trained victim resumes
from its ``last.pt``). One progress line per cell gives the seconds so far and an estimate of the
time left. At the end it rewrites the run's report (``report.json``'s ``cells``) and writes
``OUT/sweep.md``, ``OUT/sweep.json`` and ``OUT/figures/sweep.png`` (:mod:`mtlue_fast.report.sweep`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import startup_interrupt  # noqa: F401 - before torch: Ctrl-C while it loads prints one line

import torch

from . import config as config_module
from . import dist
from . import run as run_module
from . import sweep_plan
from . import victim_cells
from .data import open_cache
from .models import build_model
from .report import summarize_cell, sweep as sweep_report
from .cli import UserError, resolve_device, run_command
from .run import Run
from .train.tasks import select_tasks
from .train.victim import model_args

PROTECTION_STAGES = "prepare,surrogate,generate,export,victim"

EXAMPLES = """examples:
  python -m mtlue_fast.sweep --dataset chestxray --backbones resnet18,vgg16_bn --weightings ew,pcgrad
      4 cells (every combination) against the default ChestX-ray protection
  python -m mtlue_fast.sweep --dataset chestxray --axes paper --victim-seeds 3
      the paper's robustness tables: each backbone, weighting and defence alone, 3 pairs per cell
  python -m mtlue_fast.sweep --dataset celeba --data-root /data/celeba --device cuda --one-axis \\
      --weightings ew,uw,pcgrad --defenses none,jpeg
      two tables on real data: the weightings (undefended) and the defences (weighting ew)

Every other flag is python -m mtlue_fast.run's (see its --help), except --stages.
Rerunning a sweep skips the finished cells; adding a value trains only the new cells.
"""


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """``(sweep arguments, run arguments)``: the axes here, everything else by ``run``'s parser."""
    parser = argparse.ArgumentParser(
        prog="python -m mtlue_fast.sweep",
        description="Train victims of many recipes against one protected export and tabulate the drops.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # --backbone (run's) must not read as --backbones
    )  # fmt: skip
    for axis in sweep_plan.AXES:
        values = ",".join(sweep_plan.choices()[axis])
        parser.add_argument(sweep_plan.FLAGS[axis], metavar="A,B", help=f"{axis} values to sweep, of {values}")
    parser.add_argument("--axes", choices=("paper",), help="every backbone, weighting and defence, one axis at a time")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--one-axis", action="store_true", help="vary each axis alone, the others at the run's settings")
    mode.add_argument("--product", action="store_true", help="every combination of the listed values (default)")
    sweep_args, rest = parser.parse_known_args(argv)
    return sweep_args, run_module.parse_args(rest)


def chosen_axes(args: argparse.Namespace) -> dict[str, list[str]]:
    """The axes given by their flags (values checked), ``{axis: values}``."""
    axes = {}
    for axis in sweep_plan.AXES:
        text = getattr(args, sweep_plan.FLAGS[axis].lstrip("-").replace("-", "_"))
        if text is not None:
            axes[axis] = sweep_plan.parse_values(axis, text)
    return axes


def sweep(args: argparse.Namespace, run_args: argparse.Namespace) -> int:
    """The protection (as ``run`` does it), the missing cells, then the report and the sweep's files;
    returns the exit status (errors raise: :func:`main` turns them into one line)."""
    log = (lambda text: None) if run_args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    if run_args.stages:
        raise UserError("--stages is not taken by the sweep: it runs the stages it needs")
    if args.axes == "paper" and args.product:
        raise UserError("--axes paper varies one axis at a time; it cannot be combined with --product")
    axes = chosen_axes(args)
    if not axes and args.axes is None:
        raise UserError("nothing to sweep: give --backbones, --weightings, --victims or --defenses (comma-separated "
                        "values), or --axes paper")
    started = time.perf_counter()
    # The protection and the run's own victims, exactly as `run` does them (skipped when finished).
    run_args.stages = PROTECTION_STAGES
    run_module.run(run_args)
    cfg = config_module.resolve(
        run_args.dataset, config_file=run_args.config, synthetic=run_args.data_root is None, preset=run_args.preset,
        overlays=run_args.overlay, overrides=run_module.overrides_from_args(run_args), assignments=run_args.set,
    )  # fmt: skip
    data_root = str(Path(run_args.data_root).resolve()) if run_args.data_root else None
    device = resolve_device(cfg.device)
    if device.type == "cuda" and dist.info().distributed:
        device = torch.device("cuda", dist.info().local_rank)
    out = Path(run_args.out) if run_args.out else run_module.default_out(cfg, data_root)
    base = Run(cfg, out, data_root, device, lambda text: None)
    base.prepare()  # the caches exist: this opens them
    base.log = log
    protected = open_cache(out / "protected")
    dense, channels = isinstance(protected.labels, dict), int(protected.images.shape[1])
    run_recipe = victim_cells.victim_recipe_fields(cfg)
    problem = _problems(base, dense, channels)
    left_out = []
    if args.axes == "paper":  # the paper's lists, less what cannot train on this data (said, and kept in sweep.json)
        paper = sweep_plan.paper_axes(dense)
        for axis, values in paper.items():
            for value in values:
                why = problem({**run_recipe, axis: value})
                if why is not None and axis not in axes:
                    left_out.append({"axis": axis, "value": value, "why": why})
                    log(f"sweep: --axes paper: leaving out {axis} {value}: {why}")
        skip = {(e["axis"], e["value"]) for e in left_out}
        axes = {**{a: [v for v in vs if (a, v) not in skip] for a, vs in paper.items()}, **axes}
    plan = sweep_plan.plan(run_recipe, axes, args.one_axis or args.axes == "paper")
    for recipe in plan.recipes:  # refused before any training
        why = problem(recipe)
        if why is not None:
            raise UserError(f"cannot train the recipe {_recipe_text(recipe)}: {why}; leave it out of the sweep's lists")
    cells = _train_cells(plan, base, protected, log, started)
    if not dist.info().is_main:
        dist.barrier()
        return 0
    t = time.perf_counter()
    report = base.report()  # the run's report, now with every cell
    base.record("report", time.perf_counter() - t)
    data = _sweep_data(plan, base, report, cells, time.perf_counter() - started)
    data["left_out"] = left_out
    sweep_report.write_sweep(out, data)
    trained = sum(c["trained"] for c in cells)
    print(sweep_report.sweep_text(data))
    print(f"\nsweep: {len(cells)} cells ({trained} trained now, {len(cells) - trained} finished earlier) in "
          f"{time.perf_counter() - started:.0f} s")
    print(f"tables: {out / 'sweep.md'} and {out / 'sweep.json'}; figure: {out / 'figures' / 'sweep.png'}; "
          f"every cell is also in {out / 'report.json'} (cells)")
    dist.barrier()
    return 0


def _problems(base: Run, dense: bool, channels: int) -> Callable[[dict], str | None]:
    """``problem(recipe)``: why the recipe cannot train on the run's data (None when it can): a
    defence that does not apply to the images, or a backbone that cannot take the crop (checked by
    building the victim's network once per backbone)."""
    view = select_tasks(base.train_cache, None, base._crop())
    built: dict[str, str | None] = {}

    def problem(recipe: dict) -> str | None:
        why = sweep_plan.unsupported(recipe, dense, channels)
        if why is not None:
            return why
        cfg = sweep_plan.recipe_config(base.cfg, recipe)
        if cfg.victims.reuse_surrogate and not cfg.surrogate_can_be_the_clean_victim():
            train = cfg.train
            return (f"--reuse-surrogate-as-clean needs the surrogate's own recipe ({train.backbone} / {train.weighting} / "
                    f"width {train.width} / {train.epochs} epochs, mtl, no defence)")
        backbone = recipe["backbone"]
        if backbone not in built:
            try:
                build_model(**model_args(view, cfg.victim_train(cfg.victim_seeds()[0])))
                built[backbone] = None
            except ValueError as err:
                built[backbone] = str(err)
        return built[backbone]

    return problem


def _recipe_text(recipe: dict) -> str:
    return " / ".join(str(recipe[a]) for a in sweep_plan.AXES)


def _train_cells(plan: sweep_plan.Plan, base: Run, protected, log: Callable[[str], None], started: float) -> list[dict]:
    """Train the plan's missing cells in order; returns one entry per recipe (``name``, ``digest``,
    ``fields``, ``pairs``, ``trained``, ``seconds``)."""
    runners = []
    for recipe in plan.recipes:
        runner = Run(sweep_plan.recipe_config(base.cfg, recipe), base.out, base.data_root, base.device, base.log)
        runner.train_cache, runner.test_cache, runner.data_path = base.train_cache, base.test_cache, base.data_path
        runner.protected = protected
        seeds = runner.cfg.victim_seeds()
        done = victim_cells.finished_pairs(runner.victim_cell(), runner.victim_recipe(), seeds)
        runners.append((recipe, runner, done))
    todo = sum(done is None for _, _, done in runners)
    estimate = _first_estimate(base, todo)
    total, spent = len(runners), []
    cells = []
    for k, (recipe, runner, done) in enumerate(runners, start=1):
        cell, digest = runner.victim_cell(), runner.victim_recipe()
        head = f"sweep: cell {k}/{total} {cell.name}"
        seconds = None
        if done is None:
            log(f"{head}: training {len(runner.cfg.victim_seeds())} victim pair(s) ({_recipe_text(recipe)})")
            _forget_compiled(runner.cfg)
            t = time.perf_counter()
            runner.victim()
            seconds = time.perf_counter() - t
            spent.append(seconds)
            todo -= 1
            done = runner.results["victims"]
            what = f"trained in {seconds:.0f} s"
        else:
            what = f"finished earlier (recipe digest {digest[:10]}), skipped"
        per_cell = sum(spent) / len(spent) if spent else estimate
        left = "nothing left" if todo == 0 else (
            f"about {per_cell * todo:.0f} s left for {todo} cell(s)" if per_cell else f"{todo} cell(s) left")
        log(f"{head}: {what}; {time.perf_counter() - started:.0f} s so far, {left}")
        cells.append({"name": cell.name, "digest": digest, "fields": dict(recipe), "pairs": done,
                      "trained": seconds is not None, "seconds": seconds})  # fmt: skip
    return cells


def _forget_compiled(cfg) -> None:
    """Before a cell's compiled victims train, drop what earlier stages and cells compiled.

    Every network shape (backbone, width, task count, batch) compiles the model's ``encode`` and
    ``decode`` once more, and the compiler keeps them all: past its limit per function (8 by
    default: three or four backbones) it runs the later cells eagerly, and under
    ``reduce-overhead`` each kept CUDA graph holds its memory pool. The finished cells' networks
    are not used again; a later cell of the same shape compiles anew (from the compiler's disk cache)."""
    if cfg.victim_train(cfg.victim_seeds()[0]).compile:
        torch.compiler.reset()


def _first_estimate(base: Run, todo: int) -> float | None:
    """Seconds per cell before any cell of this sweep has trained: the run's own victim stage (the
    same number of pairs) when it was trained, else None."""
    seconds = (base.records.get("victim") or {}).get("seconds")
    return float(seconds) if todo and seconds and seconds > 1 else None


def _sweep_data(plan: sweep_plan.Plan, base: Run, report: dict, cells: list[dict], seconds: float) -> dict:
    """``sweep.json``'s content (see :func:`mtlue_fast.report.sweep.write_sweep`)."""
    names = list(report["tasks"])
    dense = isinstance(report["metric"], dict)
    cfg = base.cfg
    entries = []
    for cell in cells:
        entry = {k: cell[k] for k in ("name", "digest", "fields", "trained", "seconds")}
        entry["victims"] = run_module.victim_scores(cell["pairs"], names, dense)
        entries.append(summarize_cell(entry, names, f"cell {cell['name']}"))
    return {
        "dataset": cfg.dataset, "synthetic": base.synthetic, "data_root": base.data_root, "out": str(base.out),
        "method": cfg.method, "base": cfg.generate.base, "eps": cfg.generate.eps, "export": base.digest("export"),
        "metric": report["metric"], "tasks": names, "mode": plan.mode, "run_recipe": plan.base,
        "axes": plan.axes, "seeds": cfg.victim_seeds(), "cells": entries,
        "tables": [{"axis": axis, "cells": [cells[i]["name"] for i in rows]} for axis, rows in plan.tables],
        "seconds": seconds,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    try:
        args, run_args = parse_args(argv)
    except SystemExit as exit_:  # argparse printed its message
        return int(exit_.code or 0)
    return run_command(lambda: sweep(args, run_args),
                       interrupted="rerun the same command to continue the sweep (finished cells are kept)")


if __name__ == "__main__":
    sys.exit(main())
