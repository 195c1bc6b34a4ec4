"""Part ``paper-scale``: ``python bench/paper_scale.py --out <out>/paper_scale.json``.

On a GPU with ``--device cuda``; with ``--cpu`` its own tiny CPU mode. ``--paper-scale-steps N`` is
passed on as ``--steps N`` (with ``--cpu`` it defaults to :data:`CPU_STEPS`). Skipped where the
script is not in the checkout.
"""

from __future__ import annotations

import json
import shlex
import sys

from .runner import REPO, Context, PartFailed, PartSkipped, progress, run_logged, time_left

SCRIPT = REPO / "bench" / "paper_scale.py"
CPU_STEPS = 1
OUTPUT = "paper_scale.json"


def command(ctx: Context, out_file) -> list[str]:
    """The script's command line (run in the repository root)."""
    steps = getattr(ctx.args, "paper_scale_steps", None)
    script = SCRIPT.relative_to(REPO) if SCRIPT.is_relative_to(REPO) else SCRIPT
    cmd = [sys.executable, str(script), "--out", str(out_file)]
    cmd += ["--device", "cuda"] if ctx.gpu else ["--cpu"]
    if steps is None and not ctx.gpu:
        steps = CPU_STEPS
    return cmd + (["--steps", str(steps)] if steps is not None else [])


def scalars(data: dict, limit: int = 20) -> dict:
    """The top-level numbers and strings of the script's JSON (its own layout is its business)."""
    if not isinstance(data, dict):
        return {}
    return dict([(k, v) for k, v in data.items() if isinstance(v, (int, float, str, bool))][:limit])


def part_paper_scale(ctx: Context, deadline: float) -> dict:
    if not SCRIPT.is_file():
        raise PartSkipped("bench/paper_scale.py is not in this checkout")
    out_file = (ctx.out or ctx.work) / OUTPUT
    out_file.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(ctx, out_file)
    progress(f"  paper-scale: {shlex.join(cmd[1:])} (up to {time_left(deadline):.0f} s)")
    proc = run_logged(cmd, time_left(deadline), ctx.logs / "paper-scale.log", ctx.env())
    results: dict = {"run": proc.brief(), "json": str(out_file) if out_file.is_file() else None}
    if out_file.is_file():
        try:
            data = json.loads(out_file.read_text())
        except ValueError as err:
            results["summary"] = {"unreadable": str(err)}
        else:
            results["summary"] = scalars(data)
            stages = data.get("stages") if isinstance(data, dict) else None
            if isinstance(stages, dict):  # images/s of each stage measured (all of them, or those before a stop)
                results["stage_images_per_second"] = {
                    name: s.get("images_per_second") for name, s in stages.items() if isinstance(s, dict)
                }
                results["stage_cuda_graph"] = {
                    name: s["cuda_graph"] for name, s in stages.items() if isinstance(s, dict) and s.get("cuda_graph")
                }
            # the script's own verdicts: judged only at the paper's settings
            results["targets"] = data.get("targets") if isinstance(data, dict) else None
            results["paper_settings_changed"] = data.get("paper_settings_changed") if isinstance(data, dict) else None
    if proc.rc != 0 or not out_file.is_file():
        results["log_tail"] = "\n".join(proc.tail.splitlines()[-20:])
        raise PartFailed(f"paper_scale.py {proc.why()}" + ("" if out_file.is_file() else f"; no {OUTPUT}"), results)
    return results
