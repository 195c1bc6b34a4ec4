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


def test_delta_beyond_int8_range_is_an_error(device):
    x = torch.zeros(1, 1, 2, 2, dtype=torch.uint8, device=device)
    delta = torch.full((1, 1, 2, 2), 0.6, device=device)
    with pytest.raises(ValueError, match="more than 127/255"):
        ops.quantize_export(x, delta)
    with pytest.raises(ValueError, match="more than 127/255"):
        reference.quantize_export(x, delta)


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
