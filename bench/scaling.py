"""Scaling of victim and generator training from 1 to N processes (torch.distributed, gloo on CPU).

    python bench/scaling.py --processes 2 --threads 1 --out bench/results/<name>.json

Each configuration trains a few steps in every process and times them inside the processes, after
warm-up steps (process start-up, imports and DDP's first-iteration bucket rebuild are not counted,
which a pytest-benchmark round around ``torch.multiprocessing.spawn`` would include; that is why
this one is a script). Every process runs ``--threads`` threads (default: the cores divided by the
process count), the single process too, so the comparison is at equal threads per process and a
perfect result is a speed-up of N: the single process gets the same thread count as each of the N,
not all the cores. Reported: images/s of the global batch for 1 and N processes, the speed-up
``rate_N / rate_1`` and the efficiency ``speed-up / N``; and the control: N processes training side
by side without a process group, each on 1/N of the batch (``images_per_second_independent``, the
most N processes do on this machine whatever the communication), with the fraction of it a job
would keep that only waited for the slower process once per step (``control_lockstep_fraction``,
from the control's own step times: the cost of the steps' jitter alone).

The machine may be shared: the 1- and N-process runs alternate for ``--repeats`` rounds and the
median round of each is reported (all rounds are kept in the JSON), with the load average before and
after and, per run, the CPUs that other processes used meanwhile (``other_processes_cpus``): with
N processes on N cores, one more busy process shares a core with a rank, and every rank then waits
for that one at each synchronised batch norm. On a multi-GPU machine run the same script with ``--device cuda`` (one process per GPU, NCCL).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

from mtlue_fast.machine import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

STEPS = {"victim": 20, "victim_local_bn": 20, "generator": 6}  # timed steps per process (default): ~2-4 s on 2 CPU cores
WARMUP = 2  # untimed steps: allocator, oneDNN primitive caches, DDP's bucket rebuild after step 1


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, kind: str, device: str, threads: int, steps: int, result: str, pin: bool = False,
            start_together=None) -> None:
    """One process of a measurement. ``start_together`` (a barrier) marks the control: the N
    processes do not form a process group; each trains alone on its 1/N share of the global batch."""
    if pin:  # rank r on cores r*threads .. (r+1)*threads-1
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[(rank * threads + t) % len(cores)] for t in range(threads)})
    share = world if start_together is not None else 1
    group = 1 if start_together is not None else world
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank if group > 1 else 0), WORLD_SIZE=str(group),
                      LOCAL_RANK=str(rank if group > 1 else 0), LOCAL_WORLD_SIZE=str(group), OMP_NUM_THREADS=str(threads))  # fmt: skip
    torch.set_num_threads(threads)
    from mtlue_fast import dist

    dist.setup(device)
    try:
        if kind == "generator":
            run_once = _generator(device, group, share)
        else:  # victim_local_bn: train.sync_bn=false, batch-norm statistics of each process's share
            run_once = _victim(device, group, share, sync_bn=kind == "victim")
        for _ in range(WARMUP):
            run_once()
        dist.barrier()
        if start_together is not None:
            start_together.wait()
        start = time.perf_counter()
        step_seconds = []
        for _ in range(steps):
            began = time.perf_counter()
            images = run_once()
            step_seconds.append(time.perf_counter() - began)
        dist.barrier()
        elapsed = time.perf_counter() - start
        if rank == 0 or start_together is not None:
            Path(f"{result}.{rank}").write_text(json.dumps({"images_per_second": steps * images / elapsed,
                                                            "step_seconds": step_seconds}))
    finally:
        dist.teardown()


def _celeba_like(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 3, 70, 70), dtype=np.uint8), (rng.random((n, 40)) < 0.3).astype(np.int64)


def _victim(device: str, world: int, share: int = 1, sync_bn: bool = True):
    from bench_victim import ArrayCache

    from mtlue_fast.train import TrainConfig, build_training, make_batches, select_tasks

    batch = 128 // share  # share > 1: the control's part of the global batch
    images, labels = _celeba_like(batch * 4)
    cache = ArrayCache(images, labels, [f"a{k}" for k in range(40)], [2] * 40, {"dataset": "celeba", "source_digest": "s"})
    config = TrainConfig(width=0.25, batch_size=batch, progress=False, sync_bn=sync_bn)
    view = select_tasks(cache, crop=(64, 64))
    training = build_training(view, config, device)
    batches = make_batches(view, config, device, train=True)
    iterator = iter(batches)

    def once() -> int:
        nonlocal iterator
        try:
            x, y = next(iterator)
        except StopIteration:
            iterator = iter(batches)
            x, y = next(iterator)
        training.step(x, y)
        return batch

    return once


def _generator(device: str, world: int, share: int = 1):
    from mtlue_fast import dist
    from mtlue_fast.models import build_model
    from mtlue_fast.models.generator import MTLGenerator
    from mtlue_fast.ue.generate import GeneratorStep, make_generator_optimizer
    from mtlue_fast.ue.settings import GenerateConfig
    from mtlue_fast.ue.objectives import Objective

    batch = 32 // share
    images, labels = _celeba_like(batch)
    per_rank = batch // world
    rank = dist.info().rank
    x = torch.from_numpy(images[rank::world][:per_rank]).to(device)
    y = torch.from_numpy(labels[rank::world][:per_rank]).to(device)
    torch.manual_seed(0)
    surrogate = build_model([2] * 40, backbone="resnet18", in_channels=3, crop=(64, 64), width=0.25).to(device).eval()
    surrogate.requires_grad_(False)
    generator = dist.convert_sync_batchnorm(MTLGenerator([2] * 40, in_channels=3, image_size=70, width=0.25), device).to(device)
    config = GenerateConfig(base="tap", width=0.25, batch_size=batch, progress=False)
    step = GeneratorStep(generator, Objective("tap", [2] * 40), [surrogate], make_generator_optimizer(generator, config), config, (64, 64), amp=False)

    def once() -> int:
        step(x, y)
        return batch

    return once


def lockstep_fraction(step_seconds: list[list[float]]) -> float | None:
    """What fraction of the control's rate the same processes would keep if they waited for each
    other once per step: ``sum_i mean_r t[r][i] / sum_i max_r t[r][i]`` over the steps ``i`` of the
    independent processes ``r`` (paired by index). Below 1 by the steps' jitter alone: a synchronised
    job cannot do better than this whatever its transport, and does worse with more synchronisation
    points per step (each synchronised batch norm waits for the slower rank too)."""
    if len(step_seconds) < 2 or not all(step_seconds):
        return None
    steps = min(len(times) for times in step_seconds)
    per_step = [[times[i] for times in step_seconds] for i in range(steps)]
    return sum(statistics.fmean(ts) for ts in per_step) / sum(max(ts) for ts in per_step)


def measure(kind: str, world: int, device: str, threads: int, steps: int, pin: bool = False,
            independent: bool = False) -> tuple[float, float | None, float | None]:
    """``(images/s, CPUs used by other processes meanwhile, lockstep fraction)``: the second is the
    machine's busy time during the run less this run's processes' own CPU time, per second (None
    where /proc/stat is missing); above ~0.2 on a 2-core machine the N-process figure is not a clean
    measurement. ``independent``: the control, ``world`` processes that train side by side without
    communicating, each on its 1/world share of the batch; images/s summed over them; the third
    value is :func:`lockstep_fraction` of their step times (None otherwise)."""
    result = Path(f"/tmp/mtlue-scaling-{os.getpid()}-{kind}-{world}")
    busy, ours, start = _busy_seconds(), _children_cpu(), time.perf_counter()
    together = mp.get_context("spawn").Barrier(world) if independent else None
    mp.spawn(_worker, args=(world, _port(), kind, device, threads, steps, str(result), pin, together), nprocs=world, join=True)
    wall = time.perf_counter() - start
    others = None
    if busy is not None:
        others = max(0.0, (_busy_seconds() - busy) - (_children_cpu() - ours)) / wall
    rate, step_seconds = 0.0, []
    for part in sorted(result.parent.glob(result.name + ".*")):
        measured = json.loads(part.read_text())
        rate += measured["images_per_second"]
        step_seconds.append(measured["step_seconds"])
        part.unlink()
    return rate, others, lockstep_fraction(step_seconds) if independent else None


def _busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat), or None."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _percent(fraction: float | None) -> str:
    return "?" if fraction is None else f"{100 * fraction:.0f}%"


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="threads per process, the single process's too (default: cores // processes)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None, help=f"timed steps per run (default: {STEPS})")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds of 1 and N processes; the median is reported")
    parser.add_argument("--kinds", default="victim,victim_local_bn,generator",
                        help="victim (train.sync_bn=true: synchronised batch norm, statistics over gloo), victim_local_bn "
                             "(train.sync_bn=false, the CPU default), generator")
    parser.add_argument("--pin", action="store_true",
                        help="pin each process to its own cores (rank r: cores r*threads ...): the scheduler then "
                             "cannot put two ranks on one core while a third job holds the other")
    parser.add_argument("--out")
    args = parser.parse_args()
    from mtlue_fast.info import collect

    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // args.processes)
    n = args.processes
    load_before = load_average()
    rows = {}
    for kind in args.kinds.split(","):
        steps = args.steps or STEPS[kind]
        rounds: dict[str, list[float]] = {"1": [], str(n): [], "independent": []}
        others: dict[str, list[float | None]] = {key: [] for key in rounds}
        lockstep: list[float] = []
        for _ in range(args.repeats):
            for key in rounds:
                world = 1 if key == "1" else n
                rate, busy, fraction = measure(kind, world, args.device, threads, steps, args.pin, independent=key == "independent")
                rounds[key].append(rate)
                others[key].append(None if busy is None else round(busy, 2))
                if fraction is not None:
                    lockstep.append(fraction)
        one, many, apart = (statistics.median(rounds[key]) for key in ("1", str(n), "independent"))
        rows[kind] = {"images_per_second_1": one, f"images_per_second_{n}": many, "speedup": many / one,
                      "efficiency": many / (n * one), "images_per_second_independent": apart,
                      "independent_speedup": apart / one, "of_independent": many / apart,
                      "control_lockstep_fraction": statistics.median(lockstep) if lockstep else None,
                      "control_lockstep_rounds": lockstep, "rounds": rounds, "other_processes_cpus": others}  # fmt: skip
        print(f"{kind}: 1 process {one:,.0f} img/s, {n} processes {many:,.0f} img/s ({threads} thread(s) each), "
              f"speed-up {many / one:.2f}x, efficiency {100 * many / (n * one):.0f}%; control: {n} independent processes "
              f"(1/{n} of the batch each, no communication) {apart:,.0f} img/s = {apart / one:.2f}x, so the job reaches "
              f"{100 * many / apart:.0f}% of what {n} processes do on this machine without communicating (waiting for "
              f"the slower one once per step would keep {_percent(rows[kind]['control_lockstep_fraction'])} of it); rounds "
              f"{ {k: [round(v) for v in r] for k, r in rounds.items()} }, CPUs used by other processes {others}", flush=True)
    record = {"device": args.device, "cores": cores, "cpu_model": cpu_model(), "processes": n, "threads_per_process": threads,
              "pinned": args.pin, "nice": os.nice(0),
              "steps": {k: args.steps or STEPS[k] for k in rows}, "repeats": args.repeats, "results": rows,
              "load_average_before": load_before, "load_average_after": load_average(),
              "versions": collect(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")


if __name__ == "__main__":
    main()
