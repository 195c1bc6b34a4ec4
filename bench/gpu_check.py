"""One command that checks the package on a GPU machine and records what it measured.

    python bench/gpu_check.py                     # on the GPU machine: everything, at most ~8 minutes
    python bench/gpu_check.py --out $OUT          # results under $OUT instead of bench/results/
    python bench/gpu_check.py --cpu --out /tmp/x  # the same plumbing at tiny sizes on the CPU (~2 min)

Parts (``--parts a,b,c,d,e``; each with its own time budget, ``--budgets c=60,e=120``, inside the
overall ``--budget``; a part whose budget is spent is skipped with a note, a subprocess that runs past
its budget gets SIGINT, so pytest still writes its JSON / JUnit XML of what finished, then SIGKILL):

a. build: which backend serves each op on each device, probed in a fresh process with the JIT build
   off; without compiled kernels for the device, ``pip install --no-build-isolation --no-deps -e .``
   with ``TORCH_CUDA_ARCH_LIST`` from the GPU's capability (``--no-build`` to skip), then probed
   again in a fresh process so the new library is what is recorded.
b. tests: ``pytest -m cuda tests`` (the op parity tests on both devices, ``test_cuda_parity.py``,
   the GPU loader, losses and metrics tests; ``test_compile.py`` in a second run after the others) plus ``tests/test_dali.py`` where DALI imports;
   ``--cpu``: the CPU op-vs-reference tests and ``test_cuda_parity.py`` (skipped: plumbing only).
   Pass / fail / skip per test id from ``--junitxml``. Exit status 1 when a test failed or part b
   could not finish (timed out, pytest crashed); 0 otherwise, whatever the other parts did.
c. op benchmarks: ``bench/bench_ops.py`` through pytest-benchmark, and the device's copy bandwidth
   measured here (``y.copy_(x)`` into a preallocated ``y = torch.empty_like(x)``, 1 GiB float32 on
   CUDA, 64 MiB on the CPU, median of 5 after 2 warm-ups; bytes read plus written). Each op's bytes
   per call come from the benchmark's ``extra_info["bytes"]`` or, where absent, from the size name
   (:func:`op_bytes`); achieved bandwidth = bytes / median time, reported as a fraction of the copy
   bandwidth. Target: ``perturb_apply`` forward + backward >= 70% on a GPU.
d. training benchmarks: ``bench/bench_victim.py`` and ``bench/bench_generator.py`` at the sizes they
   choose for CUDA (ResNet-18 width 1.0, batch 512; generator width 1, batch 512; CelebA shapes 70x70,
   crop 64, 40 tasks), images/s and the ratios fast / straightforward, SEP shared pass / pass per
   checkpoint, weighting step time / ``ew``; ``bench/bench_data.py`` only where ``nvidia.dali``
   imports (never with ``--cpu``: the mixed decoder needs a GPU). ``--cpu`` runs a subset of the
   benchmark ids (:data:`TRAIN_BENCHES`) at tiny sizes, set through this file loaded as a pytest
   plugin (``-p gpu_check``, sizes in ``$GPU_CHECK_BENCH_SIZES``): the bench files have no size
   option of their own.
e. end to end: ``python -m mtlue_fast.run --dataset celeba`` on the synthetic CelebA sample (a fresh
   ``$MTLUE_CACHE``, so ``prepare`` writes and decodes it) with :data:`E2E_GPU_SETTINGS` (``--cpu``:
   ``--preset smoke`` and :data:`E2E_CPU_SETTINGS`), ``--e2e-set KEY=VALUE`` to change them; per-stage
   seconds, throughput, clean / protected means and the drop from ``report.json`` (``stages.json``
   when the run was cut short).

Output: ``gpu-check-<device-slug>-<YYYY-MM-DD>.json`` and ``.md`` (default in ``bench/results/``),
rewritten after every part so a command killed from outside still leaves what was done; each
subprocess's full log under ``--logs`` (default ``<out>/<stem>-logs`` with ``--out``, else a
temporary folder). Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"

PARTS = ("a", "b", "c", "d", "e")
PART_NAMES = {"a": "build", "b": "tests", "c": "op benchmarks", "d": "training benchmarks", "e": "end to end"}
#: Seconds per part. GPU: the parts add up to more than the overall budget because a build is
#: usually unnecessary or shorter than allowed; the overall budget always wins.
GPU_BUDGETS = {"a": 150, "b": 90, "c": 75, "d": 170, "e": 180}
CPU_BUDGETS = {"a": 90, "b": 30, "c": 30, "d": 60, "e": 70}
#: A part is skipped when less than this is left for it; the minimums of the parts still to come are
#: held back from the ones before them.
GPU_MINIMUM = {"a": 15, "b": 20, "c": 20, "d": 30, "e": 60}
CPU_MINIMUM = {"a": 5, "b": 10, "c": 10, "d": 15, "e": 20}
GPU_TOTAL, CPU_TOTAL = 460, 180
#: Seconds a subprocess gets between SIGINT (pytest writes its reports) and SIGKILL.
GRACE = 10

PERTURB_TARGET = 0.70
COPY_BYTES = {"cuda": 2**30, "cpu": 64 * 2**20}

# ----------------------------------------------------------------------------- what runs where

#: pytest arguments of part b.
#: The torch.compile tests run last, in a run of their own: a cold inductor compile can take most of
#: the part's budget, and it must not keep the op parity tests from running.
TESTS_GPU = ["tests", "-m", "cuda", "--ignore=tests/test_compile.py"]
TESTS_GPU_COMPILE = ["tests/test_compile.py", "-m", "cuda"]
TESTS_GPU_DALI = ["tests/test_dali.py", "-m", "not slow"]
TESTS_CPU = [
    "tests/test_perturb_apply.py", "tests/test_quantize_export.py", "tests/test_embedding_reg.py",
    "tests/test_cuda_parity.py", "-k", "(cpu and matches_reference) or cuda_parity",
]  # fmt: skip

#: pytest -k selections of bench/bench_ops.py (part c): "core" always, "extra" on GPUs when time is left.
OPS_GPU_CORE = "not reference_compiled and not naive_loop"
OPS_GPU_EXTRA = "reference_compiled or naive_loop"
OPS_CPU_CORE = "(compiled and not reference_compiled and celeba) or device_copy"

#: Part d: (name, pytest targets on the GPU, targets with --cpu (None: not run there), time-share weight).
#: --cpu runs two paths each, leaving out the weighting steps, the compiled victim (a cold inductor
#: compile), the SEP pair (15 surrogates: minutes on 2 cores) and the data benchmarks (the DALI mixed
#: decoder they are for needs a GPU).
TRAIN_BENCHES = [
    ("victim", ["bench/bench_victim.py"],
     ["bench/bench_victim.py::test_victim_training[straightforward]", "bench/bench_victim.py::test_victim_training[fast-eager]"],
     1.0),
    ("generator", ["bench/bench_generator.py"],
     ["bench/bench_generator.py::test_generator_training[straightforward]", "bench/bench_generator.py::test_generator_training[fast]"],
     1.0),
    ("data", ["bench/bench_data.py"], None, 0.4),
]  # fmt: skip
#: --cpu sizes patched into the bench modules' ``sizes(device)`` (see :func:`pytest_collection_finish`).
#: Width 0.25 as the files' own CPU choice: at 0.125 the bf16 generator backward crashed inside
#: oneDNN (a 1x1 convolution's weight gradient, avx512_bf16 kernel) on an AMD EPYC.
CPU_BENCH_SIZES = {
    "bench_victim": {"width": 0.25, "batch_size": 16, "steps": 1},
    "bench_generator": {"width": 0.25, "surrogate_width": 0.25, "batch_size": 4, "steps": 1},
}

#: Part e on a GPU: the synthetic CelebA default (8,000 / 2,000 images, 20 epochs at batch 128, 6 TAP
#: passes; the configuration the README measured on 2 CPU cores) with the victims, the surrogate and
#: the generator at full width. Measured 107 s on one H200 (2026-11-28; 96 s inside the run itself).
E2E_GPU_SETTINGS = ["train.width=1.0", "generate.width=1.0"]
#: Part e with --cpu: on top of --preset smoke (384 / 128 images, 2 epochs, 1 pass, width 0.25),
#: smaller still, and the surrogate's metrics as the clean victim's (one victim training less): about
#: 45 s on 2 busy cores. The drop means nothing at this size; the run is there for the plumbing.
E2E_CPU_SETTINGS = [
    "data.synthetic_train=128", "data.synthetic_test=64", "train.epochs=1", "train.batch_size=32",
    "generate.batch_size=32", "generate.stop_subset=64", "victims.reuse_surrogate=true",
]  # fmt: skip

#: Targets from the README, judged at GPU sizes only: name -> threshold.
TARGETS = {
    "victim_fast_vs_straightforward": 3.0,
    "victim_fast_images_per_second": 25_000.0,
    "weighting_step_vs_ew_max": 2.0,
    "generator_fast_vs_straightforward": 2.0,
    "sep_shared_vs_per_checkpoint": 5.0,
    "dali_gpu_vs_dali_cpu": 3.0,
}
WEIGHTING_WITH_TARGET = ("pcgrad", "aligned_mtl", "fairgrad")


# ----------------------------------------------------------------------------- pure helpers


def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def allot(part_budget: float, remaining: float, minimum: float, reserve: float = 0.0) -> tuple[float | None, str | None]:
    """Seconds a part may use: its own budget, capped by what is left overall less ``reserve`` (the
    minimums of the parts still to come, so an early part cannot starve them); None and the reason
    when that is under the part's minimum."""
    available = remaining - reserve
    seconds = min(part_budget, available)
    if seconds < minimum:
        if available < part_budget:
            kept = f", {reserve:.0f} s kept for the later parts" if reserve > 0 else ""
            return None, f"overall budget spent ({max(remaining, 0):.0f} s left{kept}; the part needs at least {minimum:.0f} s)"
        return None, f"part budget {part_budget:.0f} s is under its minimum of {minimum:.0f} s"
    return seconds, None


