"""bench/gpu_check.py: its pure helpers, and the whole script end to end with --cpu (tiny sizes)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.py"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gc = _load("gpu_check_under_test", SCRIPT)


def test_bandwidth_fraction():
    # 1.5 GB in 1 ms against a 3 TB/s copy: 1.5 TB/s, half of it.
    assert gc.bandwidth_fraction(1.5e9, 1e-3, 3e12) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        gc.bandwidth_fraction(1, 0, 1)


def test_op_bytes_from_size_names():
    window, full = 512 * 3 * 64 * 64, 512 * 3 * 70 * 70
    assert gc.op_bytes("perturb_apply", "celeba_512x3x70_crop64") == 18 * window + 4 * full
    assert gc.op_bytes("quantize_export", "celeba_512x3x70_crop64") == 7 * full
    assert gc.op_bytes("embedding_reg", "celeba_R80_D19600") == 12 * 80 * 19600
    assert gc.op_bytes("perturb_apply", "odd") is None and gc.op_bytes("copy", "x") is None


def test_byte_formulas_agree_with_bench_ops():
    """The fallback formulas give what bench_ops.py records in ``extra_info["bytes"]``."""
    bench_ops = _load("bench_ops_under_test", REPO / "bench" / "bench_ops.py")
    for name, size in bench_ops.PERTURB_SIZES.items():
        assert gc.op_bytes("perturb_apply", name) == bench_ops.perturb_bytes(size)
        batch, channels, side, _ = size
        assert gc.op_bytes("quantize_export", name) == batch * channels * side * side * (1 + 4 + 1 + 1)


def test_allot_and_budget():
    assert gc.allot(60, 500, 10) == (60, None)
    assert gc.allot(60, 30, 10) == (30, None)  # capped by what is left overall
    seconds, why = gc.allot(60, 5, 10)
    assert seconds is None and "overall budget spent" in why
    seconds, why = gc.allot(5, 500, 10)
    assert seconds is None and "under its minimum" in why
    assert gc.allot(60, 100, 10, reserve=70) == (30, None)  # the later parts' minimums are held back
    seconds, why = gc.allot(60, 100, 10, reserve=95)
    assert seconds is None and "95 s kept for the later parts" in why
    now = [100.0]
    budget = gc.Budget(50, clock=lambda: now[0])
    now[0] = 130.0
    assert budget.elapsed() == 30 and budget.remaining() == 20
    assert gc.shares(30, [1, 1, 1]) == [10, 10, 10] and gc.shares(10, [1, 0.25])[0] == pytest.approx(8)


def test_parse_junit():
    xml = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
    <testcase classname="tests.test_perturb_apply" name="test_a[cuda]" time="0.1"/>
    <testcase classname="tests.test_perturb_apply" name="test_b[cuda]" time="0.2"><failure message="assert 1 == 2">trace</failure></testcase>
    <testcase classname="tests.test_loader" name="test_c" time="0"><skipped type="pytest.skip" message="needs a CUDA device"/></testcase>
    <testcase classname="tests.test_x" name="test_d" time="0"><error message="fixture broke"/></testcase>
    </testsuite></testsuites>"""
    parsed = gc.parse_junit(xml)
    assert parsed["counts"] == {"passed": 1, "failed": 1, "skipped": 1, "error": 1}
    assert parsed["tests"]["tests.test_perturb_apply::test_b[cuda]"] == {"status": "failed", "seconds": 0.2, "message": "assert 1 == 2"}
    assert parsed["tests"]["tests.test_loader::test_c"]["message"] == "needs a CUDA device"


def _bench(entries):
    return {"benchmarks": [{"name": n, "group": g, "stats": {"median": m}, "extra_info": e} for n, g, m, e in entries]}


def test_summarize_ops_fraction_and_target():
    size = "celeba_512x3x70_crop64"
    nbytes = gc.op_bytes("perturb_apply", size)
    data = _bench([
        ("p-c", "g", nbytes / 2.4e12, {"op": "perturb_apply", "size": size, "impl": "compiled", "bytes": nbytes}),
        ("p-r", "g", nbytes / 0.6e12, {"op": "perturb_apply", "size": size, "impl": "reference", "bytes": nbytes}),
        ("e-c", "h", 1e-3, {"op": "embedding_reg", "size": "celeba_R80_D19600", "impl": "compiled"}),
        ("copy", "c", 1e-3, {"op": "copy", "size": "copy_256MiB", "impl": "copy", "bytes": 3e9}),
    ])  # fmt: skip
    out = gc.summarize_ops(data, 3e12, gpu=True)
    rows = {(r["op"], r["impl"]): r for r in out["rows"]}
    assert rows["perturb_apply", "compiled"]["fraction_of_copy"] == pytest.approx(0.8)
    assert rows["perturb_apply", "reference"]["time_vs_compiled"] == pytest.approx(4.0)
    assert rows["embedding_reg", "compiled"]["bytes"] == 12 * 80 * 19600  # computed from the size name
    assert out["target"]["sizes"][size]["met"] is True
    assert out["bench_copy"]["gb_per_s"] == pytest.approx(3000)
    assert gc.summarize_ops(data, 3e12, gpu=False)["target"]["sizes"][size]["met"] is None


