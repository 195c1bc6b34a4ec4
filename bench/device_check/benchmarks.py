"""Part ``bench``: the pytest-benchmark files, each run writing its JSON under ``<out>/bench/``.

One round runs, in this order: ``bench/bench_ops.py`` (the fused ops and their eager references,
after the copy bandwidth is measured here), ``bench/bench_victim.py`` and
``bench/bench_generator.py`` without ``torch.compile`` (the eager and CUDA-graph steps, the
weighting strategies, SEP), ``bench/bench_data.py`` (GPU only: torchvision's and DALI's GPU
decoders), and last everything that compiles with inductor, the slowest setup: the ops'
torch.compile'd references, then the training files' compiled variants (default, inside the
step's graph, reduce-overhead, max-autotune). A time-boxed run thus measures every eager figure
before it spends time compiling. ``--rounds N`` repeats the
round N times, so round i has measured every variant once before round i+1 starts; a benchmark's
median is then the median of its round medians, and every round's value is kept.

``--bench-args`` is appended to every pytest command (a ``-k`` there replaces the selections below).
With ``--cpu`` a few variants run at tiny sizes (:data:`CPU_BENCH_SIZES`, laid over the files' own
choice by :mod:`.bench_plugin`); the data benchmarks need a GPU's decoder and do not run.
"""

from __future__ import annotations

import json
import shlex
import statistics
from dataclasses import dataclass

from .bandwidth import COPY_BYTES, measure_copy, summarize_ops
from .bench_plugin import SIZES_ENV
from .cuda_tests import dali_available
from .runner import Context, PartFailed, progress, shares, time_left
from .throughput import summarize_throughput

BENCHES = ("ops", "victim", "generator", "data")
OPS_GPU = "not reference_compiled and not naive_loop"
OPS_GPU_COMPILED = "reference_compiled or naive_loop"
OPS_CPU = "(compiled and not reference_compiled and celeba) or device_copy"
TRAINING_CPU = {
    "victim": ["bench/bench_victim.py::test_victim_training[straightforward]", "bench/bench_victim.py::test_victim_training[fast-eager]"],
    "generator": ["bench/bench_generator.py::test_generator_training[straightforward]", "bench/bench_generator.py::test_generator_training[fast]"],
}  # fmt: skip
#: The compiled step variants of the training files (``PATHS`` there), run after everything else.
COMPILED_VARIANTS = {
    "victim": ("fast", "fast-compile-graph", "fast-reduce-overhead", "fast-max-autotune-graph"),
    "generator": ("fast", "fast-compile-graph"),
}
#: The other step variants, and the files' other benchmarks, run in the first pass.
EAGER_VARIANTS = {"victim": ("straightforward", "fast-eager", "fast-graph"), "generator": ("straightforward", "fast-fp32", "fast-eager", "fast-graph")}
OTHER_BENCHMARKS = {"victim": ("test_weighting_step",), "generator": ("test_sep_step",)}
TRAINING_TEST = {"victim": "test_victim_training", "generator": "test_generator_training"}
#: Width 0.25 as the files' own CPU choice: at 0.125 the bf16 generator backward crashed inside
#: oneDNN (a 1x1 convolution's weight gradient, avx512_bf16 kernel) on an AMD EPYC.
CPU_BENCH_SIZES = {
    "bench_victim": {"width": 0.25, "batch_size": 16, "steps": 1},
    "bench_generator": {"width": 0.25, "surrogate_width": 0.25, "batch_size": 4, "steps": 1},
}
#: A run is skipped when its share of the part's time is under this.
MIN_RUN_SECONDS = 10


@dataclass
class BenchRun:
    bench: str  # one of BENCHES
    name: str  # log and JSON name
    targets: list[str]
    selection: str | None  # pytest -k
    weight: float  # share of the part's time
    round: int


def plan(ctx: Context, benches: list[str], rounds: int, user_args: list[str]) -> tuple[list[BenchRun], list[str]]:
    """The runs in order, and notes on what does not run here."""
    notes, one_round = [], []
    user_k = "-k" in user_args or any(a.startswith("-k") and len(a) > 2 for a in user_args)
    if "ops" in benches:
        one_round.append(("ops", "ops", ["bench/bench_ops.py"], None if user_k else (OPS_GPU if ctx.gpu else OPS_CPU), 1.0))
    for name in ("victim", "generator"):
        if name in benches:
            one_round.append((name, name, training_targets(name, EAGER_VARIANTS, OTHER_BENCHMARKS) if ctx.gpu else TRAINING_CPU[name], None, 1.0))
    if "data" in benches:
        if not ctx.gpu:
            notes.append("bench_data.py not run: --cpu (the GPU decoders need a GPU)")
        else:  # torchvision's nvJPEG decoder runs without DALI; DALI's cases skip themselves
            if not dali_available(ctx):
                notes.append("bench_data.py: DALI not installed, its GPU decoder is not measured")
            one_round.append(("data", "data", ["bench/bench_data.py"], None, 0.4))
    if "ops" in benches and ctx.gpu and not user_k:
        one_round.append(("ops", "ops-compiled", ["bench/bench_ops.py"], OPS_GPU_COMPILED, 0.4))
    for name, weight in (("victim", 1.2), ("generator", 0.6)):
        if name in benches and ctx.gpu:
            one_round.append((name, f"{name}-compiled", training_targets(name, COMPILED_VARIANTS, {}), None, weight))
    runs = [BenchRun(b, n, t, s, w, i) for i in range(1, rounds + 1) for b, n, t, s, w in one_round]
    return runs, notes