def shares(total: float, weights: list[float]) -> list[float]:
    """Split ``total`` seconds by weight (what an earlier share leaves unused is re-split by the caller)."""
    whole = sum(weights)
    return [total * w / whole for w in weights] if whole > 0 else [0.0 for _ in weights]


class Budget:
    """The overall time budget; ``clock`` is injectable for tests."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock, self.start = seconds, clock, clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()


def bandwidth_fraction(nbytes: float, seconds: float, copy_bytes_per_second: float) -> float:
    """Achieved bandwidth ``nbytes / seconds`` as a fraction of the copy bandwidth (both counting bytes
    read plus written)."""
    if seconds <= 0 or copy_bytes_per_second <= 0:
        raise ValueError(f"times and bandwidths must be positive, got {seconds!r} s and {copy_bytes_per_second!r} B/s")
    return nbytes / seconds / copy_bytes_per_second


def op_bytes(op: str, size: str) -> int | None:
    """Bytes one benchmark call must move, from bench_ops.py's size names (None when unknown).

    - ``perturb_apply`` forward + backward, size ``<name>_<B>x<C>x<H>_crop<c>``, window = B*C*c*c,
      full = B*C*H*H: forward reads the x window (uint8) and the raw window (float32) and writes the
      output (float32), 9 * window; backward reads grad_out (4) and the x and raw windows again (5)
      and writes grad_raw in full (4 * full): 18 * window + 4 * full (bench_ops.perturb_bytes).
    - ``quantize_export`` forward, same size names: reads x (1) and delta (4), writes protected (1)
      and delta_q (1): 7 * B*C*H*H.
    - ``embedding_reg`` forward + backward, size ``<name>_R<R>_D<D>``: the table read in the forward
      (4*R*D) and again in the backward, which writes its gradient (8*R*D): 12 * R*D (two GEMMs: not
      bandwidth-bound at these sizes; for reference only).
    """
    if op in ("perturb_apply", "quantize_export"):
        m = re.search(r"(\d+)x(\d+)x(\d+)_crop(\d+)", size)
        if not m:
            return None
        batch, channels, side, crop = map(int, m.groups())
        full = batch * channels * side * side
        if op == "quantize_export":
            return 7 * full
        return 18 * batch * channels * crop * crop + 4 * full
    if op == "embedding_reg":
        m = re.search(r"R(\d+)_D(\d+)", size)
        return 12 * int(m.group(1)) * int(m.group(2)) if m else None
    return None


def parse_junit(source: str | Path) -> dict:
    """``{"tests": {id: {"status", "message"?}}, "counts": {status: n}}`` from a JUnit XML file (or
    its text). Status: passed, failed, error, skipped. Ids are ``<classname>::<name>``."""
    text = Path(source).read_text() if not str(source).lstrip().startswith("<") else str(source)
    root = ET.fromstring(text)
    tests: dict[str, dict] = {}
    for case in root.iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
        entry: dict = {"status": "passed", "seconds": float(case.get("time") or 0)}
        for tag, status in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            child = case.find(tag)
            if child is not None:
                entry["status"] = status
                message = (child.get("message") or child.text or "").strip()
                if message:
                    entry["message"] = message[:500]
                break
        if test_id in tests and tests[test_id]["status"] != "passed":
            continue  # a teardown error after a failure: keep the first
        tests[test_id] = entry
    counts: dict[str, int] = defaultdict(int)
    for entry in tests.values():
        counts[entry["status"]] += 1
    return {"tests": tests, "counts": dict(counts)}


def summarize_ops(bench: dict, copy_bytes_per_second: float | None, gpu: bool) -> dict:
    """Rows per (op, size, impl) from a bench_ops.py pytest-benchmark JSON, with bandwidth fractions
    and the perturb_apply target (judged on GPUs only)."""
    rows, bench_copy = [], None
    for b in bench.get("benchmarks", []):
        extra, median = b["extra_info"], b["stats"]["median"]
        nbytes = extra.get("bytes") or op_bytes(extra.get("op", ""), extra.get("size", ""))
        row = {"op": extra.get("op"), "size": extra.get("size"), "impl": extra.get("impl"), "group": b.get("group"),
               "median_ms": 1e3 * median, "bytes": nbytes}  # fmt: skip
        if nbytes:
            row["gb_per_s"] = nbytes / median / 1e9
            if copy_bytes_per_second:
                row["fraction_of_copy"] = bandwidth_fraction(nbytes, median, copy_bytes_per_second)
        if extra.get("op") == "copy":
            bench_copy = row
            continue
        rows.append(row)
    compiled = {(r["op"], r["size"]): r["median_ms"] for r in rows if r["impl"] == "compiled"}
    for r in rows:
        base = compiled.get((r["op"], r["size"]))
        if base:
            r["time_vs_compiled"] = r["median_ms"] / base
    target = {}
    for r in rows:
        if r["op"] == "perturb_apply" and r["impl"] == "compiled" and "fraction_of_copy" in r:
            target[r["size"]] = {"fraction_of_copy": r["fraction_of_copy"], "met": (r["fraction_of_copy"] >= PERTURB_TARGET) if gpu else None}
    return {"rows": rows, "bench_copy": bench_copy,
            "target": {"what": f"perturb_apply fwd+bwd >= {PERTURB_TARGET:.0%} of copy bandwidth (GPU)", "sizes": target}}  # fmt: skip


def summarize_throughput(bench: dict, gpu: bool) -> dict:
    """Images/s per group and variant from bench_victim / bench_generator / bench_data JSON, with the
    ratios the README's targets use (judged on GPUs only)."""
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    kinds: dict[str, str] = {}
    for b in bench.get("benchmarks", []):
        extra, median = b["extra_info"], b["stats"]["median"]
        variant = str(extra.get("variant") or extra.get("decoder") or extra.get("device") or b["name"])
        groups[b["group"]][variant] = {"images_per_second": extra["images"] / median, "median_s": median}
        if "resident" in extra:
            groups[b["group"]][variant]["resident"] = extra["resident"]
        kinds[b["group"]] = extra.get("kind", "data")
    targets: dict[str, dict] = {}

    def judge(name: str, value: float, ok: bool) -> None:
        targets[name] = {"value": value, "threshold": TARGETS[name], "met": ok if gpu else None}

    for group, rows in groups.items():
        rate = {v: r["images_per_second"] for v, r in rows.items()}
        kind = kinds[group]
        if kind == "weighting" and "ew" in rows:
            for v, r in rows.items():
                r["step_time_vs_ew"] = r["median_s"] / rows["ew"]["median_s"]
            worst = max((rows[v]["step_time_vs_ew"] for v in WEIGHTING_WITH_TARGET if v in rows), default=None)
            if worst is not None:
                judge("weighting_step_vs_ew_max", worst, worst <= TARGETS["weighting_step_vs_ew_max"])
            continue
        base_name = next((b for b in ("straightforward", "pass per checkpoint", "dali-cpu", "pil") if b in rate), None)
        if base_name is None:
            continue
        for v, r in rows.items():
            r[f"vs_{slug(base_name)}"] = rate[v] / rate[base_name]
        if kind == "victim" and "fast" in rate:
            judge("victim_fast_vs_straightforward", rate["fast"] / rate[base_name], rate["fast"] / rate[base_name] >= TARGETS["victim_fast_vs_straightforward"])
            judge("victim_fast_images_per_second", rate["fast"], rate["fast"] >= TARGETS["victim_fast_images_per_second"])
        elif kind == "generator" and base_name == "straightforward" and "fast" in rate:
            ratio = rate["fast"] / rate[base_name]
            judge("generator_fast_vs_straightforward", ratio, ratio >= TARGETS["generator_fast_vs_straightforward"])
        elif kind == "generator" and base_name == "pass per checkpoint" and "shared pass" in rate:
            ratio = rate["shared pass"] / rate[base_name]
            judge("sep_shared_vs_per_checkpoint", ratio, ratio >= TARGETS["sep_shared_vs_per_checkpoint"])
        elif kind == "data" and "dali-gpu" in rate and "dali-cpu" in rate:
            ratio = rate["dali-gpu"] / rate["dali-cpu"]
            judge("dali_gpu_vs_dali_cpu", ratio, ratio >= TARGETS["dali_gpu_vs_dali_cpu"])
    return {"groups": {g: dict(r) for g, r in groups.items()}, "targets": targets}


