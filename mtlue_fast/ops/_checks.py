"""Argument validation shared by the compiled and reference paths of every op.

Shape, dtype and device checks are static and run everywhere, under ``torch.compile`` too. Checks
of tensor values (crop windows, task offsets given as a tensor) are left to the compiled kernels,
which make them without a host read: the CPU kernels raise at once, the CUDA kernels record the
error for :func:`mtlue_fast.ops.raise_pending_errors` (see ``_errors.py``). Only the pure-PyTorch
reference path checks values here, eagerly (skipped while compiling, where a host read would break
the graph).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MODES = {"clamp": 0, "tanh": 1}


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def check_rank4(name: str, t: torch.Tensor, op: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{op}: {name} must have shape [B,C,H,W], got {tuple(t.shape)}")


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                "all tensors must be on the same device"
            )


def perturb_args(
    x: torch.Tensor,
    raw: torch.Tensor,
    eps: float,
    mode: str,
    crop: torch.Tensor | None,
    flip: torch.Tensor | None,
    out_size: Sequence[int] | None,
    *,
    check_windows: bool = True,
) -> tuple[int, torch.Tensor | None, tuple[int, int]]:
    """Validate ``perturb_apply`` arguments; return (mode id, crop as int64 or None, (h, w)).

    ``out_size`` without ``crop`` means a centre crop of every sample; crop stays None (both the
    kernels and the reference take that as the centred window). ``check_windows``: check the crop
    windows' values here (one host read); off for the compiled kernels, which check them.
    """
    op = "perturb_apply"
    check_rank4("x", x, op)
    check_rank4("raw", raw, op)
    if x.dtype != torch.uint8 and x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: x must be uint8 (0..255) or floating in [0,1], got {x.dtype}")
    if raw.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: raw must be float16/bfloat16/float32/float64, got {raw.dtype}")
    if x.shape != raw.shape:
        raise ValueError(f"{op}: x {tuple(x.shape)} and raw {tuple(raw.shape)} must have the same shape")
    if isinstance(eps, torch.Tensor):
        raise TypeError(f"{op}: eps must be a Python float, got a tensor")
    eps = float(eps)
    if not eps >= 0.0 or eps == float("inf"):
        raise ValueError(f"{op}: eps must be a finite float >= 0, got {eps}")
    if mode not in MODES:
        raise ValueError(f"{op}: mode must be one of {sorted(MODES)}, got {mode!r}")
    check_same_device(op, x=x, raw=raw, crop=crop, flip=flip)

    batch, _, height, width = x.shape
    if out_size is None:
        if crop is not None:
            raise ValueError(f"{op}: crop requires out_size=(h, w)")
        out_hw = (height, width)
    else:
        if len(out_size) != 2:
            raise ValueError(f"{op}: out_size must be (h, w), got {out_size!r}")
        out_hw = (int(out_size[0]), int(out_size[1]))
        if not (1 <= out_hw[0] <= height and 1 <= out_hw[1] <= width):
            raise ValueError(f"{op}: out_size {out_hw} must lie within the image size {(height, width)}")

    if crop is not None:
        if crop.dtype.is_floating_point or crop.dtype.is_complex or crop.dtype == torch.bool:
            raise ValueError(f"{op}: crop must be an integer tensor of (top, left), got {crop.dtype}")
        if tuple(crop.shape) != (batch, 2):
            raise ValueError(f"{op}: crop must have shape [B,2]=[{batch},2], got {tuple(crop.shape)}")
        crop = crop.to(torch.int64)
        if check_windows and not _is_compiling() and crop.numel():
            bounds = torch.cat([crop.amin(dim=0), crop.amax(dim=0)]).tolist()  # one host read
            lo, hi = bounds[:2], bounds[2:]
            if lo[0] < 0 or lo[1] < 0 or hi[0] + out_hw[0] > height or hi[1] + out_hw[1] > width:
                raise ValueError(
                    f"{op}: a crop window puts the {out_hw[0]}x{out_hw[1]} window outside the {height}x{width} "
                    f"image (top in [{lo[0]}, {hi[0]}], left in [{lo[1]}, {hi[1]}]); crop windows must satisfy "
                    f"0 <= top <= {height - out_hw[0]} and 0 <= left <= {width - out_hw[1]}"
                )
    if flip is not None:
        if flip.dtype != torch.bool:
            raise ValueError(f"{op}: flip must be a bool tensor, got {flip.dtype}")
        if tuple(flip.shape) != (batch,):
            raise ValueError(f"{op}: flip must have shape [B]=[{batch}], got {tuple(flip.shape)}")
    return MODES[mode], crop, out_hw


def embedding_args(
    table: torch.Tensor, task_offsets: torch.Tensor | Sequence[int], *, check_values: bool = True
) -> torch.Tensor:
    """Validate ``embedding_reg`` arguments; return task_offsets as int64 on table's device.

    Offsets given as a sequence are checked here and copied to the device once (cached). Offsets
    given as a tensor are checked here only with ``check_values`` (the reference path: one host
    read); the compiled kernels check them themselves, except that a CPU tensor of offsets for a
    table on a GPU is checked here and copied once per tensor (and per in-place change of it).
    """
    op = "embedding_reg"
    if not isinstance(table, torch.Tensor):
        raise TypeError(f"{op}: table must be a torch.Tensor, got {type(table).__name__}")
    if table.dim() != 2:
        raise ValueError(f"{op}: table must have shape [R, D], got {tuple(table.shape)}")
    if table.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: table must be floating, got {table.dtype}")
    rows = table.shape[0]
    if not isinstance(task_offsets, torch.Tensor):
        offsets = tuple(int(o) for o in task_offsets)
        _check_offset_values(list(offsets), rows)
        if _is_compiling():
            return torch.tensor(offsets, dtype=torch.int64, device=table.device)
        return _offsets_on_device(offsets, table.device)
    else:
        if task_offsets.dtype.is_floating_point or task_offsets.dtype == torch.bool:
            raise ValueError(f"{op}: task_offsets must be an integer tensor, got {task_offsets.dtype}")
        if task_offsets.dim() != 1:
            raise ValueError(f"{op}: task_offsets must have shape [K+1], got {tuple(task_offsets.shape)}")
        if task_offsets.shape[0] < 2:
            raise ValueError(
                f"{op}: task_offsets must have shape [K+1] with K >= 1, got {task_offsets.shape[0]} value(s)"
            )
        if task_offsets.device.type != "cpu" and task_offsets.device != table.device:
            raise ValueError(
                f"{op}: task_offsets is on {task_offsets.device} but table is on {table.device}; "
                "pass them on the table's device or on the CPU"
            )
        if _is_compiling():
            return task_offsets.to(device=table.device, dtype=torch.int64)
        if check_values:
            _check_offset_values(task_offsets.tolist(), rows)
        elif task_offsets.device != table.device:
            return _offsets_copy(task_offsets, table.device, rows)
    return task_offsets.to(device=table.device, dtype=torch.int64)


# (id of a CPU offsets tensor, device, R) -> (weak reference to it, its version, checked device copy)
_copies: dict[tuple[int, torch.device, int], tuple[weakref.ref, int, torch.Tensor]] = {}


def _offsets_copy(offsets: torch.Tensor, device: torch.device, rows: int) -> torch.Tensor:
    """A CPU tensor of offsets checked (a read of host memory, no device sync) and copied to
    ``device`` once: per-step calls reuse the copy while the tensor is the same and unchanged."""
    key = (id(offsets), device, rows)
    hit = _copies.get(key)
    if hit is not None and hit[0]() is offsets and hit[1] == offsets._version:
        return hit[2]
    _check_offset_values(offsets.tolist(), rows)
    copy = offsets.to(device=device, dtype=torch.int64)
    _copies[key] = (weakref.ref(offsets, lambda _ref, key=key: _copies.pop(key, None)), offsets._version, copy)
    return copy


@functools.lru_cache(maxsize=64)
def _offsets_on_device(offsets: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Offsets given as a sequence, copied to the device once rather than at every call."""
    return torch.tensor(offsets, dtype=torch.int64, device=device)


def _check_offset_values(offsets: list[int], rows: int) -> None:
    op = "embedding_reg"
    if len(offsets) < 2:
        raise ValueError(f"{op}: task_offsets must have shape [K+1] with K >= 1, got {len(offsets)} value(s)")
    increasing = all(a < b for a, b in zip(offsets, offsets[1:]))
    if offsets[0] != 0 or offsets[-1] != rows or not increasing:
        raise ValueError(
            f"{op}: task_offsets must be strictly increasing from 0 to R={rows} "
            f"(every task owns at least one row), got {offsets}"
        )


def export_args(x: torch.Tensor, delta: torch.Tensor) -> None:
    op = "quantize_export"
    check_rank4("x", x, op)
    check_rank4("delta", delta, op)
    if x.dtype != torch.uint8:
        raise ValueError(f"{op}: x must be uint8, got {x.dtype}")
    if delta.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: delta must be floating, got {delta.dtype}")
    if x.shape != delta.shape:
        raise ValueError(f"{op}: x {tuple(x.shape)} and delta {tuple(delta.shape)} must have the same shape")
    check_same_device(op, x=x, delta=delta)
