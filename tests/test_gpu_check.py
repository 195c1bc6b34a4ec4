"""bench/gpu_check.py and its parts (bench/device_check/): the pure helpers, each part's plumbing
with the subprocesses faked, and the whole script end to end with --cpu (tiny sizes)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.py"
sys.path.insert(0, str(REPO / "bench"))

from device_check import PARTS, bandwidth, benchmarks, build, cli, cuda_tests, junit, paper_scale, pipeline, summary  # noqa: E402
from device_check import bench_plugin, record, runner, targets, throughput  # noqa: E402


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _ctx(tmp_path, device="cuda", out=True, **options) -> runner.Context:
    args = cli.parser().parse_args(["--out", str(tmp_path / "out"), *(["--cpu"] if device == "cpu" else [])])
    for key, value in options.items():
        setattr(args, key, value)
    return runner.Context(args, device, tmp_path, tmp_path / "logs", out=(tmp_path / "out") if out else None, capability="9.0")


# ----------------------------------------------------------------------------- bandwidth and throughput


def test_bandwidth_fraction():
    # 1.5 GB in 1 ms against a 3 TB/s copy: 1.5 TB/s, half of it.
    assert bandwidth.bandwidth_fraction(1.5e9, 1e-3, 3e12) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        bandwidth.bandwidth_fraction(1, 0, 1)


def test_op_bytes_from_size_names():
    window, full = 512 * 3 * 64 * 64, 512 * 3 * 70 * 70
    assert bandwidth.op_bytes("perturb_apply", "celeba_512x3x70_crop64") == 18 * window + 4 * full
    assert bandwidth.op_bytes("quantize_export", "celeba_512x3x70_crop64") == 7 * full
    assert bandwidth.op_bytes("embedding_reg", "celeba_R80_D19600") == 12 * 80 * 19600
    assert bandwidth.op_bytes("perturb_apply", "odd") is None and bandwidth.op_bytes("copy", "x") is None


def test_byte_formulas_agree_with_bench_ops():
    """The fallback formulas give what bench_ops.py records in ``extra_info["bytes"]`` (float32 raw)."""
    bench_ops = _load("bench_ops_under_test", REPO / "bench" / "bench_ops.py")
    for name, size in bench_ops.PERTURB_SIZES.items():
        assert bandwidth.op_bytes("perturb_apply", name) == bench_ops.perturb_bytes(size)
        batch, channels, side, _ = size
        assert bandwidth.op_bytes("quantize_export", name) == batch * channels * side * side * (1 + 4 + 1 + 1)


def _bench(entries):
    return {"benchmarks": [{"name": n, "fullname": f"f::{n}", "group": g, "stats": {"median": m}, "extra_info": e} for n, g, m, e in entries]}


def test_summarize_ops_fraction_and_target():
    size = "celeba_512x3x70_crop64"
    nbytes = bandwidth.op_bytes("perturb_apply", size)
    pa = {"op": "perturb_apply", "size": size, "passes": "forward+backward"}
    data = _bench([
        ("p-c", "g", nbytes / 2.4e12, {**pa, "impl": "compiled", "raw": "float32", "bytes": nbytes}),
        ("p-r", "g", nbytes / 0.6e12, {**pa, "impl": "reference", "raw": "float32", "bytes": nbytes}),
        ("p-cb", "g", 1e-3, {**pa, "impl": "compiled", "raw": "bfloat16", "bytes": nbytes // 2}),
        ("p-rb", "g", 4e-3, {**pa, "impl": "reference", "raw": "bfloat16", "bytes": nbytes // 2}),
        ("e-c", "h", 1e-3, {"op": "embedding_reg", "size": "celeba_R80_D19600", "impl": "compiled"}),
        ("copy", "c", 1e-3, {"op": "copy", "size": "copy_256MiB", "impl": "copy", "bytes": 3e9}),
    ])  # fmt: skip
    out = bandwidth.summarize_ops(data, 3e12)
    rows = {(r["op"], r["impl"], r["raw"]): r for r in out["rows"]}
    assert rows["perturb_apply", "compiled", "float32"]["fraction_of_copy"] == pytest.approx(0.8)
    assert rows["perturb_apply", "reference", "float32"]["time_vs_compiled"] == pytest.approx(4.0)
    assert rows["perturb_apply", "reference", "bfloat16"]["time_vs_compiled"] == pytest.approx(4.0)  # against bf16 compiled
    assert rows["embedding_reg", "compiled", None]["bytes"] == 12 * 80 * 19600  # from the size name
    assert out["bench_copy"]["gb_per_s"] == pytest.approx(3000)


def test_summarize_throughput_ratios():
    data = _bench([
        ("v-s", "victim", 1.0, {"images": 10240, "variant": "straightforward", "kind": "victim"}),
        ("v-f", "victim", 0.25, {"images": 10240, "variant": "fast", "kind": "victim"}),
        ("w-e", "weighting", 0.5, {"images": 10240, "variant": "ew", "kind": "weighting"}),
        ("w-p", "weighting", 1.5, {"images": 10240, "variant": "pcgrad", "kind": "weighting"}),
        ("d-p", "decode", 2.0, {"images": 512, "decoder": "pil", "role": "cpu-pipeline"}),
        ("d-g", "decode", 0.5, {"images": 512, "decoder": "torchvision-cuda", "role": "gpu"}),
    ])  # fmt: skip
    out = throughput.summarize_throughput(data)
    assert out["groups"]["victim"]["fast"]["vs_straightforward"] == pytest.approx(4.0)
    assert out["groups"]["victim"]["fast"]["images_per_second"] == pytest.approx(40960.0)
    assert out["groups"]["weighting"]["pcgrad"]["step_time_vs_ew"] == pytest.approx(3.0)
    assert out["groups"]["decode"]["torchvision-cuda"] == {"images_per_second": 1024.0, "median_s": 0.5, "role": "gpu", "vs_pil": 4.0}


def _record(parts: dict, gpu: bool = True) -> dict:
    return {"device": {"type": "cuda" if gpu else "cpu"}, "parts": {k: {"status": "ok", "results": r} for k, r in parts.items()}}


def _judged(record_: dict) -> dict:
    return {row["name"]: row for row in targets.judge(record_)}


def test_targets_are_judged_from_the_parts():
    """Each target of docs/results.md ("GPU targets") from the rows the parts write: the perturb_apply rows by
    implementation, batch and raw dtype (the weakest size counts), the slowest weighting strategy,
    the SEP and decoding ratios, the test failures; None off a GPU and where nothing was measured."""
    ops_rows = [
        {"op": "perturb_apply", "impl": "kernels", "raw": "float32", "passes": "forward+backward", "size": "celeba_2048x3x70_crop64", "fraction_of_copy": 0.80},
        {"op": "perturb_apply", "impl": "kernels", "raw": "float32", "passes": "forward+backward", "size": "celeba_8192x3x70_crop64", "fraction_of_copy": 0.70},
        {"op": "perturb_apply", "impl": "kernels", "raw": "float32", "passes": "forward+backward", "size": "celeba_512x3x70_crop64", "fraction_of_copy": 0.10},
        {"op": "perturb_apply", "impl": "kernels", "raw": "float32", "passes": "forward", "size": "celeba_8192x3x70_crop64", "fraction_of_copy": 0.01},
        {"op": "perturb_apply", "impl": "compiled", "raw": "float32", "passes": "forward+backward", "size": "celeba_512x3x70_crop64", "fraction_of_copy": 0.55},
        {"op": "perturb_apply", "impl": "compiled", "raw": "bfloat16", "passes": "forward+backward", "size": "chestxray_128x1x256_crop224", "fraction_of_copy": 0.9},
    ]  # fmt: skip
    bench = {
        "ops": {"rows": ops_rows},
        "victim": {"groups": {
            "victim training resnet18 w1.0 b512 40 tasks cuda": {"fast-graph": {"images_per_second": 160_000.0}, "straightforward": {"images_per_second": 30_000.0}},
            "weighting step resnet18 40 tasks cuda": {"ew": {"images_per_second": 9e5, "step_time_vs_ew": 1.0}, "mgda": {"images_per_second": 1.0, "step_time_vs_ew": 1.4},
                                                      "pcgrad": {"images_per_second": 1.0, "step_time_vs_ew": 1.2}}}},
        "generator": {"groups": {
            "generator training tap w1.0 b512 40 tasks cuda": {"fast-graph": {"images_per_second": 20_000.0}},
            "sep step 15 checkpoints w1.0 b512 cuda": {"shared pass": {"images_per_second": 600.0}, "pass per checkpoint": {"images_per_second": 100.0}}}},
        "data": {"groups": {"cache build celeba 70x70": {"pil": {"images_per_second": 1000.0, "role": "cpu-pipeline"},
                                                         "pil-1thread": {"images_per_second": 200.0, "role": "reference"},
                                                         "torchvision-cuda": {"images_per_second": 2500.0, "role": "gpu"}}}},
    }  # fmt: skip
    paper = {"summary": {"scale": "paper", "full_job_seconds": 300.0, "victim_images_per_second": 140_000.0, "generator_images_per_second": 30_000.0},
             "targets": {"full_job_seconds": {"met": True}, "victim_images_per_second": {"met": False}, "generator_images_per_second": {"met": True}}}  # fmt: skip
    tests = {"counts": {"passed": 10, "failed": 1}, "modules": {"tests/test_sync_free.py": {"passed": 5}}}
    rows = _judged(_record({"bench": bench, "paper-scale": paper, "tests": tests}))
    assert [r["name"] for r in targets.judge(_record({}))] == list(rows)  # every target has a row, measured or not
    expect = {
        "full_job_seconds": (300.0, True), "victim_images_per_second": (140_000.0, False), "generator_images_per_second": (30_000.0, True),
        "victim_bench_images_per_second": (160_000.0, True), "generator_bench_images_per_second": (20_000.0, False),
        "perturb_apply_kernels_float32": (0.70, False), "perturb_apply_kernels_bfloat16": (None, None),
        "perturb_apply_compiled_float32": (0.55, True), "perturb_apply_compiled_bfloat16": (None, None),  # batch 128 < 512
        "weighting_step_vs_ew": (1.4, False), "sep_shared_vs_per_checkpoint": (6.0, True),
        "gpu_decode_vs_cpu_pipeline": (2.5, False), "sync_free_failures": (0.0, True), "cuda_test_failures": (1.0, False),
    }  # fmt: skip
    assert {name: rows[name]["met"] for name in expect} == {name: met for name, (_, met) in expect.items()}
    for name, (value, _) in expect.items():
        assert rows[name]["value"] == (None if value is None else pytest.approx(value)), name
    assert rows["perturb_apply_kernels_float32"]["detail"] == "weakest of 2: celeba_8192x3x70_crop64"
    assert rows["weighting_step_vs_ew"]["detail"].startswith("slowest: mgda")
    assert rows["victim_bench_images_per_second"]["detail"].startswith("fast-graph, victim training")
    assert rows["gpu_decode_vs_cpu_pipeline"]["detail"].startswith("torchvision-cuda / pil")
    # the script's own verdict: None away from the paper's settings, even on a GPU
    paper_changed = {"summary": {**paper["summary"], "scale": "paper"}, "targets": {"full_job_seconds": {"met": None}}, "paper_settings_changed": ["train.width"]}
    row = _judged(_record({"paper-scale": paper_changed}))["full_job_seconds"]
    assert row["value"] == 300.0 and row["met"] is None and "1 paper settings changed" in row["detail"]
    assert all(r["met"] is None for r in targets.judge(_record({"bench": bench, "paper-scale": paper, "tests": tests}, gpu=False)))


def test_the_paper_scale_script_judges_the_tables_thresholds():
    script = _load("paper_scale_script_under_test", REPO / "bench" / "paper_scale.py")
    thresholds = {t.name: t.threshold for t in targets.TARGETS}
    assert {name: thresholds[name] for name in script.TARGETS} == script.TARGETS


def test_merge_rounds_takes_the_median_of_round_medians():
    rounds = [_bench([("v-s", "victim", m, {"images": 100, "variant": "straightforward", "kind": "victim"})]) for m in (1.0, 4.0, 2.0)]
    rounds[1]["benchmarks"].append(_bench([("v-f", "victim", 0.5, {"images": 100, "variant": "fast", "kind": "victim"})])["benchmarks"][0])
    merged = benchmarks.merge_rounds(rounds)
    by_name = {b["name"]: b for b in merged["benchmarks"]}
    assert by_name["v-s"]["stats"]["median"] == 2.0 and by_name["v-s"]["round_medians"] == [1.0, 4.0, 2.0]
    assert "round_medians" not in by_name["v-f"]  # measured once
    rows = throughput.summarize_throughput(merged)["groups"]["victim"]
    assert rows["straightforward"]["round_images_per_second"] == [100.0, 25.0, 50.0]
    assert rows["fast"]["vs_straightforward"] == pytest.approx(4.0)


def test_bench_plan_alternates_rounds_and_puts_compiled_last(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmarks, "dali_available", lambda ctx: False)
    ctx = _ctx(tmp_path)
    runs, notes = benchmarks.plan(ctx, list(benchmarks.BENCHES), 2, [])
    one_round = ["ops", "victim", "generator", "data", "ops-compiled", "victim-compiled", "generator-compiled"]
    assert [(r.round, r.name) for r in runs] == [(i, name) for i in (1, 2) for name in one_round]
    assert runs[1].targets == ["bench/bench_victim.py::test_victim_training[straightforward]", "bench/bench_victim.py::test_victim_training[fast-eager]",
                               "bench/bench_victim.py::test_victim_training[fast-graph]", "bench/bench_victim.py::test_weighting_step"]  # fmt: skip
    assert runs[4].selection == benchmarks.OPS_GPU_COMPILED
    assert runs[6].targets == ["bench/bench_generator.py::test_generator_training[fast]", "bench/bench_generator.py::test_generator_training[fast-compile-graph]"]
    assert notes == ["bench_data.py: DALI not installed, its GPU decoder is not measured"]
    runs, _ = benchmarks.plan(ctx, ["ops", "victim"], 1, ["-k", "graph"])  # the user's -k replaces the selections
    assert [r.name for r in runs] == ["ops", "victim", "victim-compiled"] and all(r.selection is None for r in runs)
    runs, notes = benchmarks.plan(_ctx(tmp_path, "cpu"), list(benchmarks.BENCHES), 1, [])
    assert [r.name for r in runs] == ["ops", "victim", "generator"] and runs[0].selection == benchmarks.OPS_CPU
    assert runs[1].targets == benchmarks.TRAINING_CPU["victim"] and "--cpu" in notes[0]


@pytest.mark.parametrize("bench", ["victim", "generator"])
def test_training_variants_split_covers_the_files_paths(bench):
    """The eager and compiled runs of a training file together select each of its step variants
    once (a variant added to the file must be placed in one of them)."""
    module = _load(f"bench_{bench}_under_test", REPO / "bench" / f"bench_{bench}.py")
    eager, compiled = benchmarks.EAGER_VARIANTS[bench], benchmarks.COMPILED_VARIANTS[bench]
    assert sorted(eager + compiled) == sorted(module.PATHS) and not set(eager) & set(compiled)
    for name in benchmarks.OTHER_BENCHMARKS[bench] + (benchmarks.TRAINING_TEST[bench],):
        assert callable(getattr(module, name))


def test_bench_part_passes_arguments_and_keeps_jsons(tmp_path, monkeypatch):
    """Every run gets the plugin, the device, its JSON path under <out>/bench/round-<i>/ and the
    --bench-args; a run that timed out fails the part but keeps the others' results."""
    monkeypatch.setattr(benchmarks, "measure_copy", lambda device, nbytes: {"buffer_bytes": nbytes, "gb_per_s": 3000.0, "bytes_per_s": 3e12})
    ctx = _ctx(tmp_path, benches=["ops", "victim"], rounds=2, bench_args="-x --benchmark-min-rounds=2")
    calls = []

    def fake_pytest(name, targets, timeout, extra, env=None):
        calls.append((name, extra))
        path = Path(next(a for a in extra if a.startswith("--benchmark-json=")).split("=", 1)[1])
        info = {"images": 10, "variant": "fast", "kind": "victim"} if "victim" in name else {"op": "perturb_apply", "size": "s", "impl": "compiled"}
        path.write_text(json.dumps(_bench([(name.split("-round")[0], "g", 0.5, info)])))  # the same benchmark each round
        return runner.Proc([name], 0 if name != "bench-victim-round2" else -2, name == "bench-victim-round2", 1.0, "log")

    ctx.pytest = fake_pytest
    with pytest.raises(runner.PartFailed) as failed:
        benchmarks.part_bench(ctx, time.monotonic() + 600)
    assert [c[0] for c in calls] == [f"bench-{name}-round{i}" for i in (1, 2) for name in ("ops", "victim", "ops-compiled", "victim-compiled")]
    for name, extra in calls:
        assert extra[:4] == ["-p", "device_check.bench_plugin", "--bench-device", "cuda"] and extra[-2:] == ["-x", "--benchmark-min-rounds=2"]
    assert (tmp_path / "out" / "bench" / "round-2" / "victim.json").is_file()
    assert "bench-victim-round2" not in failed.value.reason and "victim (round 2): pytest timed out" in failed.value.reason
    assert failed.value.results["victim"]["groups"]["g"]["fast"]["round_images_per_second"] == [20.0, 20.0]


