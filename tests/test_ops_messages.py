"""The compiled ops' own argument checks (direct ``torch.ops.mtlue`` calls, past the Python wrappers)
raise RuntimeErrors whose messages carry sizes, dtypes, devices, integers and floats.

These messages are built by ``csrc/common/message.h`` without iostreams: on an H200 machine (torch
2.11, CUDA 13), formatting an integer through c10's ostringstream inside the library crashed the
process instead of raising.
"""

from __future__ import annotations

import pytest
import torch

from mtlue_fast import ops

def _compiled(device: torch.device) -> None:
    if ops.backend_for(device) != "compiled":
        pytest.skip(f"no compiled kernels for {device}")


def test_export_overflow_message_names_the_count(device):
    """At once on the CPU; on CUDA recorded by the kernel and raised by raise_pending_errors."""
    _compiled(device)
    x = torch.zeros(1, 1, 2, 3, dtype=torch.uint8, device=device)
    message = r"quantize_export: 6 element\(s\) of delta move a pixel by more than 127/255"
    if device.type == "cpu":
        with pytest.raises(RuntimeError, match=message):
            torch.ops.mtlue.quantize_export(x, torch.full((1, 1, 2, 3), 0.6, device=device))
    else:
        ops.raise_pending_errors(device)
        torch.ops.mtlue.quantize_export(x, torch.full((1, 1, 2, 3), 0.6, device=device))
        with pytest.raises(ValueError, match=message):
            ops.raise_pending_errors(device)


def test_export_shape_and_dtype_messages(device):
    _compiled(device)
    x = torch.zeros(1, 1, 2, 2, dtype=torch.uint8, device=device)
    with pytest.raises(RuntimeError, match=r"quantize_export: delta \[1, 1, 3, 3\] must match x \[1, 1, 2, 2\]"):
        torch.ops.mtlue.quantize_export(x, torch.zeros(1, 1, 3, 3, device=device))
    with pytest.raises(RuntimeError, match=r"quantize_export: delta must be floating, got Int"):
        torch.ops.mtlue.quantize_export(x, torch.zeros(1, 1, 2, 2, dtype=torch.int32, device=device))


def test_perturb_messages_carry_floats_integers_and_devices(device):
    _compiled(device)
    x = torch.zeros(2, 1, 4, 4, dtype=torch.uint8, device=device)
    raw = torch.zeros(2, 1, 4, 4, device=device)
    with pytest.raises(RuntimeError, match=r"perturb_apply: eps must be finite and >= 0, got -0\.5"):
        torch.ops.mtlue.perturb_apply(x, raw, -0.5, 0, None, None, 4, 4)
    with pytest.raises(RuntimeError, match=r"perturb_apply: mode must be 0 \(clamp\) or 1 \(tanh\), got 7"):
        torch.ops.mtlue.perturb_apply(x, raw, 0.1, 7, None, None, 4, 4)
    with pytest.raises(RuntimeError, match=r"perturb_apply: out size \(5, 4\) must lie within the image \(4, 4\)"):
        torch.ops.mtlue.perturb_apply(x, raw, 0.1, 0, None, None, 5, 4)
    crop = torch.zeros(2, 2, dtype=torch.long)  # on the CPU whatever x's device
    if device.type != "cpu":
        with pytest.raises(RuntimeError, match=rf"perturb_apply: crop is on cpu but x is on {device.type}"):
            torch.ops.mtlue.perturb_apply(x, raw, 0.1, 0, crop, None, 3, 3)


