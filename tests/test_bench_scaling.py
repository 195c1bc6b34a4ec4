"""bench/scaling.py end to end at one timed step: the three measurements of each kind (one process,
two in a process group, two independent ones: the control) and the JSON keys the README quotes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_scaling_script_reports_speedup_and_control(tmp_path):
    out = tmp_path / "scaling.json"
    command = [sys.executable, str(REPO / "bench" / "scaling.py"), "--processes", "2", "--threads", "1",
               "--steps", "1", "--repeats", "1", "--kinds", "victim,victim_local_bn", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["processes"] == 2 and record["threads_per_process"] == 1 and record["cpu_model"]
    for kind in ("victim", "victim_local_bn"):
        row = record["results"][kind]
        rates = [row["images_per_second_1"], row["images_per_second_2"], row["images_per_second_independent"]]
        assert all(rate > 0 for rate in rates), row
        # The derived figures are the ratios of the measured rates (what the README quotes).
        assert abs(row["speedup"] - rates[1] / rates[0]) < 1e-9 * row["speedup"]
        assert abs(row["independent_speedup"] - rates[2] / rates[0]) < 1e-9 * row["independent_speedup"]
        assert abs(row["of_independent"] - rates[1] / rates[2]) < 1e-9 * row["of_independent"]
        assert [len(row["rounds"][key]) for key in ("1", "2", "independent")] == [1, 1, 1]
        # Waiting for the slower of two processes once per step keeps at most all of the control.
        assert 0.0 < row["control_lockstep_fraction"] <= 1.0


def test_lockstep_fraction_is_mean_over_max_of_paired_steps():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_scaling", REPO / "bench" / "scaling.py")
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    # Steps paired by index: means 1.5 + 1.5 + 1.0 = 4.0 against maxima 2 + 2 + 1 = 5.
    assert abs(scaling.lockstep_fraction([[1.0, 2.0, 1.0], [2.0, 1.0, 1.0]]) - 0.8) < 1e-12
    assert scaling.lockstep_fraction([[1.0, 1.0], [1.0, 1.0]]) == 1.0  # no jitter, nothing lost
    assert scaling.lockstep_fraction([[1.0]]) is None  # one process: nothing to wait for


def test_scaling_breakdown_reports_the_parts_of_a_step(tmp_path):
    out = tmp_path / "breakdown.json"
    command = [sys.executable, str(REPO / "bench" / "scaling_breakdown.py"), "--kind", "victim_local_bn",
               "--rounds", "2", "--steps", "1", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["cpu_model"] and len(record["rows"]) == 2
    for rank, parts in record["summary"].items():
        for phase in ("job", "control"):
            assert all(parts[phase][field] > 0 for field in ("wall_ms", "main_cpu_ms", "process_cpu_ms")), (rank, phase)
        rows = record["rows"][int(rank)]
        jobs = [r for r in rows if r["phase"] == "job"]
        controls = [r for r in rows if r["phase"] == "control"]
        assert len(jobs) == len(controls) == 2
        # of_control is the control's wall time over the job's, round by round.
        expected = [c["wall_ms"] / j["wall_ms"] for j, c in zip(jobs, controls)]
        assert parts["of_control"] == expected
