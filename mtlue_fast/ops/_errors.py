"""Value errors of the compiled ops that are raised after the fact on CUDA.

Some argument errors can only be seen in the data: a crop window outside the image, an export
delta that moves a pixel by more than 127/255, task offsets held on the GPU that are not strictly
increasing. Reading such values back to check them would make every call wait for the GPU, so the
CUDA kernels check them on the device instead: they stay safe (a window is clamped into the
image, an export difference is saturated) and record the first violation in a small per-device
buffer. :func:`raise_pending_errors` reads that buffer (one device-to-host read), clears it and
raises. The CPU kernels and the pure-PyTorch reference raise at once, so there is never anything
pending for them.

The slot numbers mirror ``csrc/common/error_slots.h``.
"""

from __future__ import annotations

import torch

from ..devices import cuda_index
from . import _backend

SLOTS = 16
CROP_COUNT, CROP_SAMPLE, CROP_TOP, CROP_LEFT, CROP_HEIGHT, CROP_WIDTH, IMAGE_HEIGHT, IMAGE_WIDTH = range(8)
EXPORT_OVERFLOW = 8
OFFSETS_COUNT, OFFSETS_INDEX, OFFSETS_LOW, OFFSETS_HIGH, OFFSETS_ROWS = range(9, 14)


def messages(slots: list[int]) -> list[str]:
    """One message per kind of error recorded in ``slots`` (the buffer's values), none when clear."""
    found = []
    if slots[CROP_COUNT]:
        b, top, left = slots[CROP_SAMPLE], slots[CROP_TOP], slots[CROP_LEFT]
        h, w, height, width = slots[CROP_HEIGHT], slots[CROP_WIDTH], slots[IMAGE_HEIGHT], slots[IMAGE_WIDTH]
        found.append(
            f"perturb_apply: crop[{b}] = ({top}, {left}) put the {h}x{w} window outside the {height}x{width} "
            f"image (the first of {slots[CROP_COUNT]} record(s) on CUDA since the last check; those windows "
            f"were clamped into the image); crop windows must satisfy 0 <= top <= {height - h} and "
            f"0 <= left <= {width - w}"
        )
    if slots[EXPORT_OVERFLOW]:
        found.append(
            f"quantize_export: {slots[EXPORT_OVERFLOW]} element(s) of delta move a pixel by more than 127/255 "
            "since the last check (their delta_q was saturated to +-127); delta_q is int8, so |255*delta| "
            "must stay <= 127"
        )
    if slots[OFFSETS_COUNT]:
        k, low, high, rows = slots[OFFSETS_INDEX], slots[OFFSETS_LOW], slots[OFFSETS_HIGH], slots[OFFSETS_ROWS]
        where = f"got first {low} and last {high}" if k < 0 else f"got {low} then {high} at index {k}"
        found.append(
            f"embedding_reg: task_offsets must be strictly increasing from 0 to R={rows} (every task owns at "
            f"least one row); {where} (the results of those calls are meaningless)"
        )
    return found


def raise_pending_errors(device: torch.device | str | int | None = None, *, every_rank: bool = False) -> None:
    """Raise the value errors the CUDA kernels recorded on ``device`` since the last call.

    On CUDA, :func:`~mtlue_fast.ops.perturb_apply` (crop windows outside the image),
    :func:`~mtlue_fast.ops.quantize_export` (a pixel moved by more than 127/255) and
    :func:`~mtlue_fast.ops.embedding_reg` (task offsets on the GPU that are not strictly increasing
    from 0 to R) do not raise these errors themselves, which would synchronise every call; they
    record them, and this function raises them. Call it once per epoch or pass, and before using
    results that must be valid (an export about to be written).

    Args:
        device: the CUDA device to check (``None``: the current one; a CPU device or a machine
            without CUDA: nothing to check).
        every_rank: under ``torch.distributed``, combine the records of every process (a
            collective: every rank must call it), so that every rank raises the same error, named
            by the first rank that recorded one. Without it only the rank whose kernels recorded
            the error raises, and the others wait for it in their next collective (NCCL does not
            notice a process that has gone until its timeout).

    Raises:
        ValueError: naming the op, the offending values and what was expected; the record is
            cleared, so the next call raises only what happened after this one.

    Reads one small tensor back from the device (waits for the work queued on the current stream;
    ops queued on other streams must be synchronised with it first).
    """
    device = _recording_device(device)
    if device is None:
        return
    slots = _take(device)
    if every_rank and torch.distributed.is_available() and torch.distributed.is_initialized():
        world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        # On the device: NCCL reduces CUDA tensors only.
        table = torch.zeros(world, slots.numel(), dtype=slots.dtype, device=device)
        table[rank] = slots.to(device)
        torch.distributed.all_reduce(table)
        for source, row in enumerate(table.tolist()):
            found = messages(row)
            if found:
                raise ValueError(f"rank {source}: " + "; ".join(found))
        return
    found = messages(slots.tolist())
    if found:
        raise ValueError("; ".join(found) if len(found) > 1 else found[0])


def _recording_device(device: torch.device | str | int | None) -> torch.device | None:
    """The CUDA device (with its index) whose kernels record errors; None where none do."""
    if device is None:
        if not torch.cuda.is_available():
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    elif isinstance(device, int):
        device = torch.device("cuda", device)
    device = torch.device(device)
    if device.type == "cpu" or not _backend.has_kernel(device):
        return None
    return torch.device(device.type, cuda_index(device))


def _take(device: torch.device) -> torch.Tensor:
    """``device``'s record, ``[SLOTS]`` int64 on the host, cleared on the device."""
    return torch.ops.mtlue.take_pending_errors(torch.empty(0, device=device))
