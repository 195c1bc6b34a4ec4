"""Part ``tests``: the CUDA tests, with an outcome per test even when one of them crashes pytest.

On a GPU: ``pytest -m cuda tests`` (the op parity tests on both devices, the sync-free training
steps under ``torch.cuda.set_sync_debug_mode("error")``, loader, losses, metrics...), then
``tests/test_compile.py`` in a run of its own (a cold inductor compile can take most of the part's
time and must not keep the others from running), then ``tests/test_dali.py`` where DALI imports.
With ``--cpu``: the CPU op-vs-reference tests and the parity file (its CUDA tests skip): the
plumbing only.

A test that kills the pytest process (a segfault in a kernel) leaves no JUnit XML. The dump
faulthandler prints names it; it is recorded as failed and the run repeated without it (up to
:data:`CRASH_RERUNS` times), so one crash does not hide every other result.
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

from . import junit
from .runner import Context, PartFailed, progress, shares, time_left

# A file that fails to import must not keep the others from running; a test hung in the driver is
# named in the log (its stack dumped) after a minute.
ROBUST = ["--continue-on-collection-errors", "-o", "faulthandler_timeout=60"]
TESTS_GPU = ["tests", "-m", "cuda", "--ignore=tests/test_compile.py", *ROBUST]
TESTS_GPU_COMPILE = ["tests/test_compile.py", "-m", "cuda", *ROBUST]
TESTS_GPU_DALI = ["tests/test_dali.py", "-m", "not slow", *ROBUST]
TESTS_CPU = [
    "tests/test_perturb_apply.py", "tests/test_quantize_export.py", "tests/test_embedding_reg.py",
    "tests/test_cuda_parity.py", "-k", "(cpu and matches_reference) or cuda_parity",
]  # fmt: skip

#: How often a run is repeated after a test crashed it, each time without the crashing test.
CRASH_RERUNS = 2


def dali_available(ctx: Context) -> bool:
    """Whether ``nvidia.dali`` imports (as the build part's probe saw it, when it ran)."""
    if ctx.info is not None:
        return ctx.info.get("dali", "not installed") != "not installed"
    try:
        importlib.import_module("nvidia.dali")
        return True
    except Exception:  # noqa: BLE001
        return False


def run_tests_surviving_crashes(
    ctx: Context, name: str, targets: list[str], deadline: float, share: float | None = None
) -> tuple[dict[str, dict], list[dict], list[str]]:
    """One pytest run, repeated without the crashing test after a crash (a signal, not the time
    limit). ``share``: seconds for the first attempt (default: all that is left). Returns
    ``(tests, proc briefs, problems)``; ``tests`` maps test ids to their outcome."""
    tests: dict[str, dict] = {}
    procs, problems, deselected = [], [], []
    for attempt in range(CRASH_RERUNS + 1):
        left = time_left(deadline)
        if left < 5:
            problems.append(f"{name}: no time left" + (" for a rerun after the crash" if attempt else ""))
            break
        run_name = name if attempt == 0 else f"{name}-rerun{attempt}"
        xml = ctx.work / f"{run_name}.xml"
        extra = [f"--junitxml={xml}", *(f"--deselect={d}" for d in deselected)]
        proc = ctx.pytest(run_name, targets, min(left, share) if share and attempt == 0 else left, extra)
        procs.append(proc.brief())
        if xml.is_file():
            tests.update(junit.parse_junit(xml)["tests"])
            if ctx.out is not None:
                (ctx.out / "tests").mkdir(parents=True, exist_ok=True)
                shutil.copy(xml, ctx.out / "tests" / xml.name)
        if proc.rc is not None and proc.rc < 0 and not proc.timed_out:
            culprit = junit.crashed_test(Path(proc.log).read_text(errors="replace"))
            if culprit is not None and culprit not in deselected and attempt < CRASH_RERUNS:
                tests[culprit] = {"status": "failed", "message": f"crashed the pytest process (signal {-proc.rc}); rerun without it"}
                deselected.append(culprit)
                progress(f"  {run_name}: {culprit} crashed pytest (signal {-proc.rc}); rerunning without it")
                continue
            problems.append(f"{run_name}: pytest crashed (signal {-proc.rc})" + (f" in {culprit}" if culprit else ""))
        elif proc.timed_out:
            problems.append(f"{run_name} timed out")
        elif proc.rc not in (0, 1, 5) or not xml.is_file():  # 1: tests failed; 5: none selected
            last = proc.tail.strip().splitlines()[-1:] if proc.tail.strip() else []
            problems.append(f"{run_name}: pytest exited {proc.rc}" + (f": {last[0]}" if last else ""))
        break
    return tests, procs, problems


def planned_runs(ctx: Context) -> list[tuple[str, list[str], float]]:
    """``(name, pytest arguments, time-share weight)`` of each run on this device."""
    if not ctx.gpu:
        return [("tests", TESTS_CPU, 1.0)]
    runs = [("tests", TESTS_GPU, 2.0), ("tests-compile", TESTS_GPU_COMPILE, 1.0)]
    if dali_available(ctx):
        runs.append(("tests-dali", TESTS_GPU_DALI, 1.0))
    else:
        ctx.notes.append("tests/test_dali.py not run: DALI not installed")
    return runs


def part_tests(ctx: Context, deadline: float) -> dict:
    """Every run of :func:`planned_runs`; fails when a test failed or a run could not finish."""
    runs = planned_runs(ctx)
    tests: dict[str, dict] = {}
    procs, problems = [], []
    for i, (name, targets, _) in enumerate(runs):
        share = shares(time_left(deadline), [w for *_, w in runs[i:]])[0]
        run_tests, run_procs, run_problems = run_tests_surviving_crashes(ctx, name, targets, deadline, share)
        tests.update(run_tests)
        procs += run_procs
        problems += run_problems
    failed = {t: e.get("message", "") for t, e in tests.items() if e["status"] in ("failed", "error")}
    results = {"runs": procs, "counts": junit.count(tests), "modules": junit.by_module(tests), "failed": failed, "tests": tests}
    if failed:
        raise PartFailed(f"{len(failed)} test(s) failed", results)
    if problems:
        raise PartFailed("; ".join(problems), results)
    return results