def backends_complete(info: dict | None, device: str) -> bool:
    """Whether ``mtlue_fast.info.collect()``'s op table says every op has compiled kernels on ``device``."""
    if not info:
        return False
    want = f"compiled {device.upper()}"
    return all(table.get(device) == want for table in info.get("ops", {}).values()) and bool(info.get("ops"))


# ----------------------------------------------------------------------------- pytest plugin (-p gpu_check)


def pytest_collection_finish(session) -> None:
    """Used only when pytest loads this file with ``-p gpu_check``: wrap the bench modules'
    ``sizes(device)`` so they return ``$GPU_CHECK_BENCH_SIZES`` (JSON ``{module: {key: value}}``)
    over their own choice."""
    wanted = json.loads(os.environ.get("GPU_CHECK_BENCH_SIZES") or "{}")
    for name, override in wanted.items():
        module = sys.modules.get(name)
        if module is None or not hasattr(module, "sizes"):
            continue
        original = module.sizes

        def patched(device, _original=original, _override=override):
            return {**_original(device), **_override}

        module.sizes = patched


def _drop_unfinished(session) -> None:
    """An interrupted benchmark is left without timings, and pytest-benchmark (5.x) then fails to
    write its JSON at all (``min()`` of an empty sequence): keep only the benchmarks that have data."""
    bench_session = getattr(session.config, "_benchmarksession", None)
    if bench_session is not None:
        bench_session.benchmarks[:] = [b for b in bench_session.benchmarks if b]