@pytest.mark.cuda
def test_backward_gradients_on_another_device_are_refused():
    """Autograd always hands the backward gradients on the input's device; a direct call with host
    gradients would make the kernels read host pointers (an illegal access that ends the process's
    CUDA context), so the bindings check."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    device = torch.device("cuda")
    _compiled(device)
    x = torch.zeros(2, 1, 4, 4, dtype=torch.uint8, device=device)
    raw = torch.zeros(2, 1, 4, 4, device=device)
    with pytest.raises(RuntimeError, match=r"perturb_apply_backward: grad_out is on cpu but x is on cuda"):
        torch.ops.mtlue.perturb_apply_backward(torch.zeros(2, 1, 4, 4), x, raw, 0.1, 0, None, None)
    table = torch.randn(4, 3, device=device)
    offsets = torch.tensor([0, 2, 4], device=device)
    _intra, _inter, cos, norms = torch.ops.mtlue.embedding_reg(table, offsets)
    with pytest.raises(RuntimeError, match=r"embedding_reg_backward: grad_intra is on cpu but table is on cuda"):
        torch.ops.mtlue.embedding_reg_backward(torch.ones(()), torch.ones((), device=device), table, offsets, cos, norms)


def test_cpu_crop_window_message():
    _compiled(torch.device("cpu"))
    x = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    crop = torch.tensor([[0, 0], [2, 1]])
    with pytest.raises(RuntimeError, match=r"perturb_apply: crop\[1\] = \(2, 1\) puts the 3x3 window outside the 4x4 image"):
        torch.ops.mtlue.perturb_apply(x, torch.zeros(2, 1, 4, 4), 0.1, 0, crop, None, 3, 3)


def test_pending_error_messages():
    """The messages raise_pending_errors builds from the CUDA error buffer (formatted here, on any
    machine, from buffer values as a kernel would leave them)."""
    from mtlue_fast.ops import _errors

    slots = [0] * _errors.SLOTS
    assert _errors.messages(slots) == []
    slots[_errors.CROP_COUNT : _errors.IMAGE_WIDTH + 1] = [2, 5, 10, -3, 64, 64, 70, 70]
    slots[_errors.EXPORT_OVERFLOW] = 7
    slots[_errors.OFFSETS_COUNT : _errors.OFFSETS_ROWS + 1] = [1, -1, 1, 80, 80]
    crop, export, offsets = _errors.messages(slots)
    assert crop.startswith("perturb_apply: crop[5] = (10, -3) put the 64x64 window outside the 70x70 image")
    assert "0 <= top <= 6 and 0 <= left <= 6" in crop
    assert export.startswith("quantize_export: 7 element(s) of delta move a pixel by more than 127/255")
    assert offsets.startswith("embedding_reg: task_offsets must be strictly increasing from 0 to R=80")
    assert "got first 1 and last 80" in offsets


def test_error_slots_match_the_library_header():
    """mtlue_fast/ops/_errors.py reads the buffer by the slot numbers csrc/common/error_slots.h gives."""
    import re
    from pathlib import Path

    from mtlue_fast.ops import _errors

    header = (Path(__file__).resolve().parent.parent / "csrc" / "common" / "error_slots.h").read_text()
    slots = {name: int(value) for name, value in re.findall(r"constexpr int k(\w+) = (\d+);", header)}
    python = {
        "CropCount": _errors.CROP_COUNT, "CropSample": _errors.CROP_SAMPLE, "CropTop": _errors.CROP_TOP,
        "CropLeft": _errors.CROP_LEFT, "CropHeight": _errors.CROP_HEIGHT, "CropWidth": _errors.CROP_WIDTH,
        "ImageHeight": _errors.IMAGE_HEIGHT, "ImageWidth": _errors.IMAGE_WIDTH,
        "ExportOverflow": _errors.EXPORT_OVERFLOW, "OffsetsCount": _errors.OFFSETS_COUNT,
        "OffsetsIndex": _errors.OFFSETS_INDEX, "OffsetsLow": _errors.OFFSETS_LOW,
        "OffsetsHigh": _errors.OFFSETS_HIGH, "OffsetsRows": _errors.OFFSETS_ROWS, "Slots": _errors.SLOTS,
    }  # fmt: skip
    assert slots == python


def test_nothing_pending_on_the_cpu():
    ops.raise_pending_errors("cpu")
    if ops.backend_for("cpu") == "compiled":
        assert torch.ops.mtlue.take_pending_errors(torch.empty(0)).tolist() == [0] * 16


def test_embedding_offsets_message():
    _compiled(torch.device("cpu"))
    table = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"embedding_reg: task_offsets must be strictly increasing, got 2 then 2 at index 1"):
        torch.ops.mtlue.embedding_reg(table, torch.tensor([0, 2, 2, 4]))


def test_library_sources_check_through_mtlue_check():
    """Every check in csrc/ goes through MTLUE_CHECK (message.h), so no message of the library is
    formatted by an ostream inside it; a plain TORCH_CHECK would bring the crash back."""
    from pathlib import Path

    csrc = Path(__file__).resolve().parent.parent / "csrc"
    offenders = [
        f"{path.relative_to(csrc)}:{number}"
        for path in sorted(csrc.rglob("*"))
        if path.suffix in {".h", ".cpp", ".cu", ".cuh"} and path.name != "message.h"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "TORCH_CHECK(" in line
    ]
    assert offenders == [], f"use MTLUE_CHECK instead of TORCH_CHECK: {offenders}"