def test_summarize_throughput_ratios_and_targets():
    data = _bench([
        ("v-s", "victim", 1.0, {"images": 10240, "variant": "straightforward", "kind": "victim"}),
        ("v-f", "victim", 0.25, {"images": 10240, "variant": "fast", "kind": "victim"}),
        ("w-e", "weighting", 0.5, {"images": 10240, "variant": "ew", "kind": "weighting"}),
        ("w-p", "weighting", 1.5, {"images": 10240, "variant": "pcgrad", "kind": "weighting"}),
        ("s-s", "sep", 0.1, {"images": 512, "variant": "shared pass", "kind": "generator"}),
        ("s-p", "sep", 0.6, {"images": 512, "variant": "pass per checkpoint", "kind": "generator"}),
    ])  # fmt: skip
    out = gc.summarize_throughput(data, gpu=True)
    assert out["groups"]["victim"]["fast"]["vs_straightforward"] == pytest.approx(4.0)
    assert out["targets"]["victim_fast_vs_straightforward"]["met"] is True
    assert out["targets"]["victim_fast_images_per_second"] == {"value": 40960.0, "threshold": 25000.0, "met": True}
    assert out["targets"]["weighting_step_vs_ew_max"]["value"] == pytest.approx(3.0)
    assert out["targets"]["weighting_step_vs_ew_max"]["met"] is False
    assert out["targets"]["sep_shared_vs_per_checkpoint"]["value"] == pytest.approx(6.0)
    assert all(t["met"] is None for t in gc.summarize_throughput(data, gpu=False)["targets"].values())


def test_backends_complete_and_slug():
    info = {"ops": {"perturb_apply": {"cpu": "compiled CPU", "cuda": "reference"}, "quantize_export": {"cpu": "compiled CPU", "cuda": "compiled CUDA"}}}
    assert gc.backends_complete(info, "cpu") and not gc.backends_complete(info, "cuda")
    assert not gc.backends_complete(None, "cpu") and not gc.backends_complete({"ops": {}}, "cpu")
    assert gc.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_size_plugin_wraps_sizes(monkeypatch):
    module = type(sys)("bench_fake_sizes")
    module.sizes = lambda device: {"width": 1.0, "batch_size": 512, "steps": 20}
    monkeypatch.setitem(sys.modules, "bench_fake_sizes", module)
    monkeypatch.setenv("GPU_CHECK_BENCH_SIZES", json.dumps({"bench_fake_sizes": {"batch_size": 8}}))
    gc.pytest_collection_finish(None)
    assert module.sizes("cpu") == {"width": 1.0, "batch_size": 8, "steps": 20}


def test_cli_parsing():
    assert gc.parse_budgets("c=60,e=120.5") == {"c": 60.0, "e": 120.5}
    assert gc.parse_parts("a, c") == ["a", "c"]
    with pytest.raises(Exception):
        gc.parse_parts("a,z")
    with pytest.raises(Exception):
        gc.parse_budgets("x=3")


def test_markdown_of_a_skipped_run():
    record = {"date": "2026-01-01", "command": "python bench/gpu_check.py", "seconds": 1.0, "exit_status": 0,
              "device": {"type": "cpu", "name": "cpu", "torch": "2", "python": "3", "cores": 2}, "git": {"revision": None},
              "parts": {k: {"name": gc.PART_NAMES[k], "status": "skipped", "reason": "not in --parts"} for k in gc.PARTS}}  # fmt: skip
    text = gc.markdown(record)
    assert "| e. end to end | skipped |" in text


CRASH_LOG = """FFF......Fatal Python error: Segmentation fault

Thread 0x00007fb9875cf6c0 (most recent call first):
  <no Python frame>

Current thread 0x00007fbc8b276140 (most recent call first):
  File "/opt/venv/lib/python3.12/site-packages/torch/_ops.py", line 1269 in __call__
  File "{repo}/mtlue_fast/ops/__init__.py", line 104 in quantize_export
  File "{repo}/tests/test_quantize_export.py", line 50 in test_delta_beyond_int8_range_is_an_error
  File "/opt/venv/lib/python3.12/site-packages/_pytest/python.py", line 167 in pytest_pyfunc_call
"""