# ----------------------------------------------------------------------------- tests part


def test_parse_junit_and_modules():
    xml = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
    <testcase classname="tests.test_perturb_apply" name="test_a[cuda]" time="0.1"/>
    <testcase classname="tests.test_perturb_apply" name="test_b[cuda]" time="0.2"><failure message="assert 1 == 2">trace</failure></testcase>
    <testcase classname="tests.test_loader" name="test_c" time="0"><skipped type="pytest.skip" message="needs a CUDA device"/></testcase>
    <testcase classname="tests.test_sync_free.TestSteps" name="test_d" time="0"><error message="fixture broke"/></testcase>
    </testsuite></testsuites>"""
    parsed = junit.parse_junit(xml)
    assert parsed["counts"] == {"passed": 1, "failed": 1, "skipped": 1, "error": 1}
    assert parsed["tests"]["tests.test_perturb_apply::test_b[cuda]"] == {"status": "failed", "seconds": 0.2, "message": "assert 1 == 2"}
    assert parsed["tests"]["tests.test_loader::test_c"]["message"] == "needs a CUDA device"
    assert junit.by_module(parsed["tests"]) == {
        "tests/test_loader.py": {"skipped": 1}, "tests/test_perturb_apply.py": {"passed": 1, "failed": 1},
        "tests/test_sync_free.py": {"error": 1},
    }  # fmt: skip
    assert junit.module_of("tests/test_x.py::test_y[a]") == "tests/test_x.py"


CRASH_LOG = """FFF......Fatal Python error: Segmentation fault

