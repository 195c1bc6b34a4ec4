"""Generator training throughput: straightforward vs fast path, and SEP's shared pass.

Run:  pytest bench/bench_generator.py --benchmark-json bench/results/<name>.json
      python bench/summarize.py bench/results/<name>.json

CelebA-shaped batches (uint8 3 x 70 x 70, crop 64 + flip, 40 binary tasks) against a ResNet-18
surrogate, TAP objective plus the embedding regularisers. On a GPU: the paper's generator (width 1)
at batch 512, the size of the GPU targets in docs/results.md. On a CPU: width 0.25 at batch 32 (the generator costs
~5 GFLOP per image at width 1); the ratios between paths are what a CPU run is for.

- ``straightforward``: fp32, the first transposed convolution over the concatenated ``16K + 128``
  channels, eager, clamp / add / crop as separate torch ops, plain ``embedding_reg`` reference;
- ``fast``: the linearity identity (per-(task, class) maps once per step, one matrix product per
  batch), the fused ops, bf16 autocast (GPU, or CPUs with AMX), channels-last, ``torch.compile``
  of the generator on GPUs;
- ``fast-eager``, ``fast-graph`` (the run's default on a GPU: the whole step as one CUDA graph),
  ``fast-compile-graph``, ``fast-fp32``: the fast path with one switch changed;
- SEP with 15 checkpoints: one shared generator pass per batch vs one pass per checkpoint, on the
  run's default path (GPU: ``fast-graph``; CPU: ``fast-fp32``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from mtlue_fast.models import build_model
from mtlue_fast.models.generator import MTLGenerator
from mtlue_fast.train.graphed import GraphedStep, graph_status
from mtlue_fast.ue.generate import GeneratorStep, make_generator_optimizer, prepare_surrogate
from mtlue_fast.ue.settings import GenerateConfig
from mtlue_fast.ue.objectives import Objective

NUM_TASKS = 40
CROP = (64, 64)


def sizes(device: torch.device) -> dict:
    # SEP: 15 checkpoints; a pass per checkpoint keeps 15 generator graphs for one backward (~90 GB
    # at batch 512 on a GPU), hence a smaller batch, and on a GPU enough steps per round for the
    # CUDA graph's warm-up and capture to fall in the untimed round.
    if device.type == "cuda":
        return {"width": 1.0, "surrogate_width": 1.0, "batch_size": 512, "steps": 10, "sep_batch_size": 128, "sep_steps": 5}
    return {"width": 0.25, "surrogate_width": 0.25, "batch_size": 32, "steps": 2, "sep_batch_size": 32, "sep_steps": 1}


@dataclass
class Batches:
    images: torch.Tensor
    labels: torch.Tensor


@pytest.fixture(scope="module")
def batches(bench_device) -> Batches:
    size = sizes(bench_device)
    rng = np.random.default_rng(0)
    n = size["batch_size"]
    images = torch.from_numpy(rng.integers(0, 256, (n, 3, 70, 70), dtype=np.uint8)).to(bench_device)
    labels = torch.from_numpy((rng.random((n, NUM_TASKS)) < 0.3).astype(np.int64)).to(bench_device)
    return Batches(images, labels)


def surrogate(device: torch.device, width: float, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model([2] * NUM_TASKS, backbone="resnet18", in_channels=3, crop=CROP, width=width).to(device)
    return model.eval().requires_grad_(False)


def make_step(device: torch.device, config: GenerateConfig, surrogates, base: str) -> GeneratorStep:
    size = sizes(device)
    torch.manual_seed(0)
    generator = MTLGenerator([2] * NUM_TASKS, in_channels=3, image_size=(70, 70), width=size["width"], fast=config.fast).to(device)
    if config.use_channels_last(device.type):
        generator = generator.to(memory_format=torch.channels_last)
    amp_on = config.amp if isinstance(config.amp, bool) else (device.type == "cuda")
    surrogates = [prepare_surrogate(m, config.use_channels_last(device.type), config.use_surrogate_bf16(device.type, amp_on))
                  for m in surrogates]  # fmt: skip
    graphed = config.use_cuda_graph(device.type, False)
    optimizer = make_generator_optimizer(generator, config, capturable=graphed)
    amp = config.amp if isinstance(config.amp, bool) else (device.type == "cuda")
    step = GeneratorStep(generator, Objective(base, [2] * NUM_TASKS), surrogates, optimizer, config, CROP, amp)
    return GraphedStep(step, label="generator step") if graphed else step


def _fast_amp(device: torch.device):
    from mtlue_fast.train.settings import cpu_has_native_bf16

    return device.type == "cuda" or cpu_has_native_bf16()


# The compiled path (CUDA) last: a time-boxed run (bench/gpu_check.py) should still measure the others.
PATHS = {
    "straightforward": lambda device: GenerateConfig(fast=False, fused_ops=False, amp=False, channels_last=False, compile=False,
                                                     cuda_graph=False),
    "fast-fp32": lambda device: GenerateConfig(fast=True, fused_ops=True, amp=False, channels_last=False, compile=False),
    "fast-eager": lambda device: GenerateConfig(fast=True, fused_ops=True, amp=_fast_amp(device), channels_last=True, compile=False, cuda_graph=False),
    "fast-graph": lambda device: GenerateConfig(fast=True, fused_ops=True, amp=_fast_amp(device), channels_last=True, compile=False, cuda_graph=True),
    "fast": lambda device: GenerateConfig(fast=True, fused_ops=True, amp=_fast_amp(device), channels_last=True, compile=device.type == "cuda", cuda_graph=False),
    "fast-compile-graph": lambda device: GenerateConfig(fast=True, fused_ops=True, amp=_fast_amp(device), channels_last=True, compile=True, cuda_graph=True),
}
GPU_ONLY = {"fast-graph", "fast-compile-graph"}


def _run(step: GeneratorStep, batches: Batches, steps: int, device: torch.device, batch_size: int | None = None):
    images, labels = batches.images[:batch_size], batches.labels[:batch_size]

    def once():
        for _ in range(steps):
            step(images, labels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return once


@pytest.mark.parametrize("path", list(PATHS))
def test_generator_training(benchmark, batches, bench_device, path):
    if path in GPU_ONLY and bench_device.type != "cuda":
        pytest.skip("CUDA graphs are measured on a GPU")
    size = sizes(bench_device)
    step = make_step(bench_device, PATHS[path](bench_device), [surrogate(bench_device, size["surrogate_width"])], "tap")
    benchmark.group = f"generator training tap w{size['width']} b{size['batch_size']} 40 tasks {bench_device.type}"
    benchmark.extra_info.update(images=size["batch_size"] * size["steps"], variant=path, kind="generator")
    benchmark.pedantic(_run(step, batches, size["steps"], bench_device), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["graph"] = graph_status(step)  # a graphed variant that fell back to eager says so


@pytest.mark.parametrize("shared", [True, False], ids=["shared-pass", "pass-per-checkpoint"])
def test_sep_step(benchmark, batches, bench_device, shared):
    size = sizes(bench_device)
    checkpoints = [surrogate(bench_device, size["surrogate_width"], seed) for seed in range(15)]
    fast = PATHS["fast-fp32" if bench_device.type == "cpu" else "fast-graph"](bench_device).replace(base="sep", shared_pass=shared)
    step = make_step(bench_device, fast, checkpoints, "sep")
    batch, steps = size["sep_batch_size"], size["sep_steps"]
    benchmark.group = f"sep step 15 checkpoints w{size['width']} b{batch} {bench_device.type}"
    benchmark.extra_info.update(images=batch * steps, variant="shared pass" if shared else "pass per checkpoint", kind="generator")
    benchmark.pedantic(_run(step, batches, steps, bench_device, batch), rounds=3, iterations=1, warmup_rounds=1)
    benchmark.extra_info["graph"] = graph_status(step)