try:  # the hook needs pytest's marker; the script itself runs without it
    import pytest as _pytest

    @_pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_sessionfinish(session, exitstatus):
        """Before pytest-benchmark's own session finish (which saves the JSON): see _drop_unfinished."""
        _drop_unfinished(session)
        yield

except ImportError:  # pragma: no cover
    pass


# ----------------------------------------------------------------------------- processes


@dataclass
class Proc:
    command: list[str]
    rc: int | None
    timed_out: bool
    seconds: float
    log: str
    tail: str = ""

    def brief(self) -> dict:
        return {"command": shlex.join(self.command), "rc": self.rc, "timed_out": self.timed_out,
                "seconds": round(self.seconds, 2), "log": self.log}  # fmt: skip


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - chars))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def run_logged(command: list[str], timeout: float, log: Path, env: dict | None = None) -> Proc:
    """Run ``command`` in the repository root in its own process group, output to ``log``. Past
    ``timeout``: SIGINT to the group (pytest then still writes its reports), SIGKILL after GRACE s."""
    start = time.monotonic()
    timed_out = False
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            timed_out = True
            rc = _stop(proc)
        except BaseException:  # Ctrl-C or SIGTERM on this process: do not leave the child running
            _stop(proc)
            raise
    return Proc(command, rc, timed_out, time.monotonic() - start, str(log), _tail(log))