Thread 0x00007fb9875cf6c0 (most recent call first):
  <no Python frame>

Current thread 0x00007fbc8b276140 (most recent call first):
  File "/opt/venv/lib/python3.12/site-packages/torch/_ops.py", line 1269 in __call__
  File "{repo}/mtlue_fast/ops/__init__.py", line 104 in quantize_export
  File "{repo}/tests/test_quantize_export.py", line 50 in test_delta_beyond_int8_range_is_an_error
  File "/opt/venv/lib/python3.12/site-packages/_pytest/python.py", line 167 in pytest_pyfunc_call
"""
CULPRIT = "tests/test_quantize_export.py::test_delta_beyond_int8_range_is_an_error"


def test_crashed_test_reads_the_faulthandler_dump():
    assert junit.crashed_test(CRASH_LOG.format(repo=REPO)) == CULPRIT
    assert junit.crashed_test("....F.. 1 failed, 6 passed") is None
    assert junit.crashed_test("Fatal Python error: Aborted\n  File \"/x/conftest.py\", line 3 in setup\n") is None


def test_tests_part_reruns_without_the_test_that_crashed(tmp_path):
    """A crash (negative exit status, no JUnit XML) is followed by a rerun that deselects the
    crashing test; the crash is recorded as a failure, the rerun's outcomes are kept per test and
    its JUnit XML is copied under <out>/tests/."""
    calls = []
    ctx = _ctx(tmp_path)

    def fake_pytest(name, targets, timeout, extra, env=None):
        calls.append(extra)
        log = tmp_path / f"{name}.log"
        xml = Path(extra[0].split("=", 1)[1])
        if len(calls) == 1:
            log.write_text(CRASH_LOG.format(repo=REPO))
            return runner.Proc([name], -11, False, 1.0, str(log))
        xml.write_text('<testsuite><testcase classname="tests.test_sync_free" name="test_ok[cuda]" time="0.1"/></testsuite>')
        log.write_text("1 passed")
        return runner.Proc([name], 0, False, 1.0, str(log))

    ctx.pytest = fake_pytest
    tests, procs, problems = cuda_tests.run_tests_surviving_crashes(ctx, "tests", ["tests"], time.monotonic() + 60)
    assert len(calls) == 2 and f"--deselect={CULPRIT}" in calls[1] and not any("--deselect" in a for a in calls[0])
    assert tests[CULPRIT]["status"] == "failed" and "signal 11" in tests[CULPRIT]["message"]
    assert tests["tests.test_sync_free::test_ok[cuda]"] == {"status": "passed", "seconds": 0.1}
    assert problems == [] and len(procs) == 2
    assert (tmp_path / "out" / "tests" / "tests-rerun1.xml").is_file()


def test_tests_part_stops_rerunning_a_crash_it_cannot_place(tmp_path):
    ctx = _ctx(tmp_path)
    calls = []

    def crashing(name, targets, timeout, extra, env=None):
        calls.append(name)
        log = tmp_path / f"{name}.log"
        log.write_text("Fatal Python error: Segmentation fault\n  <no Python frame>\n")
        return runner.Proc([name], -11, False, 1.0, str(log))

    ctx.pytest = crashing
    tests, procs, problems = cuda_tests.run_tests_surviving_crashes(ctx, "tests", ["tests"], time.monotonic() + 60)
    assert calls == ["tests"] and tests == {} and problems == ["tests: pytest crashed (signal 11)"]


def test_tests_part_runs_on_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(cuda_tests, "dali_available", lambda ctx: False)
    ctx = _ctx(tmp_path)
    runs = cuda_tests.planned_runs(ctx)
    assert [(n, t) for n, t, _ in runs] == [("tests", cuda_tests.TESTS_GPU), ("tests-compile", cuda_tests.TESTS_GPU_COMPILE)]
    assert "-m" in cuda_tests.TESTS_GPU and "cuda" in cuda_tests.TESTS_GPU  # picks up tests/test_sync_free.py's CUDA tests
    assert ctx.notes == ["tests/test_dali.py not run: DALI not installed"]


# ----------------------------------------------------------------------------- build, paper scale, pipeline


def test_backends_complete_and_slug():
    info = {"ops": {"perturb_apply": {"cpu": "compiled CPU", "cuda": "reference"},
                    "quantize_export": {"cpu": "compiled CPU", "cuda": "compiled CUDA"}}}  # fmt: skip
    assert build.backends_complete(info, "cpu") and not build.backends_complete(info, "cuda")
    assert not build.backends_complete(None, "cpu") and not build.backends_complete({"ops": {}}, "cpu")
    assert record.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_build_part_installs_for_the_gpu_capability(tmp_path, monkeypatch):
    ran = []
    complete = {"ops": {"perturb_apply": {"cpu": "compiled CPU", "cuda": "compiled CUDA"}}, "library": {"source": "built"}}

    def fake_run(command, timeout, log, env=None):
        ran.append((command, env))
        if "-c" in command:
            Path(log).parent.mkdir(parents=True, exist_ok=True)
            Path(log).write_text(build.MARK + json.dumps(complete) + "\n")
        return runner.Proc(command, 0, False, 1.0, str(log))

    monkeypatch.setattr(build, "run_logged", fake_run)
    results = build.part_build(_ctx(tmp_path), time.monotonic() + 600)
    command, env = ran[0]
    assert command[1:] == ["-m", "pip", "install", "--no-build-isolation", "--no-deps", "-v", "-e", "."]
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0" and results["built"] and results["ops"] == complete["ops"]
    ran.clear()
    results = build.part_build(_ctx(tmp_path, no_build=True), time.monotonic() + 600)
    assert len(ran) == 1 and "-c" in ran[0][0] and ran[0][1]["MTLUE_NO_JIT"] == "1" and not results["built"]


def test_paper_scale_command_and_skip(tmp_path, monkeypatch):
    out = tmp_path / "paper_scale.json"
    assert paper_scale.command(_ctx(tmp_path), out)[1:] == ["bench/paper_scale.py", "--out", str(out), "--device", "cuda"]
    assert paper_scale.command(_ctx(tmp_path, "cpu"), out)[-3:] == ["--cpu", "--steps", str(paper_scale.CPU_STEPS)]
    assert paper_scale.command(_ctx(tmp_path, paper_scale_steps=50), out)[-2:] == ["--steps", "50"]
    monkeypatch.setattr(paper_scale, "SCRIPT", tmp_path / "absent.py")
    with pytest.raises(runner.PartSkipped):
        paper_scale.part_paper_scale(_ctx(tmp_path), time.monotonic() + 60)


def test_failed_build_stops_the_later_children_compiling(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "run_logged", lambda command, timeout, log, env=None: runner.Proc(command, 1, False, 1.0, str(log)))
    ctx = _ctx(tmp_path)
    assert "MTLUE_NO_JIT" not in ctx.env()
    with pytest.raises(runner.PartFailed, match="build"):
        build.part_build(ctx, time.monotonic() + 600)
    assert ctx.env()["MTLUE_NO_JIT"] == "1"


def test_paper_scale_part_keeps_the_stages_of_a_stopped_run(tmp_path, monkeypatch):
    """A script that wrote its JSON after two stages and then failed: the part fails, with the stages' rates and graphs."""
    script = tmp_path / "stopped_paper_scale.py"
    script.write_text("import json, sys\nout = sys.argv[sys.argv.index('--out') + 1]\n"
                      "json.dump({'complete': False, 'full_job_seconds': None, 'stages': {'surrogate': {'images_per_second': 9.0, "
                      "'cuda_graph': 'replayed 3 times'}, 'cache_build': {'images_per_second': 4.0}}}, open(out, 'w'))\n"
                      "sys.exit(1)\n")  # fmt: skip
    monkeypatch.setattr(paper_scale, "SCRIPT", script)
    with pytest.raises(runner.PartFailed) as failed:
        paper_scale.part_paper_scale(_ctx(tmp_path, "cpu"), time.monotonic() + 60)
    results = failed.value.results
    assert results["summary"] == {"complete": False}
    assert results["stage_images_per_second"] == {"surrogate": 9.0, "cache_build": 4.0}
    assert results["stage_cuda_graph"] == {"surrogate": "replayed 3 times"}
    lines = summary.paper_scale_lines(results)
    assert "- images/s per stage: surrogate 9, cache_build 4" in lines and "- CUDA graph per stage: surrogate replayed 3 times" in lines


