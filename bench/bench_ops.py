"""Throughput of the fused ops against the paths a straightforward implementation would take.

Run:  pytest bench/bench_ops.py --benchmark-json bench/results/<name>.json
      python bench/summarize.py bench/results/<name>.json

Every benchmark times forward + backward (quantize_export: forward only) of one implementation:
``compiled`` (mtlue::op), for perturb_apply also ``kernels`` (its registered ops called directly:
the kernels without the Python checks and autograd around them), ``reference`` (eager pure PyTorch), ``reference_compiled``
(torch.compile of the reference; for quantize_export it includes the reference's overflow check,
a device-to-host read and a graph break the kernels do not have) and, for embedding_reg, ``naive_loop`` (a Python loop over pairs
with F.cosine_similarity). Groups compare implementations at one size; ``extra_info`` records
the bytes each pass must move so GPU runs report a fraction of copy bandwidth.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from mtlue_fast import ops
from mtlue_fast.ops import reference

EPS = 8 / 255

# name: (B, C, H, crop) for perturb_apply; the generator batch of each dataset.
PERTURB_SIZES = {"celeba_512x3x70_crop64": (512, 3, 70, 64), "chestxray_128x1x256_crop224": (128, 1, 256, 224)}
# perturb_apply only, GPU only: batches large enough that launch and tail effects fade (0.45 GB and
# 1.8 GB moved per forward + backward), to tell the kernels' own bandwidth from the per-call costs
# around them; 2,048 is the batch a GPU generator step uses.
PERTURB_SIZES_GPU = {"celeba_2048x3x70_crop64": (2048, 3, 70, 64), "celeba_8192x3x70_crop64": (8192, 3, 70, 64)}
# raw's dtype: float32, or bfloat16 as a generator under autocast produces it (passed as it is).
PERTURB_RAW_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# name: (task sizes, D) for embedding_reg.
EMBEDDING_SIZES = {"celeba_R80_D19600": ([2] * 40, 19600), "chestxray_R28_D16384": ([2] * 14, 16384)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rounds_for(device: torch.device, slow: bool = False) -> int:
    return 50 if device.type == "cuda" else (3 if slow else 10)


def run_benchmark(benchmark, fn, device, slow=False):
    def timed():
        fn()
        sync(device)

    benchmark.pedantic(timed, rounds=rounds_for(device, slow), warmup_rounds=2 if slow else 3, iterations=1)


# ----------------------------------------------------------------------------- perturb_apply


def perturb_inputs(size, device, raw_dtype=torch.float32):
    batch, channels, side, crop = size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, channels, side, side), generator=g, dtype=torch.uint8).to(device)
    raw = (torch.randn(batch, channels, side, side, generator=g) * 0.05).to(device=device, dtype=raw_dtype)
    raw.requires_grad_(True)
    corner = torch.randint(0, side - crop + 1, (batch, 2), generator=g).to(device)
    flip = (torch.rand(batch, generator=g) < 0.5).to(device)
    grad_out = torch.randn(batch, channels, crop, crop, generator=g).to(device=device, dtype=raw_dtype)
    return x, raw, corner, flip, grad_out


def perturb_bytes(size, raw_bytes: int = 4, passes: str = "forward+backward") -> int:
    """Bytes a pass must move (uint8 x, raw of ``raw_bytes`` per element). Forward: the x and raw
    windows read, out written. Backward: grad_out read, the x and raw windows read again, grad_raw
    written in full. ``passes``: "forward", "backward" or "forward+backward"."""
    batch, channels, side, crop = size
    window, full = batch * channels * crop * crop, batch * channels * side * side
    forward = window * (1 + raw_bytes) + window * raw_bytes
    backward = window * raw_bytes + window * (1 + raw_bytes) + full * raw_bytes
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[passes]


PERTURB_IMPLS = {
    "compiled": lambda x, raw, c, f, crop: ops.perturb_apply(x, raw, EPS, crop=c, flip=f, out_size=(crop, crop)),
    "reference": lambda x, raw, c, f, crop: reference.perturb_apply(x, raw, EPS, 0, c, f, (crop, crop)),
}


@pytest.mark.parametrize("raw_name", list(PERTURB_RAW_DTYPES))
@pytest.mark.parametrize(
    "impl", ["compiled", "kernels", "kernels_forward", "kernels_backward", "reference", "reference_compiled"]
)
@pytest.mark.parametrize("size_name", list(PERTURB_SIZES) + list(PERTURB_SIZES_GPU))
def test_perturb_apply(benchmark, bench_device, size_name, impl, raw_name):
    """``kernels``: the registered forward and backward ops called directly, without the Python
    argument checks, autograd or the gradient's allocation by autograd: what the kernels alone cost
    (``kernels_forward`` / ``kernels_backward``: one of them). bfloat16 raw: the compiled paths and
    the eager reference only."""
    if size_name in PERTURB_SIZES_GPU and bench_device.type != "cuda":
        pytest.skip("GPU-only size")
    if impl.startswith("kernels") and ops.backend_for(bench_device) != "compiled":
        pytest.skip(f"no compiled kernels for {bench_device.type}")
    if raw_name != "float32" and impl == "reference_compiled":
        pytest.skip("bfloat16 raw: compiled paths and the eager reference only")
    size = {**PERTURB_SIZES, **PERTURB_SIZES_GPU}[size_name]
    raw_dtype = PERTURB_RAW_DTYPES[raw_name]
    x, raw, corner, flip, grad_out = perturb_inputs(size, bench_device, raw_dtype)
    crop = size[3]
    passes = "forward+backward"
    if impl.startswith("kernels"):
        raw_in = raw.detach()
        forward_op = lambda: torch.ops.mtlue.perturb_apply(x, raw_in, EPS, 0, corner, flip, crop, crop)  # noqa: E731
        backward_op = lambda: torch.ops.mtlue.perturb_apply_backward(grad_out, x, raw_in, EPS, 0, corner, flip)  # noqa: E731
        if impl == "kernels_forward":
            passes, step = "forward", forward_op
        elif impl == "kernels_backward":
            passes, step = "backward", backward_op
        else:

            def step():
                forward_op()
                backward_op()

    else:
        if impl == "reference_compiled":
            torch._dynamo.reset()
            forward = torch.compile(PERTURB_IMPLS["reference"], fullgraph=True, dynamic=False)
        else:
            forward = PERTURB_IMPLS[impl]

        def step():
            raw.grad = None
            forward(x, raw, corner, flip, crop).backward(grad_out)

    benchmark.group = f"perturb_apply {passes} {size_name} raw {raw_name} {bench_device.type}"
    nbytes = perturb_bytes(size, raw_dtype.itemsize, passes)
    benchmark.extra_info.update(op="perturb_apply", size=size_name, impl=impl, raw=raw_name, passes=passes, bytes=nbytes)
    run_benchmark(benchmark, step, bench_device)


# The synthetic defaults' generator batch on a CPU: 128 images of CelebA's 70x70 cache, crop 64.
PERTURB_TANH_CPU_SIZE = (128, 3, 70, 64)


@pytest.mark.parametrize("raw_name", list(PERTURB_RAW_DTYPES))
def test_perturb_apply_tanh_cpu(benchmark, raw_name):
    """The CPU kernels in ``tanh`` mode (the synthetic defaults' generator), forward + backward, called
    directly. float32 raw calls std::tanh per element; bfloat16 raw looks the same values up in a
    table of std::tanh (bit for bit the float32 result rounded: test_perturb_apply.py), so the ratio
    of the two is what the table saves."""
    if ops.backend_for("cpu") != "compiled":
        pytest.skip("no compiled CPU kernels")
    raw_dtype = PERTURB_RAW_DTYPES[raw_name]
    x, raw, corner, flip, grad_out = perturb_inputs(PERTURB_TANH_CPU_SIZE, torch.device("cpu"), raw_dtype)
    raw, crop, tanh = raw.detach(), PERTURB_TANH_CPU_SIZE[3], reference.MODE_TANH

    def step():
        torch.ops.mtlue.perturb_apply(x, raw, EPS, tanh, corner, flip, crop, crop)
        torch.ops.mtlue.perturb_apply_backward(grad_out, x, raw, EPS, tanh, corner, flip)

    benchmark.group = "perturb_apply tanh forward+backward celeba_128x3x70_crop64 cpu"
    nbytes = perturb_bytes(PERTURB_TANH_CPU_SIZE, raw_dtype.itemsize)
    benchmark.extra_info.update(op="perturb_apply_tanh", size="celeba_128x3x70_crop64", impl=f"kernels_{raw_name}",
                                raw=raw_name, passes="forward+backward", bytes=nbytes)  # fmt: skip
    run_benchmark(benchmark, step, torch.device("cpu"))


# ----------------------------------------------------------------------------- embedding_reg


def naive_embedding_reg(table: torch.Tensor, sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """What a direct transcription of docs/method.md section 5 computes: one cosine per pair in a Python loop."""
    bounds = list(itertools.accumulate([0, *sizes]))
    rows = [table[r] for r in range(table.shape[0])]
    task = [k for k, c in enumerate(sizes) for _ in range(c)]
    within, cross = [], []
    for m in range(len(rows)):
        for n in range(m + 1, len(rows)):
            cos = F.cosine_similarity(rows[m], rows[n], dim=0, eps=1e-8)
            if task[m] == task[n]:
                within.append(cos)
            else:
                cross.append(cos.abs())
    assert bounds[-1] == len(rows)
    return torch.stack(within).mean(), torch.stack(cross).mean()


@pytest.mark.parametrize("impl", ["compiled", "reference", "reference_compiled", "naive_loop"])
@pytest.mark.parametrize("size_name", list(EMBEDDING_SIZES))
def test_embedding_reg(benchmark, bench_device, size_name, impl):
    sizes, dim = EMBEDDING_SIZES[size_name]
    g = torch.Generator().manual_seed(0)
    table = torch.randn(sum(sizes), dim, generator=g).to(bench_device).requires_grad_(True)
    offsets = torch.tensor([0, *itertools.accumulate(sizes)])
    offsets_dev = offsets.to(bench_device)
    if impl == "compiled":
        forward = lambda: ops.embedding_reg(table, offsets)  # noqa: E731
    elif impl == "reference":
        forward = lambda: reference.embedding_reg(table, offsets_dev)  # noqa: E731
    elif impl == "reference_compiled":
        torch._dynamo.reset()
        compiled = torch.compile(reference.embedding_reg, dynamic=False)
        forward = lambda: compiled(table, offsets_dev)  # noqa: E731
    else:
        forward = lambda: naive_embedding_reg(table, sizes)  # noqa: E731

    def step():
        table.grad = None
        intra, inter = forward()
        (20 * intra + 100 * inter).backward()

    benchmark.group = f"embedding_reg fwd+bwd {size_name} {bench_device.type}"
    benchmark.extra_info.update(op="embedding_reg", size=size_name, impl=impl)
    run_benchmark(benchmark, step, bench_device, slow=impl == "naive_loop")


# ----------------------------------------------------------------------------- quantize_export


@pytest.mark.parametrize("impl", ["compiled", "reference", "reference_compiled"])
@pytest.mark.parametrize("size_name", list(PERTURB_SIZES))
def test_quantize_export(benchmark, bench_device, size_name, impl):
    batch, channels, side, _ = PERTURB_SIZES[size_name]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, channels, side, side), generator=g, dtype=torch.uint8).to(bench_device)
    delta = ((torch.rand(x.shape, generator=g) * 2 - 1) * EPS).to(bench_device)
    if impl == "compiled":
        forward = ops.quantize_export
    elif impl == "reference":
        forward = reference.quantize_export
    else:
        torch._dynamo.reset()
        forward = torch.compile(reference.quantize_export, dynamic=False)

    benchmark.group = f"quantize_export fwd {size_name} {bench_device.type}"
    benchmark.extra_info.update(op="quantize_export", size=size_name, impl=impl, bytes=x.numel() * (1 + 4 + 1 + 1))
    run_benchmark(benchmark, lambda: forward(x, delta), bench_device)


# ----------------------------------------------------------------------------- copy ceiling


@pytest.mark.parametrize("size_name", ["copy_256MiB"])
def test_device_copy(benchmark, bench_device, size_name):
    """Device-to-device copy: the bandwidth ceiling GPU results are compared against."""
    src = torch.empty(64 * 2**20, dtype=torch.float32, device=bench_device).uniform_()
    dst = torch.empty_like(src)
    benchmark.group = f"copy {bench_device.type}"
    benchmark.extra_info.update(op="copy", size=size_name, impl="copy", bytes=2 * src.numel() * 4)
    run_benchmark(benchmark, lambda: dst.copy_(src), bench_device)