def _stop(proc: subprocess.Popen) -> int:
    for sig, wait in ((signal.SIGINT, GRACE), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


class PartFailed(Exception):
    def __init__(self, reason: str, results: dict | None = None):
        super().__init__(reason)
        self.reason, self.results = reason, results or {}


# ----------------------------------------------------------------------------- context


@dataclass
class Context:
    args: argparse.Namespace
    device: str  # "cuda" or "cpu"
    work: Path  # temporary files
    logs: Path
    capability: str | None = None
    info: dict | None = None  # mtlue_fast.info.collect() after part a
    notes: list[str] = field(default_factory=list)
    repo_on_path: bool = False  # after an in-place build of a package that pip could not install

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"

    def env(self, **extra: str) -> dict:
        """The children's environment. ``PYTHONSAFEPATH`` keeps ``python -m`` / ``-c`` from putting the
        repository root first on ``sys.path``: they import the *installed* mtlue_fast (editable here
        and on the GPU machine after part a; in CI a regular install whose source tree has no
        compiled library). ``bench/`` is on the path for ``-p gpu_check``."""
        env = dict(os.environ)
        first = [str(REPO)] if self.repo_on_path else []
        env["PYTHONPATH"] = os.pathsep.join([*first, str(BENCH), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONSAFEPATH"] = "1"
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def pytest(self, name: str, targets: list[str], timeout: float, extra: list[str], env: dict | None = None) -> Proc:
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *targets, *extra]
        progress(f"  {name}: {shlex.join(command[3:])} (up to {timeout:.0f} s)")
        return run_logged(command, timeout, self.logs / f"{name}.log", env or self.env())


def progress(message: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _deadline_left(deadline: float, reserve: float = 0.0) -> float:
    return deadline - time.monotonic() - reserve


# ----------------------------------------------------------------------------- a: build


PROBE = """
import json
try:
    import mtlue_fast.info as info
except ImportError as err:  # not installed yet (a fresh GPU machine): part a installs it
    print("GPU_CHECK_INFO " + json.dumps({"import_error": str(err)}))
else:
    print("GPU_CHECK_INFO " + json.dumps(info.collect(), default=str))
"""


def probe_backends(ctx: Context, name: str, timeout: float, no_jit: bool) -> dict:
    env = ctx.env(**({"MTLUE_NO_JIT": "1"} if no_jit else {}))
    proc = run_logged([sys.executable, "-c", PROBE], timeout, ctx.logs / f"{name}.log", env)
    for line in Path(proc.log).read_text(errors="replace").splitlines():
        if line.startswith("GPU_CHECK_INFO "):
            return json.loads(line[len("GPU_CHECK_INFO "):])
    raise PartFailed(f"backend probe failed (rc {proc.rc}{', timed out' if proc.timed_out else ''})", {"probe": proc.brief(), "tail": proc.tail})


def part_build(ctx: Context, deadline: float) -> dict:
    before = probe_backends(ctx, "a-probe-before", min(90, _deadline_left(deadline)), no_jit=True)
    results: dict = {"before": before.get("ops") or before, "library_before": before.get("library"), "built": False}
    need = not backends_complete(before, ctx.device)
    if not need or ctx.args.no_build:
        what = "mtlue_fast not importable" if "import_error" in before else f"no compiled {ctx.device.upper()} kernels"
        results["note"] = f"{what}, and --no-build: not built" if need else f"compiled {ctx.device.upper()} kernels already loaded: build skipped"
        ctx.info = before if "ops" in before else None
        results.update(after=before.get("ops"), library=before.get("library"), dali=before.get("dali"))
        if need and "import_error" in before:
            raise PartFailed(results["note"], results)
        return results
    extra = {"MAX_JOBS": str(os.cpu_count() or 2)}
    if ctx.gpu:
        extra["TORCH_CUDA_ARCH_LIST"] = ctx.capability or "9.0"
    command = [sys.executable, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", "."]  # -v: the compile and link lines in the log
    progress(f"  build: {' '.join(f'{k}={v}' for k, v in extra.items())} {shlex.join(command[1:])}")
    proc = run_logged(command, _deadline_left(deadline, reserve=20), ctx.logs / "a-build.log", ctx.env(**extra))
    results["built"] = True
    results["build"] = {**proc.brief(), "env": extra, "log_tail": "\n".join(proc.tail.splitlines()[-40:])}
    if proc.rc != 0 and not proc.timed_out and _deadline_left(deadline, reserve=20) > 30:
        # pip itself can fail where the compiler would not (an old setuptools for pyproject's license
        # field, no pip): the same extension, built in place.
        command = [sys.executable, "setup.py", "build_ext", "--inplace"]
        progress(f"  build: pip failed (rc {proc.rc}); trying {shlex.join(command[1:])}")
        proc = run_logged(command, _deadline_left(deadline, reserve=20), ctx.logs / "a-build-inplace.log", ctx.env(**extra))
        results["build_inplace"] = {**proc.brief(), "log_tail": "\n".join(proc.tail.splitlines()[-40:])}
        ctx.repo_on_path = proc.rc == 0  # not installed: the children import it from the repository
    if proc.rc != 0:
        raise PartFailed(f"build failed (rc {proc.rc}{', timed out' if proc.timed_out else ''}); see build.log_tail", results)
    after = probe_backends(ctx, "a-probe-after", max(5, _deadline_left(deadline)), no_jit=False)
    if "import_error" in after:
        raise PartFailed(f"mtlue_fast still not importable after the build: {after['import_error']}", results)
    ctx.info = after
    results.update(after=after["ops"], library=after["library"], dali=after.get("dali"))
    if not backends_complete(after, ctx.device):
        raise PartFailed(f"still no compiled {ctx.device.upper()} kernels after the build", results)
    return results


# ----------------------------------------------------------------------------- b: tests


def dali_available(ctx: Context) -> bool:
    if ctx.info is not None:
        return ctx.info.get("dali", "not installed") != "not installed"
    try:
        importlib.import_module("nvidia.dali")
        return True
    except Exception:
        return False


#: How often part b reruns a pytest run that a test crashed, each time without the crashing test.
CRASH_RERUNS = 2


def crashed_test(log_text: str) -> str | None:
    """The test that crashed pytest, as a node id prefix ``tests/test_x.py::test_name`` (relative to
    the repository, where part b runs pytest), read from the faulthandler dump in its output ("Fatal Python error: ..." then each
    thread's frames, most recent first); None when there is no dump or no test frame in it."""
    start = log_text.rfind("Fatal Python error")
    if start < 0:
        return None
    for found in re.finditer(r'File "([^"]+)", line \d+ in (\w+)', log_text[start:]):
        path, function = Path(found.group(1)), found.group(2)
        if path.name.startswith("test_") and function.startswith("test_"):
            try:
                path = path.resolve().relative_to(REPO)
            except ValueError:
                pass
            return f"{path.as_posix()}::{function}"
    return None


def run_tests_surviving_crashes(
    ctx: Context, name: str, targets: list[str], deadline: float, share: float = 1.0
) -> tuple[dict[str, dict], list[dict], list[str]]:
    """One pytest run of part b, rerun up to :data:`CRASH_RERUNS` times when a test crashes the
    process (a signal, not the time limit: the JUnit XML is then never written), each time with the
    crashing test deselected, so one crash does not hide every other result. The crashing test is
    recorded as failed. Returns ``(tests, proc briefs, problems)``."""
    tests: dict[str, dict] = {}
    procs, problems, deselected = [], [], []
    for attempt in range(CRASH_RERUNS + 1):
        left = _deadline_left(deadline)
        if left < 5:
            problems.append(f"{name}: no time left" + (" for a rerun after the crash" if attempt else ""))
            break
        run_name = name if attempt == 0 else f"{name}-rerun{attempt}"
        junit = ctx.work / f"{run_name}.xml"
        extra = [f"--junitxml={junit}", *(f"--deselect={d}" for d in deselected)]
        proc = ctx.pytest(run_name, targets, left * share, extra)
        procs.append(proc.brief())
        if junit.is_file():
            tests.update(parse_junit(junit)["tests"])
        crashed = proc.rc is not None and proc.rc < 0 and not proc.timed_out
        if crashed:
            culprit = crashed_test(Path(proc.log).read_text(errors="replace"))
            if culprit is not None and culprit not in deselected and attempt < CRASH_RERUNS:
                tests[culprit] = {"status": "failed", "message": f"crashed the pytest process (signal {-proc.rc}); rerun without it"}
                deselected.append(culprit)
                progress(f"  {run_name}: {culprit} crashed pytest (signal {-proc.rc}); rerunning without it")
                continue
            problems.append(f"{run_name}: pytest crashed (signal {-proc.rc})" + (f" in {culprit}" if culprit else ""))
        elif proc.timed_out:
            problems.append(f"{run_name} timed out")
        elif proc.rc not in (0, 1, 5) or not junit.is_file():
            problems.append(f"{run_name}: pytest exited {proc.rc}: {proc.tail.strip().splitlines()[-1:] if proc.tail.strip() else ''}")
        break
    return tests, procs, problems


def part_tests(ctx: Context, deadline: float) -> dict:
    runs = [("b-tests", TESTS_GPU if ctx.gpu else TESTS_CPU)]
    if ctx.gpu:
        runs.append(("b-tests-compile", TESTS_GPU_COMPILE))
    if ctx.gpu and dali_available(ctx):
        runs.append(("b-tests-dali", TESTS_GPU_DALI))
    elif ctx.gpu:
        ctx.notes.append("tests/test_dali.py not run: DALI not installed")
    tests: dict[str, dict] = {}
    procs, problems = [], []
    for i, (name, targets) in enumerate(runs):
        share = 1.0 if i == len(runs) - 1 else 0.8
        run_tests, run_procs, run_problems = run_tests_surviving_crashes(ctx, name, targets, deadline, share)
        tests.update(run_tests)
        procs += run_procs
        problems += run_problems
    counts: dict[str, int] = defaultdict(int)
    for entry in tests.values():
        counts[entry["status"]] += 1
    failed = {t: e.get("message", "") for t, e in tests.items() if e["status"] in ("failed", "error")}
    results = {"runs": procs, "counts": dict(counts), "failed": failed,
               "tests": {t: e["status"] for t, e in tests.items()}}  # fmt: skip
    if failed:
        raise PartFailed(f"{len(failed)} test(s) failed", results)
    if problems:
        raise PartFailed("; ".join(problems), results)
    return results


# ----------------------------------------------------------------------------- c: op benchmarks


def measure_copy(device: str, nbytes: int, reps: int = 5, warmup: int = 2) -> dict:
    """Device copy bandwidth: ``y.copy_(x)`` of ``nbytes`` float32, bytes read + written / median time."""
    import torch

    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    y = torch.empty_like(x)
    times = []
    for i in range(warmup + reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            y.copy_(x)
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            y.copy_(x)
            elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
    moved = 2 * x.numel() * x.element_size()
    median = statistics.median(times)
    del x, y
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"buffer_bytes": nbytes, "bytes_moved": moved, "median_s": median, "reps": reps,
            "bytes_per_s": moved / median, "gb_per_s": moved / median / 1e9}  # fmt: skip


def _bench_json(ctx: Context, name: str, targets: list[str], timeout: float, extra: list[str], env: dict | None = None):
    out = ctx.work / f"{name}.json"
    proc = ctx.pytest(name, targets, timeout, [f"--benchmark-json={out}", *extra], env)
    data = json.loads(out.read_text()) if out.is_file() else None
    return proc, data


def part_ops(ctx: Context, deadline: float) -> dict:
    copy = measure_copy(ctx.device, COPY_BYTES[ctx.device])
    progress(f"  copy bandwidth: {copy['gb_per_s']:.0f} GB/s (bytes read + written)")
    device_flag = ["--bench-device", ctx.device]
    runs = [("c-ops", OPS_GPU_CORE if ctx.gpu else OPS_CPU_CORE)]
    if ctx.gpu:
        runs.append(("c-ops-extra", OPS_GPU_EXTRA))
    benchmarks, procs, notes = [], [], []
    for i, (name, selection) in enumerate(runs):
        left = _deadline_left(deadline)
        if i > 0 and left < 20:
            notes.append(f"{name} ({selection}) skipped: {left:.0f} s left in the part's budget")
            continue
        proc, data = _bench_json(ctx, name, ["bench/bench_ops.py"], left * (0.7 if i == 0 and len(runs) > 1 else 1.0),
                                 ["-p", "gpu_check", *device_flag, "-k", selection])  # fmt: skip
        procs.append(proc.brief())
        if data:
            benchmarks += data.get("benchmarks", [])
        if proc.timed_out or proc.rc != 0:
            notes.append(f"{name}: {'timed out' if proc.timed_out else f'pytest exited {proc.rc}'}; results of the finished benchmarks kept")
    results = {"copy": copy, "runs": procs, **summarize_ops({"benchmarks": benchmarks}, copy["bytes_per_s"], ctx.gpu)}
    if notes:
        results["notes"] = notes
    if not benchmarks:
        raise PartFailed("no benchmark results: " + "; ".join(notes or ["see the log"]), results)
    return results


# ----------------------------------------------------------------------------- d: training benchmarks


def part_training(ctx: Context, deadline: float) -> dict:
    results: dict = {"benches": {}}
    benches = [b for b in TRAIN_BENCHES if ctx.gpu or b[2] is not None]
    if not ctx.gpu:
        results["data"] = "skipped: --cpu (the DALI mixed decoder needs a GPU)"
    elif not dali_available(ctx):
        benches = [b for b in benches if b[0] != "data"]
        results["data"] = "skipped: DALI not installed"
    env = ctx.env(GPU_CHECK_BENCH_SIZES=json.dumps({} if ctx.gpu else CPU_BENCH_SIZES))
    failures = []
    for i, (name, gpu_targets, cpu_targets, _) in enumerate(benches):
        left = _deadline_left(deadline)
        share = shares(left, [w for *_, w in benches[i:]])[0]
        if share < 10:
            results["benches"][name] = {"status": "skipped", "reason": f"{left:.0f} s left in the part's budget"}
            failures.append(f"{name} skipped")
            continue
        extra = ["-p", "gpu_check", "--bench-device", ctx.device]
        proc, data = _bench_json(ctx, f"d-{name}", gpu_targets if ctx.gpu else cpu_targets, share, extra, env)
        entry: dict = {"run": proc.brief(), "status": "ok" if proc.rc == 0 and data else "failed"}
        if data:
            entry.update(summarize_throughput(data, ctx.gpu))
        if proc.rc != 0 or not data:
            reason = "timed out" if proc.timed_out else f"pytest exited {proc.rc}"
            entry["reason"] = reason + ("; results of the finished benchmarks kept" if data else "")
            entry["log_tail"] = "\n".join(proc.tail.splitlines()[-15:])
            failures.append(f"{name}: {reason}")
        results["benches"][name] = entry
    if not ctx.gpu:
        results["sizes"] = {"note": "tiny --cpu sizes patched into bench sizes()", **CPU_BENCH_SIZES}
    if failures:
        raise PartFailed("; ".join(failures), results)
    return results


# ----------------------------------------------------------------------------- e: end to end


def part_end_to_end(ctx: Context, deadline: float) -> dict:
    out = ctx.work / "e2e-run"
    cache = ctx.work / "e2e-cache"
    settings = (E2E_GPU_SETTINGS if ctx.gpu else E2E_CPU_SETTINGS) + list(ctx.args.e2e_set or [])
    command = [sys.executable, "-m", "mtlue_fast.run", "--dataset", "celeba", "--device", ctx.device, "--out", str(out), "--quiet"]
    if not ctx.gpu:
        command += ["--preset", "smoke"]
    for s in settings:
        command += ["--set", s]
    progress(f"  e2e: {shlex.join(command[1:])} (up to {_deadline_left(deadline):.0f} s)")
    proc = run_logged(command, _deadline_left(deadline), ctx.logs / "e-run.log", ctx.env(MTLUE_CACHE=str(cache)))
    results: dict = {"run": proc.brief(), "settings": settings, "preset": "default" if ctx.gpu else "smoke"}
    report_path = out / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        results.update(
            drop=report.get("drop"), drop_std=report.get("drop_std"),
            clean_mean=(report.get("clean") or {}).get("mean"), protected_mean=(report.get("protected") or {}).get("mean"),
            metric=report.get("metric"), timings=report.get("timings"), throughput=report.get("throughput"),
        )  # fmt: skip
    else:
        stages = out / "stages.json"
        if stages.is_file():
            results["timings"] = {k: v.get("seconds") for k, v in json.loads(stages.read_text()).items()}
    if proc.rc != 0 or not report_path.is_file():
        results["log_tail"] = "\n".join(proc.tail.splitlines()[-20:])
        why = "timed out" if proc.timed_out else f"exited {proc.rc}"
        raise PartFailed(f"run {why}" + ("" if report_path.is_file() else "; no report.json (stage times from stages.json)"), results)
    return results


PART_FUNCTIONS = {"a": part_build, "b": part_tests, "c": part_ops, "d": part_training, "e": part_end_to_end}


# ----------------------------------------------------------------------------- machine and versions


def _cpu_model() -> str:
    """``mtlue_fast.report.cpu_model()`` (the one lscpu reader, shared with bench/efficacy.py). On a
    fresh GPU machine the package is not installed before part a, and this script's own folder is
    ``bench/``: then the source tree's copy is imported (pure Python; no compiled library loads)."""
    try:
        from mtlue_fast.report import cpu_model
    except ImportError:
        sys.path.insert(0, str(REPO))
        try:
            from mtlue_fast.report import cpu_model
        finally:
            sys.path.remove(str(REPO))
    return cpu_model()


def machine(device: str) -> dict:
    import torch

    info: dict = {
        "type": device,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
    }
    try:
        import pytest_benchmark

        info["pytest_benchmark"] = pytest_benchmark.__version__
    except Exception:
        info["pytest_benchmark"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            name=torch.cuda.get_device_name(0), capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(), driver=_driver_version(), gpus=torch.cuda.device_count(),
        )  # fmt: skip
    else:
        info["name"] = info["cpu"] or "cpu"
    return info


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)  # fmt: skip
        return out.stdout.strip().splitlines()[0]
    except Exception:
        return None


def git_revision() -> dict:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=20).stdout.strip())
        return {"revision": rev, "dirty": dirty}
    except Exception:
        return {"revision": None, "dirty": None, "note": "not a git checkout"}


# ----------------------------------------------------------------------------- Markdown


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown(record: dict) -> str:
    dev = ver = record["device"]  # the versions are recorded with the device
    lines = [
        f"# Device check: {dev.get('name')} ({record['date']})",
        "",
        f"`{record['command']}`: {record['seconds']:.0f} s, exit status {record['exit_status']}.",
        "",
        f"- device: {dev.get('name')}" + (f", capability {dev.get('capability')}, {dev.get('memory_gib')} GiB, driver {dev.get('driver')}" if dev["type"] == "cuda" else ""),
        f"- torch {ver.get('torch')} (CUDA {ver.get('torch_cuda') or 'none'}), Python {ver.get('python')}, {dev.get('cores')} cores",
        f"- git {record['git'].get('revision') or '?'}" + (" (uncommitted changes)" if record["git"].get("dirty") else ""),
        "",
        "| part | status | seconds | note |",
        "|---|---|---:|---|",
    ]  # fmt: skip
    for key in PARTS:
        p = record["parts"][key]
        note = (p.get("reason") or "").replace("|", "/").replace("\n", " ")
        lines.append(f"| {key}. {p['name']} | {p['status']} | {_fmt(p.get('seconds'), 0)} | {note} |")
    parts = record["parts"]
    a = parts["a"].get("results") or {}
    if a.get("after"):
        lines += ["", "Backends: " + "; ".join(f"{op}: " + ", ".join(f"{d} {how}" for d, how in t.items()) for op, t in a["after"].items())]
    b = parts["b"].get("results") or {}
    if b.get("counts"):
        lines += ["", "Tests: " + ", ".join(f"{n} {s}" for s, n in sorted(b["counts"].items()))]
        lines += [f"- FAILED {t}: {m[:200]}" for t, m in (b.get("failed") or {}).items()]
    c = parts["c"].get("results") or {}
    if c.get("rows"):
        copy = c["copy"]
        lines += ["", f"Op benchmarks (copy bandwidth {copy['gb_per_s']:,.0f} GB/s, {copy['buffer_bytes'] // 2**20} MiB buffer, bytes read + written):", "",
                  "| op | size | impl | median ms | GB/s | % of copy | time / compiled |", "|---|---|---|---:|---:|---:|---:|"]  # fmt: skip
        for r in c["rows"]:
            frac = f"{100 * r['fraction_of_copy']:.0f}%" if r.get("fraction_of_copy") is not None else "-"
            lines.append(f"| {r['op']} | {r['size']} | {r['impl']} | {r['median_ms']:.3f} | {_fmt(r.get('gb_per_s'), 0)} | {frac} | {_fmt(r.get('time_vs_compiled'), 1)} |")
        for size, t in (c.get("target") or {}).get("sizes", {}).items():
            verdict = {True: "met", False: "NOT met", None: "not judged on a CPU"}[t["met"]]
            lines.append(f"\nTarget perturb_apply >= {PERTURB_TARGET:.0%} of copy, {size}: {100 * t['fraction_of_copy']:.0f}% ({verdict})")
    d = parts["d"].get("results") or {}
    for name, bench in (d.get("benches") or {}).items():
        for group, rows in (bench.get("groups") or {}).items():
            lines += ["", f"{group}:", "", "| variant | images/s | ratio |", "|---|---:|---:|"]
            for v, r in sorted(rows.items(), key=lambda kv: -kv[1]["images_per_second"]):
                ratio = next((f"{val:.2f}x {k[3:] if k.startswith('vs_') else 'step/ew'}" for k, val in r.items() if k.startswith("vs_") or k == "step_time_vs_ew"), "-")
                lines.append(f"| {v} | {r['images_per_second']:,.0f} | {ratio} |")
        for t_name, t in (bench.get("targets") or {}).items():
            verdict = {True: "met", False: "NOT met", None: "not judged at CPU sizes"}[t["met"]]
            lines.append(f"\nTarget {t_name}: {_fmt(t['value'])} vs {t['threshold']:g} ({verdict})")
    if d.get("data"):
        lines += ["", f"Data benchmarks: {d['data']}"]
    e = parts["e"].get("results") or {}
    if e:
        lines += ["", f"End to end (`--set {' --set '.join(e.get('settings', []))}`, preset {e.get('preset')}): "
                  f"clean {_fmt(e.get('clean_mean'), 3)}, protected {_fmt(e.get('protected_mean'), 3)}, drop {_fmt(e.get('drop'), 3)}"
                  + (f" +- {_fmt(e.get('drop_std'), 3)}" if e.get("drop_std") is not None else "")]  # fmt: skip
        if e.get("timings"):
            lines.append("Stage seconds: " + ", ".join(f"{k} {_fmt(v, 1)}" for k, v in e["timings"].items()))
    if record.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in record["notes"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def parse_budgets(text: str | None) -> dict[str, float]:
    """``"c=60,e=120"`` -> ``{"c": 60.0, "e": 120.0}``."""
    out: dict[str, float] = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        if key.strip() not in PARTS or not value:
            raise argparse.ArgumentTypeError(f"--budgets takes PART=SECONDS with PART in {','.join(PARTS)}, got {item!r}")
        out[key.strip()] = float(value)
    return out


def parse_parts(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise argparse.ArgumentTypeError(f"--parts takes a comma-separated subset of {','.join(PARTS)}, got {','.join(bad)}")
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run everything on the CPU at tiny sizes (about 2 minutes)")
    parser.add_argument("--out", help="folder for the JSON and Markdown (default bench/results/)")
    parser.add_argument("--logs", help="folder for the subprocess logs (default <out>/<stem>-logs with --out, else a temporary folder)")
    parser.add_argument("--budget", type=float, help=f"overall seconds (default {GPU_TOTAL} on a GPU, {CPU_TOTAL} with --cpu)")
    parser.add_argument("--budgets", type=parse_budgets, default={}, help="per-part seconds, e.g. c=60,e=120")
    parser.add_argument("--parts", type=parse_parts, default=list(PARTS), help="comma-separated subset of a,b,c,d,e")
    parser.add_argument("--no-build", action="store_true", help="part a records the backends but never builds")
    parser.add_argument("--e2e-set", action="append", metavar="KEY=VALUE", help="extra --set for the end-to-end run")
    args = parser.parse_args(argv)

    def terminated(signum, frame):  # the device tool's time limit: stop the children, keep the record
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    import torch

    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here; use --cpu for the CPU plumbing run", file=sys.stderr)
        return 2
    budget = Budget(args.budget if args.budget is not None else (CPU_TOTAL if args.cpu else GPU_TOTAL))
    part_budgets = {**(CPU_BUDGETS if args.cpu else GPU_BUDGETS), **args.budgets}
    minimum = CPU_MINIMUM if args.cpu else GPU_MINIMUM
    dev = machine(device)
    date = datetime.date.today().isoformat()
    stem = f"gpu-check-{slug(dev['name']) if device == 'cuda' else 'cpu'}-{date}"
    out_dir = Path(args.out) if args.out else BENCH / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"

    record: dict = {
        "schema": 1,
        "command": shlex.join(["python", "bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": date,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
        "mode": device,
        "device": dev,
        "git": git_revision(),
        "budget": {"total": budget.seconds, "parts": part_budgets, "minimum": minimum},
        "parts": {k: {"name": PART_NAMES[k], "status": "pending"} for k in PARTS},
        "seconds": 0.0,
        "exit_status": None,
        "notes": [],
    }

    def save() -> None:
        record["seconds"] = round(budget.elapsed(), 1)
        json_path.write_text(json.dumps(record, indent=1, default=str) + "\n")
        md_path.write_text(markdown(record))

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        logs = Path(args.logs) if args.logs else (out_dir / f"{stem}-logs" if args.out else Path(tmp) / "logs")
        ctx = Context(args, device, Path(tmp), logs, capability=dev.get("capability"))
        progress(f"{dev['name']} ({device}); budget {budget.seconds:.0f} s; results {json_path}; logs {logs}")
        for key in PARTS:
            entry = record["parts"][key]
            if key not in args.parts:
                entry.update(status="skipped", reason="not in --parts")
                continue
            reserve = sum(minimum[k] for k in PARTS[PARTS.index(key) + 1:] if k in args.parts)
            seconds, why = allot(part_budgets[key], budget.remaining(), minimum[key], reserve)
            if seconds is None:
                entry.update(status="skipped", reason=why)
                progress(f"{key}. {PART_NAMES[key]}: skipped ({why})")
                save()
                continue
            progress(f"{key}. {PART_NAMES[key]}: start (budget {seconds:.0f} s, {budget.remaining():.0f} s left overall)")
            start = time.monotonic()
            entry["budget_s"] = round(seconds, 1)
            try:
                entry.update(status="ok", reason=None, results=PART_FUNCTIONS[key](ctx, start + seconds))
            except PartFailed as err:
                entry.update(status="failed", reason=err.reason, results=err.results)
            except (KeyboardInterrupt, SystemExit) as err:
                entry.update(status="failed", reason=f"interrupted ({type(err).__name__})", seconds=round(time.monotonic() - start, 1))
                record["exit_status"] = 130 if isinstance(err, KeyboardInterrupt) else err.code
                save()
                raise
            except Exception as err:  # a bug in this script must not lose the other parts
                entry.update(status="failed", reason=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-3000:])
            entry["seconds"] = round(time.monotonic() - start, 1)
            progress(f"{key}. {PART_NAMES[key]}: {entry['status']} in {entry['seconds']:.0f} s" + (f" ({entry['reason']})" if entry.get("reason") else ""))
            record["notes"] = list(ctx.notes)
            save()
        tests = record["parts"]["b"]
        parity_failed = tests["status"] == "failed"
        record["exit_status"] = 1 if parity_failed else 0
        save()
    progress(f"done in {budget.elapsed():.0f} s: {json_path} and {md_path.name}" + ("; TESTS FAILED" if parity_failed else ""))
    return record["exit_status"]


if __name__ == "__main__":
    sys.exit(main())