def test_paper_scale_part_runs_the_script(tmp_path, monkeypatch):
    script = tmp_path / "fake_paper_scale.py"
    script.write_text("import json, sys\nout = sys.argv[sys.argv.index('--out') + 1]\n"
                      "json.dump({'images_per_second': 12.5, 'steps': int(sys.argv[-1]), 'rows': [1]}, open(out, 'w'))\n")  # fmt: skip
    monkeypatch.setattr(paper_scale, "SCRIPT", script)
    ctx = _ctx(tmp_path, "cpu")
    results = paper_scale.part_paper_scale(ctx, time.monotonic() + 60)
    assert results["summary"] == {"images_per_second": 12.5, "steps": 1}
    assert json.loads((tmp_path / "out" / "paper_scale.json").read_text())["steps"] == 1


def test_pipeline_commands(tmp_path):
    cmd, sets = pipeline.command(_ctx(tmp_path), "chestxray", tmp_path / "r", ["train.epochs=2"])
    assert cmd[3:8] == ["--dataset", "chestxray", "--victim-seeds", "3", "--device"] and sets == ["train.epochs=2"]
    cmd, sets = pipeline.command(_ctx(tmp_path, "cpu"), "chestxray", tmp_path / "r", [])
    assert "--victim-seeds" not in cmd and cmd[cmd.index("--preset") + 1] == "smoke" and sets == pipeline.CPU_SETTINGS
    cmd, sets = pipeline.command(_ctx(tmp_path), "celeba", tmp_path / "r", [])
    assert sets == ["train.width=1.0", "generate.width=1.0", "victims.width=1.0", "victims.epochs=20"] and "--preset" not in cmd