def training_targets(bench: str, variants: dict[str, tuple[str, ...]], others: dict[str, tuple[str, ...]]) -> list[str]:
    """pytest node ids in ``bench/bench_<bench>.py``: its training test at ``variants[bench]``,
    then the whole tests named in ``others[bench]``."""
    file = f"bench/bench_{bench}.py"
    return [f"{file}::{TRAINING_TEST[bench]}[{v}]" for v in variants[bench]] + [f"{file}::{t}" for t in others.get(bench, ())]


def merge_rounds(datas: list[dict]) -> dict:
    """pytest-benchmark JSONs of several runs as one: a benchmark measured in more than one round
    gets the median of its round medians as ``stats.median`` and the list as ``round_medians``."""
    merged: dict[str, dict] = {}
    medians: dict[str, list[float]] = {}
    for data in datas:
        for b in data.get("benchmarks", []):
            key = b.get("fullname") or f"{b.get('group')}::{b['name']}"
            merged.setdefault(key, b)
            medians.setdefault(key, []).append(b["stats"]["median"])
    out = []
    for key, b in merged.items():
        if len(medians[key]) > 1:
            b = {**b, "stats": {**b["stats"], "median": statistics.median(medians[key])}, "round_medians": medians[key]}
        out.append(b)
    return {"benchmarks": out}


def _json_path(ctx: Context, run: BenchRun, rounds: int):
    folder = (ctx.out or ctx.work) / "bench"
    return (folder / f"round-{run.round}" if rounds > 1 else folder) / f"{run.name}.json"


def part_bench(ctx: Context, deadline: float) -> dict:
    """Every run of :func:`plan`; fails when a run failed, timed out or was skipped for time."""
    args = ctx.args
    benches = list(getattr(args, "benches", None) or BENCHES)
    rounds = max(1, int(getattr(args, "rounds", 1) or 1))
    user_args = shlex.split(getattr(args, "bench_args", None) or "")
    runs, notes = plan(ctx, benches, rounds, user_args)
    env = ctx.env(**{SIZES_ENV: json.dumps({} if ctx.gpu else CPU_BENCH_SIZES)})
    datas: dict[str, list[dict]] = {b: [] for b in BENCHES}
    briefs, problems, copies = [], [], []
    for i, run in enumerate(runs):
        if run.bench == "ops" and run.name == "ops":
            copies.append(measure_copy(ctx.device, COPY_BYTES[ctx.device]))
            progress(f"  copy bandwidth: {copies[-1]['gb_per_s']:.0f} GB/s (bytes read + written)")
        share = shares(time_left(deadline), [r.weight for r in runs[i:]])[0]
        label = run.name + (f" (round {run.round})" if rounds > 1 else "")
        if share < MIN_RUN_SECONDS:
            problems.append(f"{label} skipped: {time_left(deadline):.0f} s left in the part's budget")
            continue
        path = _json_path(ctx, run, rounds)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = ["-p", "device_check.bench_plugin", "--bench-device", ctx.device, f"--benchmark-json={path}"]
        extra += (["-k", run.selection] if run.selection else []) + user_args
        log_name = f"bench-{run.name}" + (f"-round{run.round}" if rounds > 1 else "")
        proc = ctx.pytest(log_name, run.targets, share, extra, env)
        data = json.loads(path.read_text()) if path.is_file() else None
        briefs.append({**proc.brief(), "round": run.round, "json": str(path) if data else None})
        if data:
            datas[run.bench].append(data)
        if proc.rc == 5:
            notes.append(f"{label}: no benchmark selected")
        elif proc.rc != 0 or not data:
            problems.append(f"{label}: pytest {proc.why()}" + ("; the finished benchmarks are kept" if data else ""))
    results: dict = {"rounds": rounds, "runs": briefs, "bench_args": user_args}
    if copies:
        copy = dict(copies[0], gb_per_s=statistics.median(c["gb_per_s"] for c in copies),
                    bytes_per_s=statistics.median(c["bytes_per_s"] for c in copies))  # fmt: skip
        results["ops"] = {"copy": copy, **summarize_ops(merge_rounds(datas["ops"]), copy["bytes_per_s"])}
    for name in ("victim", "generator", "data"):
        if datas[name]:
            results[name] = summarize_throughput(merge_rounds(datas[name]))
    if not ctx.gpu:
        results["sizes"] = {"note": "tiny --cpu sizes laid over the files' own", **CPU_BENCH_SIZES}
    if notes:
        results["notes"] = notes
    if problems:
        raise PartFailed("; ".join(problems), results)
    return results
