"""Where a two-process CPU step's time goes, against the same processes training alone.

    python bench/scaling_breakdown.py --kind victim_local_bn --out bench/results/<name>.json

Two gloo processes (one thread each) alternate two phases, ``--rounds`` times: ``--steps`` steps of
the data-parallel job (DDP, per-process batch 64 of a global 128, as ``bench/scaling.py``), then as
many steps of the control (each process trains a model of its own on 64 images, no communication,
side by side). Alternating inside the same processes lets the VM's minute-to-minute swings hit both
phases alike, which separate runs of ``bench/scaling.py`` cannot. Per phase and process, per step:

- ``wall_ms``: the step's wall time;
- ``main_cpu_ms``: CPU time of the training thread (``time.thread_time``): the kernels and DDP's
  own work;
- ``process_cpu_ms``: CPU time of the whole process (``time.process_time``), so
  ``process_cpu_ms - main_cpu_ms`` is what gloo's threads used;
- ``wall_ms - process_cpu_ms``: time the process was not running at all (waiting for the other
  process's all-reduce, or descheduled).

``of_control`` (per round: control wall / job wall) is what ``bench/scaling.py`` calls
``of_independent``. ``--kind victim`` uses synchronised batch norms (``train.sync_bn=true``, their
statistics over gloo), ``victim_local_bn`` ``train.sync_bn=false`` (the CPU default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scaling  # noqa: E402 - bench/scaling.py: the victim setups and the free-port helper

FIELDS = ("wall_ms", "main_cpu_ms", "process_cpu_ms")


def _worker(rank: int, world: int, port: int, kind: str, rounds: int, steps: int, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    from mtlue_fast import dist

    dist.setup("cpu")
    try:
        job = scaling._victim("cpu", world, 1, sync_bn=kind == "victim")
        joined = dist.info

        def alone(fn):  # the control: this process as if it were the only one (no DDP, no collectives)
            dist.info = lambda: dist.DistInfo()
            try:
                return fn()
            finally:
                dist.info = joined

        control = alone(lambda: scaling._victim("cpu", 1, world, sync_bn=False))
        phases = (("job", job), ("control", lambda: alone(control)))
        for _ in range(2):  # warm-up: allocator, oneDNN primitives, DDP's bucket rebuild
            for _, step in phases:
                step()
        rows = []
        for index in range(rounds):
            for name, step in phases:
                dist.barrier()
                wall, main, process = time.perf_counter(), time.thread_time(), time.process_time()
                for _ in range(steps):
                    step()
                rows.append({"round": index, "phase": name, "wall_ms": 1e3 * (time.perf_counter() - wall) / steps,
                             "main_cpu_ms": 1e3 * (time.thread_time() - main) / steps,
                             "process_cpu_ms": 1e3 * (time.process_time() - process) / steps})  # fmt: skip
        Path(f"{result}.{rank}").write_text(json.dumps(rows))
    finally:
        dist.teardown()


def summarise(rows: list[dict]) -> dict:
    """Medians over rounds per phase, the parts of a step, and ``of_control`` per round."""
    out: dict = {}
    for phase in ("job", "control"):
        picked = [r for r in rows if r["phase"] == phase]
        medians = {field: statistics.median(r[field] for r in picked) for field in FIELDS}
        medians["gloo_threads_cpu_ms"] = statistics.median(r["process_cpu_ms"] - r["main_cpu_ms"] for r in picked)
        medians["not_running_ms"] = statistics.median(r["wall_ms"] - r["process_cpu_ms"] for r in picked)
        out[phase] = medians
    jobs = [r for r in rows if r["phase"] == "job"]
    controls = [r for r in rows if r["phase"] == "control"]
    out["of_control"] = [c["wall_ms"] / j["wall_ms"] for j, c in zip(jobs, controls)]
    out["of_control_median"] = statistics.median(out["of_control"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("victim", "victim_local_bn"), default="victim_local_bn")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=15, help="steps per phase and round")
    parser.add_argument("--out")
    args = parser.parse_args()
    from mtlue_fast.info import collect
    from mtlue_fast.machine import cpu_model

    with tempfile.TemporaryDirectory() as tmp:
        result = str(Path(tmp) / "rows")
        mp.spawn(_worker, args=(2, scaling._port(), args.kind, args.rounds, args.steps, result), nprocs=2, join=True)
        ranks = [json.loads(Path(f"{result}.{rank}").read_text()) for rank in range(2)]
    summary = {rank: summarise(rows) for rank, rows in enumerate(ranks)}
    for rank, parts in summary.items():
        job, control = parts["job"], parts["control"]
        print(f"{args.kind} rank {rank}: job {job['wall_ms']:.1f} ms/step (training thread {job['main_cpu_ms']:.1f}, gloo threads "
              f"{job['gloo_threads_cpu_ms']:.1f}, not running {job['not_running_ms']:.1f}) against control {control['wall_ms']:.1f} "
              f"(training thread {control['main_cpu_ms']:.1f}); of control per round {[round(v, 3) for v in parts['of_control']]}",
              flush=True)  # fmt: skip
    record = {"kind": args.kind, "rounds": args.rounds, "steps": args.steps, "cpu_model": cpu_model(), "cores": os.cpu_count(),
              "summary": summary, "rows": ranks, "versions": collect(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "command": " ".join(sys.argv)}  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
