"""Compiled CUDA kernels against the compiled CPU kernels on identical inputs (GPU only)."""

from __future__ import annotations

import pytest
import torch

from mtlue_fast import ops

pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def both_backends_compiled():
    assert ops.backend_for("cpu") == "compiled" and ops.backend_for("cuda") == "compiled"


@pytest.mark.parametrize("mode", ["clamp", "tanh"])
@pytest.mark.parametrize("raw_dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_perturb_apply_cpu_cuda_parity(gen, mode, raw_dtype):
    batch, channels, side, crop_side = 16, 3, 70, 64
    x = torch.randint(0, 256, (batch, channels, side, side), generator=gen, dtype=torch.uint8)
    raw = (torch.randn(x.shape, generator=gen) * 0.05).to(raw_dtype)
    crop = torch.randint(0, side - crop_side + 1, (batch, 2), generator=gen)
    flip = torch.rand(batch, generator=gen) < 0.5
    grad_out = torch.randn(batch, channels, crop_side, crop_side, generator=gen).to(raw_dtype)
    results = []
    for device in ("cpu", "cuda"):
        r = raw.detach().to(device).requires_grad_(True)  # a leaf on each device (raw itself stays untouched)
        y = ops.perturb_apply(
            x.to(device), r, 8 / 255, mode=mode, crop=crop.to(device), flip=flip.to(device), out_size=(crop_side,) * 2
        )
        y.backward(grad_out.to(device))
        results.append((y.detach().cpu(), r.grad.cpu()))
    # clamp mode is exact arithmetic; tanh may differ in the last bit between libm and CUDA.
    tol = 0 if mode == "clamp" else (1e-6 if raw_dtype != torch.bfloat16 else 1e-2)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_embedding_reg_cpu_cuda_parity(gen):
    table = torch.randn(80, 19600, generator=gen, dtype=torch.float64)
    offsets = list(range(0, 81, 2))
    grads = []
    for device in ("cpu", "cuda"):
        t = table.detach().to(device).requires_grad_(True)
        intra, inter = ops.embedding_reg(t, offsets)
        (20 * intra + 100 * inter).backward()
        grads.append((intra.detach().cpu(), inter.detach().cpu(), t.grad.cpu()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_quantize_export_cpu_cuda_parity(gen, dtype):
    x = torch.randint(0, 256, (32, 3, 70, 70), generator=gen, dtype=torch.uint8)
    delta = ((torch.rand(x.shape, generator=gen) * 2 - 1) * 8 / 255).to(dtype)
    cpu = ops.quantize_export(x, delta)
    cuda = ops.quantize_export(x.cuda(), delta.cuda())
    assert torch.equal(cpu[0], cuda[0].cpu()) and torch.equal(cpu[1], cuda[1].cpu())


@pytest.mark.parametrize("raw_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width,crop_width", [(63, 57), (64, 64), (70, 64), (224, 224), (256, 224)])
def test_perturb_apply_vector_paths_cpu_cuda_parity(gen, width, crop_width, raw_dtype):
    """The CUDA kernels' vector paths at row widths that are and are not whole 16-byte vectors,
    against the CPU kernels bit for bit (clamp mode: exact arithmetic)."""
    batch, channels, height, crop_height = 6, 3, 20, 16
    x = torch.randint(0, 256, (batch, channels, height, width), generator=gen, dtype=torch.uint8)
    raw = (torch.randn(x.shape, generator=gen) * 0.05).to(raw_dtype)
    tops = torch.randint(0, height - crop_height + 1, (batch,), generator=gen)
    lefts = torch.randint(0, width - crop_width + 1, (batch,), generator=gen)
    crop = torch.stack([tops, lefts], 1)
    flip = torch.rand(batch, generator=gen) < 0.5
    grad_out = torch.randn(batch, channels, crop_height, crop_width, generator=gen).to(raw_dtype)
    results = []
    for device in ("cpu", "cuda"):
        r = raw.detach().to(device).requires_grad_(True)
        y = ops.perturb_apply(x.to(device), r, 8 / 255, crop=crop.to(device), flip=flip.to(device),
                              out_size=(crop_height, crop_width))  # fmt: skip
        y.backward(grad_out.to(device))
        results.append((y.detach().cpu(), r.grad.cpu()))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    ops.raise_pending_errors("cuda")


def test_quantize_export_bfloat16_parity(gen):
    x = torch.randint(0, 256, (5, 3, 31, 29), generator=gen, dtype=torch.uint8)
    delta = ((torch.rand(x.shape, generator=gen) * 2 - 1) * 8 / 255).to(torch.bfloat16)
    cpu = ops.quantize_export(x, delta)
    cuda = ops.quantize_export(x.cuda(), delta.cuda())
    assert torch.equal(cpu[0], cuda[0].cpu()) and torch.equal(cpu[1], cuda[1].cpu())


def test_ops_do_not_synchronise(gen):
    """A generator-like step of the ops on CUDA (perturb with windows and a centre crop, both
    regularisers' offsets, export) runs under sync_debug_mode("error"): nothing waits for the GPU."""
    device = torch.device("cuda")
    x = torch.randint(0, 256, (8, 3, 70, 70), generator=gen, dtype=torch.uint8).to(device)
    raw = (torch.randn(x.shape, generator=gen) * 0.05).to(device=device, dtype=torch.bfloat16).requires_grad_(True)
    crop = torch.randint(0, 7, (8, 2), generator=gen).to(device)
    flip = (torch.rand(8, generator=gen) < 0.5).to(device)
    table = torch.randn(8, 16, generator=gen).to(device).requires_grad_(True)
    offsets_cpu = torch.tensor([0, 2, 4, 8])
    offsets_gpu = offsets_cpu.to(device)
    delta = (torch.randn(x.shape, generator=gen) * 0.01).to(device)

    def step():
        y = ops.perturb_apply(x, raw, 8 / 255, crop=crop, flip=flip, out_size=(64, 64))
        z = ops.perturb_apply(x, raw, 8 / 255, mode="tanh", out_size=(64, 64))
        intra, inter = ops.embedding_reg(table, offsets_cpu)
        intra_gpu, inter_gpu = ops.embedding_reg(table, offsets_gpu)
        (y.float().mean() + z.float().mean() + intra + inter + intra_gpu + inter_gpu).backward()
        ops.quantize_export(x, delta)

    step()  # first use: the error buffer and the device copy of the CPU offsets
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ops.raise_pending_errors(device)