@pytest.mark.parametrize("dataset", list(pipeline.RUNS))
@pytest.mark.parametrize("gpu", [True, False], ids=["gpu", "cpu"])
def test_pipeline_settings_are_valid_config(gpu, dataset):
    """The --set overrides name real config keys (a renamed key would only show on the GPU)."""
    from mtlue_fast import config

    settings = pipeline.RUNS[dataset][2] if gpu else pipeline.CPU_SETTINGS
    cfg = config.resolve(dataset, synthetic=True, preset="default" if gpu else "smoke", assignments=settings)
    if dataset == "celeba":
        assert cfg.train.width == (1.0 if gpu else 0.25)


# ----------------------------------------------------------------------------- children past their time limit


def test_a_child_past_its_limit_gets_sigint_and_the_log_keeps_its_output(tmp_path):
    child = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    start = time.monotonic()
    proc = runner.run_logged(child, timeout=1.0, log=tmp_path / "child.log")
    assert proc.timed_out and proc.why() == "timed out"
    assert proc.rc != 0 and time.monotonic() - start < runner.GRACE
    assert "started" in proc.tail


def test_a_child_ignoring_sigint_is_killed_after_the_grace(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "GRACE", 0.5)
    child = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
             "print('ignoring', flush=True); time.sleep(60)"]  # fmt: skip
    start = time.monotonic()
    proc = runner.run_logged(child, timeout=1.0, log=tmp_path / "child.log")
    assert proc.timed_out and proc.rc == -9
    assert time.monotonic() - start < 10


