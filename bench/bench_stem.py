"""The ResNet stem's max-pool on a CPU: channels-first, channels-last, and ``StemMaxPool``.

Run:  pytest bench/bench_stem.py --bench-device cpu --benchmark-json bench/results/<name>.json
      python bench/summarize.py bench/results/<name>.json

Times ReLU + 3x3 stride-2 max-pool, forward + backward, on the stem output of the synthetic
defaults' width-0.25 ResNet-18 (16 channels at 32x32 for a 64-pixel crop), the ops that follow the
stem convolution in every generator step's surrogate and every victim step:

- ``channels_first``: ``nn.MaxPool2d`` on an NCHW tensor (the generator's surrogate before
  ``StemMaxPool``);
- ``stem_max_pool``: ``StemMaxPool`` on the same NCHW tensor (in bf16: pools channels-last, hands back NCHW,
  gradient back to NCHW);
- ``channels_last``: ``nn.MaxPool2d`` on an NHWC tensor (the victims, which run channels-last).

``StemMaxPool`` only changes the CPU path (on CUDA it is ``nn.MaxPool2d``), so this file measures CPUs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mtlue_fast.models.backbones import StemMaxPool

# name: (B, C, H) of the stem output: the CPU generator batch (128) and the victim batch (128 too) at width 0.25.
STEM_SIZES = {"w0.25_128x16x32": (128, 16, 32)}
IMPLS = ("channels_first", "stem_max_pool", "channels_last")


def _inputs(size, impl: str, dtype: torch.dtype) -> torch.Tensor:
    b, c, h = size
    x = torch.randn(b, c, h, h, generator=torch.Generator().manual_seed(0)).to(dtype)
    if impl == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(True)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size_name", list(STEM_SIZES))
def test_stem_max_pool(benchmark, bench_device, size_name, impl, dtype_name):
    if bench_device.type != "cpu":
        pytest.skip("StemMaxPool changes the CPU path only")
    dtype = getattr(torch, dtype_name)
    x = _inputs(STEM_SIZES[size_name], impl, dtype)
    pool = StemMaxPool(3, 2, 1) if impl == "stem_max_pool" else nn.MaxPool2d(3, 2, 1)
    grad_out = torch.randn_like(pool(torch.relu(x.detach())))

    def fwd_bwd():
        x.grad = None
        pool(torch.relu(x)).backward(grad_out)

    benchmark.group = f"stem relu+maxpool fwd+bwd {size_name} {dtype_name} cpu"
    benchmark.extra_info.update(impl=impl, images=STEM_SIZES[size_name][0], kind="op")
    benchmark.pedantic(fwd_bwd, rounds=20, iterations=1, warmup_rounds=2)