def test_crashed_test_reads_the_faulthandler_dump():
    log = CRASH_LOG.format(repo=REPO)
    assert gc.crashed_test(log) == "tests/test_quantize_export.py::test_delta_beyond_int8_range_is_an_error"
    assert gc.crashed_test("....F.. 1 failed, 6 passed") is None
    assert gc.crashed_test("Fatal Python error: Aborted\n  File \"/x/conftest.py\", line 3 in setup\n") is None


def test_part_b_reruns_without_the_test_that_crashed(tmp_path):
    """A crash (negative exit status, no JUnit XML) is followed by a rerun that deselects the
    crashing test; the crash is recorded as a failure and the rerun's results are kept."""
    calls = []
    ctx = gc.Context(args=None, device="cuda", work=tmp_path, logs=tmp_path / "logs")

    def fake_pytest(name, targets, timeout, extra, env=None):
        calls.append(extra)
        log = tmp_path / f"{name}.log"
        junit = Path(extra[0].split("=", 1)[1])
        if len(calls) == 1:
            log.write_text(CRASH_LOG.format(repo=REPO))
            return gc.Proc([name], -11, False, 1.0, str(log))
        junit.write_text('<testsuite><testcase classname="tests.test_a" name="test_ok" time="0.1"/></testsuite>')
        log.write_text("1 passed")
        return gc.Proc([name], 0, False, 1.0, str(log))

    ctx.pytest = fake_pytest
    tests, procs, problems = gc.run_tests_surviving_crashes(ctx, "b-tests", ["tests"], gc.time.monotonic() + 60)
    culprit = "tests/test_quantize_export.py::test_delta_beyond_int8_range_is_an_error"
    assert len(calls) == 2 and f"--deselect={culprit}" in calls[1] and not any("--deselect" in a for a in calls[0])
    assert tests[culprit]["status"] == "failed" and "signal 11" in tests[culprit]["message"]
    assert tests["tests.test_a::test_ok"]["status"] == "passed"
    assert problems == [] and len(procs) == 2


def test_part_b_stops_rerunning_a_crash_it_cannot_place(tmp_path):
    ctx = gc.Context(args=None, device="cuda", work=tmp_path, logs=tmp_path / "logs")
    calls = []

    def crashing(name, targets, timeout, extra, env=None):
        calls.append(name)
        log = tmp_path / f"{name}.log"
        log.write_text("Fatal Python error: Segmentation fault\n  <no Python frame>\n")
        return gc.Proc([name], -11, False, 1.0, str(log))

    ctx.pytest = crashing
    tests, procs, problems = gc.run_tests_surviving_crashes(ctx, "b-tests", ["tests"], gc.time.monotonic() + 60)
    assert calls == ["b-tests"] and tests == {} and problems == ["b-tests: pytest crashed (signal 11)"]


def test_machine_record_without_an_installed_package(tmp_path):
    """A fresh GPU machine has no mtlue_fast installed before part a builds it: the machine record
    (taken before any part runs) must not need it. A package that fails to import stands in for the
    missing one."""
    fake = tmp_path / "mtlue_fast"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('mtlue_fast is not installed here')\n")
    code = (f"import sys; sys.path[:0] = [{str(REPO / 'bench')!r}, {str(tmp_path)!r}]; import gpu_check; "
            "print(gpu_check.machine('cpu')['cpu'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip(), "no CPU model printed"


def test_cpu_run_end_to_end(tmp_path):
    """The whole script at --cpu sizes (about 2 minutes on 2 busy cores): every part reports a status,
    the Markdown is written, and the parity subset passed (exit status 0)."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=420)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (json_path,) = tmp_path.glob("gpu-check-cpu-*.json")
    record = json.loads(json_path.read_text())
    assert set(record["parts"]) == set(gc.PARTS)
    for key, part in record["parts"].items():
        assert part["status"] in ("ok", "failed", "skipped"), (key, part)
    assert record["parts"]["b"]["status"] == "ok" and record["parts"]["b"]["results"]["counts"]["passed"] > 0
    assert record["device"]["torch"] and "revision" in record["git"]
    assert json_path.with_suffix(".md").is_file()


@pytest.mark.parametrize("gpu", [True, False], ids=["gpu", "cpu"])
def test_end_to_end_settings_are_valid_config(gpu):
    """The --set overrides of part e name real config keys (a renamed key would only show on the GPU)."""
    from mtlue_fast import config

    settings = gc.E2E_GPU_SETTINGS if gpu else gc.E2E_CPU_SETTINGS
    cfg = config.resolve("celeba", synthetic=True, preset="default" if gpu else "smoke", assignments=settings)
    assert cfg.train.width == (1.0 if gpu else 0.25)
