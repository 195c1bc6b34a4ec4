"""Autograd formulas and fake (meta) kernels of the compiled ``mtlue`` ops.

Fake kernels give output shapes, dtypes and strides without running anything, so
``torch.compile(fullgraph=True)`` traces through the ops as single graph nodes. They mirror the C++
kernels exactly: outputs are contiguous.
"""

from __future__ import annotations

import torch

_registered = False


def register() -> None:
    """Register once, after the compiled library has defined the ``mtlue`` schemas."""
    global _registered
    if _registered:
        return
    _registered = True

    @torch.library.register_fake("mtlue::perturb_apply")
    def _perturb_apply_fake(x, raw, eps, mode, crop, flip, out_h, out_w):
        return raw.new_empty((raw.shape[0], raw.shape[1], out_h, out_w))

    @torch.library.register_fake("mtlue::perturb_apply_backward")
    def _perturb_apply_backward_fake(grad_out, x, raw, eps, mode, crop, flip):
        return torch.empty_like(raw, memory_format=torch.contiguous_format)

    @torch.library.register_fake("mtlue::embedding_reg")
    def _embedding_reg_fake(table, task_offsets):
        compute = torch.float64 if table.dtype == torch.float64 else torch.float32
        rows = table.shape[0]
        return (
            table.new_empty(()),
            table.new_empty(()),
            table.new_empty((rows, rows), dtype=compute),
            table.new_empty((rows,), dtype=compute),
        )

    @torch.library.register_fake("mtlue::embedding_reg_backward")
    def _embedding_reg_backward_fake(grad_intra, grad_inter, table, task_offsets, cos, norms):
        return torch.empty_like(table, memory_format=torch.contiguous_format)

    @torch.library.register_fake("mtlue::quantize_export")
    def _quantize_export_fake(x, delta):
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format),
            torch.empty_like(x, dtype=torch.int8, memory_format=torch.contiguous_format),
        )

    def _perturb_setup(ctx, inputs, output):
        x, raw, eps, mode, crop, flip, _out_h, _out_w = inputs
        ctx.save_for_backward(x, raw, crop, flip)
        ctx.eps, ctx.mode = eps, mode

    def _perturb_backward(ctx, grad_out):
        x, raw, crop, flip = ctx.saved_tensors
        grad_raw = torch.ops.mtlue.perturb_apply_backward(grad_out, x, raw, ctx.eps, ctx.mode, crop, flip)
        return None, grad_raw, None, None, None, None, None, None

    torch.library.register_autograd("mtlue::perturb_apply", _perturb_backward, setup_context=_perturb_setup)

    def _embedding_setup(ctx, inputs, output):
        table, task_offsets = inputs
        _intra, _inter, cos, norms = output
        ctx.mark_non_differentiable(cos, norms)
        ctx.save_for_backward(table, task_offsets, cos, norms)

    def _embedding_backward(ctx, grad_intra, grad_inter, _grad_cos, _grad_norms):
        table, task_offsets, cos, norms = ctx.saved_tensors
        grad_table = torch.ops.mtlue.embedding_reg_backward(grad_intra, grad_inter, table, task_offsets, cos, norms)
        return grad_table, None

    torch.library.register_autograd("mtlue::embedding_reg", _embedding_backward, setup_context=_embedding_setup)