def test_a_child_that_survives_sigkill_is_given_up(monkeypatch):
    """A process stuck in the driver (uninterruptible sleep) outlives SIGKILL; the check goes on."""
    sent = []
    monkeypatch.setattr(runner.os, "killpg", lambda pid, sig: sent.append(sig))
    monkeypatch.setattr(runner, "GRACE", 0.01)
    monkeypatch.setattr(runner, "KILL_WAIT", 0.01)

    class Stuck:
        pid = 12345

        def wait(self, timeout=None):
            raise subprocess.TimeoutExpired("stuck", timeout)

    assert runner._stop(Stuck()) == -9
    assert sent == [runner.signal.SIGINT, runner.signal.SIGKILL]


# ----------------------------------------------------------------------------- options, record, summary


def test_size_plugin_wraps_sizes(monkeypatch):
    module = type(sys)("bench_fake_sizes")
    module.sizes = lambda device: {"width": 1.0, "batch_size": 512, "steps": 20}
    monkeypatch.setitem(sys.modules, "bench_fake_sizes", module)
    monkeypatch.setenv(bench_plugin.SIZES_ENV, json.dumps({"bench_fake_sizes": {"batch_size": 8}}))
    bench_plugin.pytest_collection_finish(None)
    assert module.sizes("cpu") == {"width": 1.0, "batch_size": 8, "steps": 20}


