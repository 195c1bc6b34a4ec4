"""mtlue::quantize_export (compiled) against the reference: exact equality."""

from __future__ import annotations

import pytest
import torch

from mtlue_fast import ops
from mtlue_fast.ops import reference


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_matches_reference_exactly(device, gen, dtype):
    x = torch.randint(0, 256, (6, 3, 11, 13), generator=gen, dtype=torch.uint8)
    delta = ((torch.rand(x.shape, generator=gen, dtype=torch.float64) * 2 - 1) * 16 / 255).to(dtype)
    x, delta = x.to(device), delta.to(device)
    protected, delta_q = ops.quantize_export(x, delta)
    protected_ref, delta_q_ref = reference.quantize_export(x, delta)
    assert protected.dtype == torch.uint8 and delta_q.dtype == torch.int8
    assert torch.equal(protected, protected_ref) and torch.equal(delta_q, delta_q_ref)
    assert torch.equal((x.short() + delta_q.short()).to(torch.uint8), protected)


def test_rounding_clamping_and_nan(device):
    x = torch.tensor([0, 0, 0, 0, 255, 250, 3, 100], dtype=torch.uint8).view(1, 1, 1, 8)
    # 255 * delta: 0.25, 0.75, -0.25 (rounds to -0 -> 0), 2.5 (half to even -> 2), +8, +8 (clamped
    # at 255), -8 (clamped at 0), NaN (unchanged).
    delta = torch.tensor([0.25, 0.75, -0.25, 2.5, 8, 8, -8, float("nan")], dtype=torch.float64) / 255
    protected, delta_q = ops.quantize_export(x.to(device), delta.view(1, 1, 1, 8).to(device))
    assert protected.flatten().tolist() == [0, 1, 0, 2, 255, 255, 0, 100]
    assert delta_q.flatten().tolist() == [0, 1, 0, 2, 0, 5, -3, 0]


def test_noncontiguous_and_channels_last(device, gen):
    x = torch.randint(0, 256, (4, 3, 9, 10), generator=gen, dtype=torch.uint8).to(device)
    delta = (torch.randn(x.shape, generator=gen) * 0.02).to(device)
    expected = reference.quantize_export(x, delta)
    got_cl = ops.quantize_export(
        x.contiguous(memory_format=torch.channels_last), delta.contiguous(memory_format=torch.channels_last)
    )
    got_t = ops.quantize_export(x.transpose(2, 3).contiguous().transpose(2, 3), delta.transpose(2, 3).contiguous().transpose(2, 3))
    for got in (got_cl, got_t):
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,offset", [((2, 3, 70, 70), 0), ((1, 1, 3, 37), 0), ((3, 1, 16, 16), 0), ((2, 3, 9, 11), 5)])
def test_vector_sizes_tails_and_misaligned_tensors(device, gen, dtype, shape, offset):
    """Element counts that are and are not multiples of the kernels' 16-element vectors, and
    tensors that start off a 16-byte boundary (offset > 0: contiguous views into a larger buffer)."""
    numel = torch.Size(shape).numel()
    x = torch.randint(0, 256, (numel + offset,), generator=gen, dtype=torch.uint8)[offset:].view(shape)
    delta = ((torch.rand(numel + offset, generator=gen, dtype=torch.float64) * 2 - 1) * 40 / 255).to(dtype)
    delta = delta[offset:].view(shape)
    delta[0, 0, 0, :3] = torch.tensor([float("nan"), 0.5 / 255, -0.5 / 255], dtype=dtype)
    x, delta = x.to(device), delta.to(device)
    if offset:  # .to(device) copies; keep the offset on the device too
        x = torch.cat([x.new_zeros(offset), x.flatten()])[offset:].view(shape)
        delta = torch.cat([delta.new_zeros(offset), delta.flatten()])[offset:].view(shape)
        assert x.storage_offset() == offset and delta.is_contiguous()
    protected, delta_q = ops.quantize_export(x, delta)
    protected_ref, delta_q_ref = reference.quantize_export(x, delta)
    assert torch.equal(protected, protected_ref) and torch.equal(delta_q, delta_q_ref)
    ops.raise_pending_errors(device)


def test_delta_beyond_int8_range_is_an_error_at_once_on_the_cpu():
    x = torch.zeros(1, 1, 2, 2, dtype=torch.uint8)
    delta = torch.full((1, 1, 2, 2), 0.6)
    with pytest.raises(ValueError, match=r"4 element\(s\) of delta move a pixel by more than 127/255"):
        ops.quantize_export(x, delta)
    with pytest.raises(ValueError, match="more than 127/255"):
        reference.quantize_export(x, delta)


@pytest.mark.cuda
def test_delta_beyond_int8_range_is_raised_later_on_cuda(gen):
    """On CUDA the overflow is counted on the device (no read back per call), the differences are
    saturated to +-127, and the next raise_pending_errors reports the count, once."""
    device = torch.device("cuda")
    ops.raise_pending_errors(device)
    x = torch.full((2, 3, 33, 33), 100, dtype=torch.uint8, device=device)
    delta = torch.zeros(x.shape, device=device)
    delta[0, 0, 0, :5] = 0.6  # +153
    delta[1, 2, 32, -2:] = -0.6  # -153 -> clamped at 0, i.e. -100: within range
    delta[1, 1, 7, 3] = -0.9  # x - 229: clamped at 0 as well
    protected, delta_q = ops.quantize_export(x, delta)
    assert delta_q[0, 0, 0, :5].tolist() == [127] * 5 and protected[0, 0, 0, :5].tolist() == [253] * 5
    with pytest.raises(ValueError, match=r"quantize_export: 5 element\(s\) of delta move a pixel by more than 127/255"):
        ops.raise_pending_errors(device)
    ops.raise_pending_errors(device)
    ops.quantize_export(x, delta * 0.1)
    ops.raise_pending_errors(device)


def test_compiled_path_reads_no_values_back(gen, monkeypatch):
    if ops.backend_for("cpu") != "compiled":
        pytest.skip("no compiled CPU kernels")
    x = torch.randint(0, 256, (2, 3, 9, 10), generator=gen, dtype=torch.uint8)
    delta = torch.randn(x.shape, generator=gen) * 0.02

    def forbidden(self, *args, **kwargs):
        raise AssertionError("a tensor value was read back to the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    ops.quantize_export(x, delta)


def test_gradient_does_not_flow(device):
    x = torch.zeros(1, 1, 2, 2, dtype=torch.uint8, device=device)
    delta = torch.zeros(1, 1, 2, 2, device=device, requires_grad=True)
    protected, delta_q = ops.quantize_export(x, delta)
    assert not protected.requires_grad and not delta_q.requires_grad


@pytest.mark.parametrize(
    "x,delta,match",
    [
        (torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), "x must be uint8"),
        (torch.zeros(1, 1, 2, 2, dtype=torch.uint8), torch.zeros(1, 1, 2, 2, dtype=torch.int8), "delta must be floating"),
        (torch.zeros(1, 1, 2, 2, dtype=torch.uint8), torch.zeros(1, 1, 2, 3), "must have the same shape"),
        (torch.zeros(2, 2, dtype=torch.uint8), torch.zeros(2, 2), r"x must have shape \[B,C,H,W\]"),
        (torch.zeros(1, 1, 2, 2, dtype=torch.uint8), torch.zeros(1, 1, 2, 2, device="meta"), "delta is on meta"),
    ],
)
def test_bad_input_names_the_argument(x, delta, match):
    with pytest.raises(ValueError, match=match):
        ops.quantize_export(x, delta)
