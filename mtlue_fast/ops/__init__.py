"""The fused ops of mtlue_fast: perturbation application, embedding regularisation, export.

Each op runs the compiled kernel for the input's device when the library has one (see
``python -m mtlue_fast.info``) and the pure-PyTorch reference in :mod:`mtlue_fast.ops.reference`
otherwise; both validate their arguments identically and compute the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _backend, _checks, reference
from ._registrations import register as _register

if _backend.state().source is not None:
    _register()

__all__ = ["perturb_apply", "embedding_reg", "quantize_export", "backend_for"]


def backend_for(device: torch.device | str) -> str:
    """"compiled" when the compiled library serves ``device``, else "reference"."""
    return "compiled" if _backend.has_kernel(torch.device(device)) else "reference"


def perturb_apply(
    x: torch.Tensor,
    raw: torch.Tensor,
    eps: float,
    *,
    mode: str = "clamp",
    crop: torch.Tensor | None = None,
    flip: torch.Tensor | None = None,
    out_size: Sequence[int] | None = None,
) -> torch.Tensor:
    """Bound the generator output, add it to the image, clamp to [0, 1], then crop and flip.

    Args:
        x: ``[B,C,H,W]`` uint8 (0..255, scaled by 1/255) or floating image in [0, 1].
        raw: ``[B,C,H,W]`` float16/bfloat16/float32/float64 generator output.
        eps: L-inf budget on the [0, 1] scale (e.g. 8/255), >= 0.
        mode: ``"clamp"``: delta = clamp(raw, -eps, eps); ``"tanh"``: delta = eps * tanh(raw).
        crop: integer ``[B,2]`` (top, left) of each sample's window; needs ``out_size``.
        flip: bool ``[B]``: flip the window horizontally.
        out_size: ``(h, w)`` of the window. Without ``crop``, every sample is centre-cropped.

    Returns:
        ``[B,C,h,w]`` in raw's dtype. The gradient flows to ``raw`` only: zero where the eps clamp
        saturated (clamp mode), where the [0, 1] clamp was active and outside the window.

    Crop windows are bounds-checked eagerly (one small device-to-host read when ``crop`` is on a
    GPU); under ``torch.compile`` that check is skipped, and the kernels still never read outside
    the image.
    """
    mode_id, crop, (out_h, out_w) = _checks.perturb_args(x, raw, eps, mode, crop, flip, out_size)
    eps = float(eps)
    if _backend.has_kernel(x.device):
        return torch.ops.mtlue.perturb_apply(x.detach(), raw, eps, mode_id, crop, flip, out_h, out_w)
    return reference.perturb_apply(x.detach(), raw, eps, mode_id, crop, flip, (out_h, out_w))


def embedding_reg(
    table: torch.Tensor, task_offsets: torch.Tensor | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Within-task and cross-task cosine regularisers of the stacked class embeddings (SPEC 5).

    Args:
        table: ``[R, D]`` floating; task k owns rows ``task_offsets[k]:task_offsets[k+1]``.
        task_offsets: int64 ``[K+1]`` (tensor on the CPU or table's device, or a list), strictly
            increasing from 0 to R. Offsets on the CPU avoid a device sync for validation.

    Returns:
        ``(intra, inter)``, 0-dim tensors in table's dtype: the mean cosine over within-task
        pairs m<n and the mean |cosine| over cross-task pairs (0 for K = 1). Norms are clamped at
        1e-8. Differentiable with respect to ``table``.
    """
    offsets = _checks.embedding_args(table, task_offsets)
    if _backend.has_kernel(table.device):
        intra, inter, _cos, _norms = torch.ops.mtlue.embedding_reg(table, offsets)
        return intra, inter
    return reference.embedding_reg(table, offsets)


def quantize_export(x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Protected uint8 image and int8 perturbation for publication (SPEC 6).

    Args:
        x: ``[N,C,H,W]`` uint8 clean image.
        delta: ``[N,C,H,W]`` floating perturbation on the [0, 1] scale (NaN counts as 0).

    Returns:
        ``(protected, delta_q)``: uint8 ``round(clamp(x + 255*delta, 0, 255))`` (half to even) and
        int8 ``protected - x``, so ``x + delta_q == protected`` exactly. Not differentiable.

    Raises:
        ValueError: bad arguments, or a pixel moved by more than 127 (int8 range).
    """
    _checks.export_args(x, delta)
    delta = delta.detach()
    if _backend.has_kernel(x.device):
        try:
            return torch.ops.mtlue.quantize_export(x, delta)
        except RuntimeError as err:
            if "more than 127/255" in str(err):
                raise ValueError(str(err).splitlines()[0]) from None
            raise
    return reference.quantize_export(x, delta)