def test_cli_options(capsys):
    args = cli.parser().parse_args(["--out", "x", "--parts", "tests, bench", "--budget-bench", "90", "--rounds", "3", "--bench-args", "-k graph"])
    assert args.parts == ["tests", "bench"] and args.rounds == 3 and args.bench_args == "-k graph"
    assert args.within is None and args.archive is None
    assert cli.budgets(args) == {**cli.GPU_BUDGETS, "bench": 90.0}
    args = cli.parser().parse_args(["--out", "x", "--within", "540", "--archive", "a.tar.gz"])
    assert args.within == 540.0 and args.archive == Path("a.tar.gz")
    assert cli.budgets(cli.parser().parse_args(["--out", "x", "--cpu"])) == cli.CPU_BUDGETS
    for bad in (["--out", "x", "--parts", "a,z"], ["--out", "x", "--budget-tests", "-1"], ["--parts", "tests"],
                ["--out", "x", "--benches", "ops,nope"], ["--out", "x", "--pipeline-runs", "mnist"]):  # fmt: skip
        with pytest.raises(SystemExit):
            cli.parser().parse_args(bad)
    assert "--parts takes a comma-separated subset of build,tests" in capsys.readouterr().err


def test_parts_run_in_the_order_given_build_first():
    assert cli.part_order(["paper-scale", "tests", "build", "tests"]) == ["build", "paper-scale", "tests"]
    assert cli.part_order(["bench"]) == ["bench"]


def test_within_splits_the_time_left_by_weight(monkeypatch):
    monkeypatch.setattr(cli.time, "monotonic", lambda: 100.0)
    deadline = 100.0 + cli.WITHIN_RESERVE + 95.0  # 95 s to share
    w = cli.WITHIN_WEIGHTS
    assert cli.part_budget(3600, "tests", ["bench"], deadline) == pytest.approx(95 * w["tests"] / (w["tests"] + w["bench"]))
    assert cli.part_budget(10, "tests", ["bench"], deadline) == 10  # at most the part's own budget
    assert cli.part_budget(3600, "bench", [], deadline) == pytest.approx(95)  # the last part gets what is left
    assert cli.part_budget(50, "bench", [], None) == 50  # no --within
    assert cli.part_budget(3600, "bench", [], 100.0) == 0


def test_archive_holds_the_results_folder(tmp_path):
    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "summary.json").write_text("{}")
    (out / "logs" / "a.log").write_text("x")
    archive = out / "check.tar.gz"
    cli.write_archive(out, archive)
    cli.write_archive(out, archive)  # rewritten in place, never holding itself
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["out", "out/logs", "out/logs/a.log", "out/summary.json"]
        assert tar.extractfile("out/logs/a.log").read() == b"x"
    assert not archive.with_name(archive.name + ".tmp").exists()


def test_within_runs_the_parts_in_order_and_skips_what_has_no_time(tmp_path, monkeypatch, capsys):
    """--within: the parts in --parts order (build first), each with its share of the time left;
    a part whose share would be under WITHIN_MIN_PART is skipped and said so; the archive and the
    printed summary (parts and targets) come out either way."""
    calls = []

    def fake(name):
        def part(ctx, deadline):
            calls.append((name, deadline - time.monotonic()))
            return {}

        return part

    for name in PARTS:
        monkeypatch.setitem(cli.PART_FUNCTIONS, name, fake(name))
    out, archive = tmp_path / "out", tmp_path / "check.tar.gz"
    argv = ["--out", str(out), "--cpu", "--within", "200", "--parts", "paper-scale,bench,build", "--archive", str(archive)]
    assert cli.main(argv) == 0
    assert [c[0] for c in calls] == ["build", "paper-scale", "bench"]
    w = cli.WITHIN_WEIGHTS
    assert calls[0][1] == pytest.approx(min(cli.CPU_BUDGETS["build"], 190 * w["build"] / (w["build"] + w["paper-scale"] + w["bench"])), abs=2)
    rec = json.loads((out / "summary.json").read_text())
    assert rec["within_s"] == 200 and rec["parts"]["tests"]["reason"] == "not in --parts"
    with tarfile.open(archive) as tar:
        assert "out/summary.json" in tar.getnames() and "out/summary.md" in tar.getnames()
    printed = capsys.readouterr().out
    assert "| paper-scale | ok |" in printed and "## Targets" in printed
    calls.clear()
    assert cli.main(["--out", str(out), "--cpu", "--within", "20", "--parts", "tests,bench"]) == 0
    rec = json.loads((out / "summary.json").read_text())
    assert calls == [] and rec["parts"]["tests"]["status"] == "skipped" and rec["parts"]["tests"]["reason"].startswith("--within:")


def test_a_summary_that_cannot_be_rendered_keeps_the_results_and_the_archive(tmp_path, monkeypatch):
    for name in PARTS:
        monkeypatch.setitem(cli.PART_FUNCTIONS, name, lambda ctx, deadline: {})

    def broken(record):
        raise KeyError("a bug in the rendering")

    monkeypatch.setattr(cli, "markdown", broken)
    out, archive = tmp_path / "out", tmp_path / "check.tar.gz"
    assert cli.main(["--out", str(out), "--cpu", "--parts", "build", "--archive", str(archive)]) == 0
    assert json.loads((out / "summary.json").read_text())["parts"]["build"]["status"] == "ok"
    assert "summary not rendered" in (out / "summary.md").read_text() and "a bug in the rendering" in (out / "summary.md").read_text()
    with tarfile.open(archive) as tar:
        assert "out/summary.json" in tar.getnames()


