"""Victim training throughput: the straightforward path vs the fast path, and the step time
of the gradient-based weighting strategies against equal weighting.

Run:  pytest bench/bench_victim.py --benchmark-json bench/results/<name>.json
      python bench/summarize.py bench/results/<name>.json

CelebA-shaped data: uint8 ``[N, 3, 70, 70]``, random crop 64 + flip, 40 binary tasks, ResNet-18.
On a GPU: width 1.0 (the torchvision architecture) at batch 512, the size of the GPU targets in
docs/results.md. On a CPU the full network manages a few dozen images/s, so the CPU run uses width 0.25 at batch 128: the
ratios between paths are what a CPU run is for.

Paths (each a :class:`~mtlue_fast.train.TrainConfig`; one training epoch of ``STEPS`` steps per round):

- ``straightforward``: fp32, contiguous, eager, Adam (for-each), crop/flip on the host and a copy per
  batch, the loss read to the host after every step;
- ``fast``: what the defaults resolve to on the device (GPU: bf16 autocast, channels-last, fused
  Adam, uint8 data resident with on-device crop/flip; CPU: channels-last, and bf16 autocast where
  the CPU has AMX/AVX512-BF16) plus ``torch.compile``;
- ``fast-eager``: the same without ``torch.compile`` and without CUDA graphs;
- ``fast-graph``: eager kernels, the whole step replayed as one CUDA graph (``cuda_graph``, the
  default on a GPU); ``fast-compile-graph``: compiled kernels inside that graph;
  ``fast-reduce-overhead``: ``torch.compile``'s own CUDA graphs (per compiled region);
  ``fast-max-autotune-graph``: autotuned compiled kernels inside the step's graph. GPU only.

``test_cpu_precision``: the CPU fast-eager step in fp32 and in bf16 autocast, whatever the CPU has
(``ratio_to_fp32`` in extra_info). What ``amp``'s ``auto`` (bf16 only with AMX or AVX512-BF16) rests
on; a CPU without them is imitated by capping oneDNN's and ATen's instruction sets, recorded in
extra_info::

    pytest bench/bench_victim.py -k cpu_precision --bench-device cpu --benchmark-json A.json
    ONEDNN_MAX_CPU_ISA=AVX512_CORE pytest bench/bench_victim.py -k cpu_precision --bench-device cpu ...
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 pytest bench/bench_victim.py -k cpu_precision ...
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from mtlue_fast.train import TrainConfig, build_training, make_batches, select_tasks, train_epoch
from mtlue_fast.train.graphed import graph_status

NUM_TASKS = 40


@dataclass
class ArrayCache:
    images: np.ndarray
    labels: np.ndarray
    task_names: list
    num_classes: list
    manifest: dict


def sizes(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"width": 1.0, "batch_size": 512, "steps": 20}
    return {"width": 0.25, "batch_size": 128, "steps": 4}


@pytest.fixture(scope="module")
def celeba_like(bench_device) -> ArrayCache:
    size = sizes(bench_device)
    n = size["batch_size"] * size["steps"]
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 3, 70, 70), dtype=np.uint8)
    labels = (rng.random((n, NUM_TASKS)) < 0.3).astype(np.int64)
    names = [f"attr{k}" for k in range(NUM_TASKS)]
    return ArrayCache(images, labels, names, [2] * NUM_TASKS, {"dataset": "celeba", "source_digest": "bench"})


STRAIGHTFORWARD = dict(
    amp=False, channels_last=False, fused_adam=False, compile=False, resident=False, host_augment=True, sync_every_step=True,
    cuda_graph=False,
)
# The compiled path last: its cold inductor compile is the slowest setup, and a time-boxed run
# (bench/gpu_check.py) should still measure the eager paths.
PATHS = {
    "straightforward": STRAIGHTFORWARD,
    "fast-eager": dict(cuda_graph=False),
    "fast-graph": dict(cuda_graph=True),  # the default on a GPU: the whole step as one CUDA graph
    "fast": dict(compile=True, cuda_graph=False),
    "fast-compile-graph": dict(compile=True, cuda_graph=True),
    "fast-reduce-overhead": dict(compile=True, compile_mode="reduce-overhead", cuda_graph=False),
    "fast-max-autotune-graph": dict(compile=True, compile_mode="max-autotune-no-cudagraphs", cuda_graph=True),
}
GPU_ONLY = {"fast-graph", "fast-compile-graph", "fast-reduce-overhead", "fast-max-autotune-graph"}  # the same as an eager path on a CPU


def run_epoch(cache: ArrayCache, device: torch.device, **overrides):
    """A callable running one epoch of training steps, built (and warmed) once."""
    size = sizes(device)
    config = TrainConfig(width=size["width"], batch_size=size["batch_size"], progress=False, **overrides)
    view = select_tasks(cache, crop=(64, 64))
    training = build_training(view, config, device)
    batches = make_batches(view, config, device, train=True)
    epoch = iter(range(10**6))

    def once():
        train_epoch(training.step, batches, next(epoch), device, config)

    return once, size["batch_size"] * size["steps"], training.step


@pytest.mark.parametrize("path", list(PATHS))
def test_victim_training(benchmark, celeba_like, bench_device, path):
    if path in GPU_ONLY and bench_device.type != "cuda":
        pytest.skip("CUDA graphs and the autotuned compile modes are measured on a GPU")
    once, images, step = run_epoch(celeba_like, bench_device, **PATHS[path])
    benchmark.group = f"victim training resnet18 w{sizes(bench_device)['width']} b{sizes(bench_device)['batch_size']} 40 tasks {bench_device.type}"
    benchmark.extra_info.update(images=images, variant=path, kind="victim")
    benchmark.pedantic(once, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["graph"] = graph_status(step)  # a graphed variant that fell back to eager says so


# ``ew`` first: every other strategy's extra_info gets ``ratio_to_ew``, its median step over ew's.
STRATEGIES = [
    ("ew", "representation"),
    ("pcgrad", "representation"),
    ("aligned_mtl", "representation"),
    ("fairgrad", "representation"),
    ("mgda", "representation"),
    ("pcgrad", "parameters"),
]


_BASELINE_MEDIAN: dict[str, float] = {}  # benchmark group -> its baseline's median epoch time in this pytest run


def record_ratio(benchmark, baseline: bool, field: str) -> None:
    """Keep the median of a group's baseline (run first), or store this benchmark's median over it
    as ``extra_info[field]``. Nothing when pytest-benchmark is disabled or the baseline did not run."""
    if benchmark.stats is None:  # --benchmark-disable: nothing was timed
        return
    median = benchmark.stats.stats.median
    if baseline:
        _BASELINE_MEDIAN[benchmark.group] = median
    elif benchmark.group in _BASELINE_MEDIAN:
        benchmark.extra_info[field] = round(median / _BASELINE_MEDIAN[benchmark.group], 3)


@pytest.mark.parametrize("name,space", STRATEGIES)
def test_weighting_step(benchmark, celeba_like, bench_device, name, space):
    """Step time of a weighting strategy on the device's default path without ``torch.compile``
    (the strategies run outside the compiled model either way), and its ratio to equal weighting's
    (``ratio_to_ew`` in extra_info, when ew ran before it in the same pytest run)."""
    if space == "parameters" and bench_device.type == "cuda":
        pytest.skip("40 batched backward passes of the full network: memory-bound comparison, CPU only")
    once, images, step = run_epoch(celeba_like, bench_device, weighting=name, grad_space=space)
    benchmark.group = f"weighting step resnet18 40 tasks {bench_device.type}"
    variant = name if space == "representation" else f"{name} ({space})"
    benchmark.extra_info.update(images=images, variant=variant, kind="weighting")
    benchmark.pedantic(once, rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["graph"] = graph_status(step)
    record_ratio(benchmark, baseline=(name, space) == ("ew", "representation"), field="ratio_to_ew")



@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_cpu_precision(benchmark, celeba_like, bench_device, amp):
    """One CPU epoch of the fast-eager step in fp32 or bf16 autocast (``ratio_to_fp32``: bf16's
    median over fp32's, both under this process's instruction-set caps)."""
    if bench_device.type != "cpu":
        pytest.skip("bf16 autocast is always on on a GPU")
    caps = {name: os.environ.get(name, "") for name in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")}
    once, images, _ = run_epoch(celeba_like, bench_device, amp=amp)
    benchmark.group = f"victim training precision cpu {caps['ONEDNN_MAX_CPU_ISA'] or 'all instructions'}"
    benchmark.extra_info.update(images=images, variant="bf16" if amp else "fp32", kind="precision", **caps)
    benchmark.pedantic(once, rounds=3, iterations=1, warmup_rounds=1)
    record_ratio(benchmark, baseline=not amp, field="ratio_to_fp32")
