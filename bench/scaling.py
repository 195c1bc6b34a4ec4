"""Scaling of victim and generator training from 1 to N processes (torch.distributed, gloo on CPU).

    python bench/scaling.py --processes 2 --out bench/results/<name>.json

Each configuration trains a few steps in every process and times them inside the processes, after
a warm-up step (process start-up and imports are not counted, which a pytest-benchmark round around
``torch.multiprocessing.spawn`` would include; that is why this one is a script). Reported: images/s
of the global batch for 1 and N processes and the scaling efficiency ``rate_N / (N * rate_1)``.
With 1 process every core serves one process; with N processes each gets ``cores / N`` threads, so
on a CPU the efficiency measures the overhead of the gradient all-reduce and synchronised batch norm
rather than extra compute. On a multi-GPU machine run the same script with ``--device cuda`` under
enough GPUs (one process per GPU, NCCL).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, kind: str, device: str, threads: int, steps: int, result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    from mtlue_fast import dist

    dist.setup(device)
    try:
        run_once = _victim(device, world) if kind == "victim" else _generator(device, world)
        run_once()  # warm-up
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            images = run_once()
        dist.barrier()
        elapsed = time.perf_counter() - start
        if rank == 0:
            Path(result).write_text(json.dumps({"images_per_second": steps * images / elapsed}))
    finally:
        dist.teardown()


def _celeba_like(n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 3, 70, 70), dtype=np.uint8), (rng.random((n, 40)) < 0.3).astype(np.int64)


def _victim(device: str, world: int):
    from bench_victim import ArrayCache

    from mtlue_fast.train import TrainConfig, build_training, make_batches, select_tasks

    batch = 128
    images, labels = _celeba_like(batch * 4)
    cache = ArrayCache(images, labels, [f"a{k}" for k in range(40)], [2] * 40, {"dataset": "celeba", "source_digest": "s"})
    config = TrainConfig(width=0.25, batch_size=batch, progress=False)
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


def _generator(device: str, world: int):
    from mtlue_fast import dist
    from mtlue_fast.models import build_model
    from mtlue_fast.models.generator import MTLGenerator
    from mtlue_fast.ue.generate import GeneratorStep, make_generator_optimizer
    from mtlue_fast.ue.settings import GenerateConfig
    from mtlue_fast.ue.objectives import Objective

    batch = 32
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


def measure(kind: str, world: int, device: str, steps: int) -> float:
    cores = os.cpu_count() or 1
    result = Path(f"/tmp/mtlue-scaling-{os.getpid()}-{kind}-{world}.json")
    mp.spawn(_worker, args=(world, _port(), kind, device, max(1, cores // world), steps, str(result)), nprocs=world, join=True)
    rate = json.loads(result.read_text())["images_per_second"]
    result.unlink()
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out")
    args = parser.parse_args()
    from mtlue_fast.info import collect

    rows = {}
    for kind in ("victim", "generator"):
        one = measure(kind, 1, args.device, args.steps)
        many = measure(kind, args.processes, args.device, args.steps)
        rows[kind] = {"images_per_second_1": one, f"images_per_second_{args.processes}": many,
                      "efficiency": many / (args.processes * one), "speedup": many / one}  # fmt: skip
        print(f"{kind}: 1 process {one:,.0f} img/s, {args.processes} processes {many:,.0f} img/s, "
              f"speed-up {many / one:.2f}x, efficiency {100 * many / (args.processes * one):.0f}%")
    record = {"device": args.device, "cores": os.cpu_count(), "processes": args.processes, "results": rows,
              "versions": collect(), "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(sys.argv)}  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")


if __name__ == "__main__":
    main()