def test_run_part_records_failures_and_skips(tmp_path, monkeypatch):
    def broken(ctx, deadline):
        raise KeyError("oops")

    def failing(ctx, deadline):
        raise runner.PartFailed("2 test(s) failed", {"counts": {"failed": 2}})

    monkeypatch.setitem(cli.PART_FUNCTIONS, "tests", failing)
    monkeypatch.setitem(cli.PART_FUNCTIONS, "bench", broken)
    ctx = _ctx(tmp_path)
    entry = cli.run_part(ctx, "tests", 30)
    assert entry["status"] == "failed" and entry["results"] == {"counts": {"failed": 2}} and entry["budget_s"] == 30
    entry = cli.run_part(ctx, "bench", 30)
    assert entry["status"] == "failed" and entry["reason"].startswith("KeyError") and "traceback" in entry


def test_markdown_of_a_run():
    record_ = {"date": "2026-01-01", "command": "python bench/gpu_check.py --out x", "seconds": 1.0, "exit_status": 1,
               "device": {"type": "cuda", "name": "GPU X", "capability": "9.0", "memory_gib": 80.0, "gpus": 1, "cpu": "C", "cores": 2},
               "versions": {"torch": "2", "cuda": "13.0", "cudnn": 9, "driver": "580", "python": "3", "mtlue_fast": "0.1.0"},
               "git": {"commit": "abc", "dirty": True},
               "parts": {k: {"status": "skipped", "reason": "not in --parts"} for k in PARTS}}  # fmt: skip
    record_["parts"]["tests"] = {"status": "failed", "reason": "1 test(s) failed", "seconds": 3.0,
                                 "results": {"counts": {"passed": 1, "failed": 1}, "failed": {"t::x": "boom"},
                                             "modules": {"tests/test_sync_free.py": {"passed": 1, "failed": 1}}}}  # fmt: skip
    text = summary.markdown(record_)
    assert "| pipeline | skipped |" in text and "driver 580" in text and "commit abc with uncommitted changes" in text
    assert "| tests/test_sync_free.py | 1 | 1 | 0 | 0 |" in text and "- FAILED t::x: boom" in text
    assert "| per-step paths under set_sync_debug_mode('error'): failed tests | 1 tests | <= 0 tests | NOT met |" in text
    assert "| the paper's CelebA job, one GPU | - | <= 360 s (6.0 min) | not measured |" in text


def test_a_given_commit_is_recorded_beside_the_checkouts(monkeypatch):
    """--commit names the tree that ran where the folder's .git is missing or stale (a copy of a
    checkout); the folder's own HEAD stays in the record and the summary says both."""
    monkeypatch.setattr(record, "REPO", Path("/"))  # not a git checkout
    assert record.git_revision() == {"commit": None, "dirty": None, "checkout_commit": None}
    assert record.git_revision("f00d")["commit"] == "f00d"
    git = {"commit": "f00d", "dirty": None, "checkout_commit": "beef"}
    rec = {"date": "2026-01-01", "command": "c", "seconds": 1.0, "exit_status": 0,
           "device": {"type": "cpu", "name": "C", "cpu": "C", "cores": 2}, "versions": {}, "git": git,
           "parts": {k: {"status": "skipped"} for k in PARTS}}  # fmt: skip
    assert "- commit f00d (given; the folder's .git names beef)" in summary.header(rec)


def test_machine_record_without_an_installed_package(tmp_path):
    """Before the build part the package may not be installed: the device record must not need it.
    A package that fails to import stands in for the missing one."""
    fake = tmp_path / "mtlue_fast"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('mtlue_fast is not installed here')\n")
    code = (f"import sys; sys.path[:0] = [{str(REPO / 'bench')!r}, {str(tmp_path)!r}]; from device_check import record; "
            "print(record.device_record('cpu')['cpu']); print(record.versions('cpu')['mtlue_fast'])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cpu, version = proc.stdout.split("\n")[:2]
    assert cpu.strip() and version == record.package_version()


def test_cpu_run_end_to_end(tmp_path):
    """The whole script with --cpu at tiny sizes (under a minute on 2 cores; --no-build keeps the
    installed package): every part reports a status and writes its JSON, the summary names the
    versions, and the tests passed (exit status 0)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--no-build", "--out", str(out), "--budget-paper-scale", "120"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((out / "summary.json").read_text())
    assert set(rec["parts"]) == set(PARTS)
    for key, part in rec["parts"].items():
        assert part["status"] in ("ok", "skipped"), (key, part)
    assert rec["parts"]["tests"]["results"]["counts"]["passed"] > 0
    tests = json.loads((out / "tests.json").read_text())["results"]["tests"]
    assert tests and all(t["status"] in junit.STATUSES for t in tests.values())
    for name in ("build.json", "bench.json", "pipeline.json", "summary.md", "pipeline/celeba/report.json", "bench/ops.json"):
        assert (out / name).is_file(), name
    assert rec["versions"]["torch"] and rec["versions"]["python"] and "commit" in rec["git"] and rec["date"]
