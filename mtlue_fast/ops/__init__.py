"""The fused ops of mtlue_fast: perturbation application, embedding regularisation, export.

Each op runs the compiled kernel for the input's device when the library has one (see
``python -m mtlue_fast.info``) and the pure-PyTorch reference in :mod:`mtlue_fast.ops.reference`
otherwise; both compute the same thing and reject the same arguments.

No op reads a tensor back to the host in the compiled path, so none makes the GPU wait. Argument
errors that only the values reveal (a crop window outside the image, an export delta beyond the
int8 range, task offsets on the GPU that are not increasing) are raised at once on the CPU; on
CUDA the kernels record them and :func:`raise_pending_errors` raises them (call it once per epoch
or pass, and before writing an export).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _backend, _checks, reference
from ._errors import raise_pending_errors
from ._registrations import register as _register

if _backend.state().source is not None:
    _register()

__all__ = ["perturb_apply", "embedding_reg", "quantize_export", "raise_pending_errors", "backend_for"]


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
        raw: ``[B,C,H,W]`` float16/bfloat16/float32/float64 generator output (bfloat16 as a
            generator under autocast gives it: no up-cast needed; the arithmetic is float32).
        eps: L-inf budget on the [0, 1] scale (e.g. 8/255), >= 0.
        mode: ``"clamp"``: delta = clamp(raw, -eps, eps); ``"tanh"``: delta = eps * tanh(raw).
        crop: integer ``[B,2]`` (top, left) of each sample's window; needs ``out_size``. Each
            window must lie inside the image: ``0 <= top <= H-h``, ``0 <= left <= W-w``.
        flip: bool ``[B]``: flip the window horizontally.
        out_size: ``(h, w)`` of the window. Without ``crop``, every sample is centre-cropped
            (``top = (H-h)//2``, ``left = (W-w)//2``; no window tensor is made).

    Returns:
        ``[B,C,h,w]`` in raw's dtype. The gradient flows to ``raw`` only: zero where the eps clamp
        saturated (clamp mode), where the [0, 1] clamp was active and outside the window.

    Raises:
        ValueError: bad arguments. A crop window outside the image is reported at once on the CPU;
            on CUDA the kernels clamp it into the image (they never read outside it) and record it,
            and the error is raised by the next :func:`raise_pending_errors` for that device.
    """
    compiled = isinstance(x, torch.Tensor) and _backend.has_kernel(x.device)
    mode_id, crop, (out_h, out_w) = _checks.perturb_args(
        x, raw, eps, mode, crop, flip, out_size, check_windows=not compiled
    )
    eps = float(eps)
    if compiled:
        try:
            return torch.ops.mtlue.perturb_apply(x.detach(), raw, eps, mode_id, crop, flip, out_h, out_w)
        except RuntimeError as err:
            _raise_value_error(err, "perturb_apply: crop[")
            raise
    return reference.perturb_apply(x.detach(), raw, eps, mode_id, crop, flip, (out_h, out_w))


def embedding_reg(
    table: torch.Tensor, task_offsets: torch.Tensor | Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Within-task and cross-task cosine regularisers of the stacked class embeddings (docs/method.md section 5).

    Args:
        table: ``[R, D]`` floating; task k owns rows ``task_offsets[k]:task_offsets[k+1]``.
        task_offsets: int64 ``[K+1]`` (a list, or a tensor on the CPU or on table's device),
            strictly increasing from 0 to R. A list is checked and copied to the device once; a
            CPU tensor for a table on a GPU is checked and copied once per tensor object.

    Returns:
        ``(intra, inter)``, 0-dim tensors in table's dtype: the mean cosine over within-task
        pairs m<n and the mean |cosine| over cross-task pairs (0 for K = 1). Norms are clamped at
        1e-8. Differentiable with respect to ``table``.

    Raises:
        ValueError: bad arguments. Offsets held in a tensor on the GPU are checked by the kernel,
            and a violation is raised by the next :func:`raise_pending_errors` for that device.
    """
    compiled = isinstance(table, torch.Tensor) and _backend.has_kernel(table.device)
    offsets = _checks.embedding_args(table, task_offsets, check_values=not compiled)
    if compiled:
        try:
            intra, inter, _cos, _norms = torch.ops.mtlue.embedding_reg(table, offsets)
        except RuntimeError as err:
            _raise_value_error(err, "embedding_reg: task_offsets")
            raise
        return intra, inter
    return reference.embedding_reg(table, offsets)


def quantize_export(x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Protected uint8 image and int8 perturbation for publication (docs/method.md section 6).

    Args:
        x: ``[N,C,H,W]`` uint8 clean image.
        delta: ``[N,C,H,W]`` floating perturbation on the [0, 1] scale (NaN counts as 0).

    Returns:
        ``(protected, delta_q)``: uint8 ``round(clamp(x + 255*delta, 0, 255))`` (half to even) and
        int8 ``protected - x``, so ``x + delta_q == protected`` exactly. Not differentiable.

    Raises:
        ValueError: bad arguments, or a pixel moved by more than 127 (int8 range). The latter is
            raised at once on the CPU; on CUDA such elements get delta_q saturated to +-127 and the
            error is raised by the next :func:`raise_pending_errors` for that device, which a
            caller must run before it publishes the results.
    """
    _checks.export_args(x, delta)
    delta = delta.detach()
    if _backend.has_kernel(x.device):
        try:
            return torch.ops.mtlue.quantize_export(x, delta)
        except RuntimeError as err:
            _raise_value_error(err, "quantize_export: ", "more than 127/255")
            raise
    return reference.quantize_export(x, delta)


def _raise_value_error(err: RuntimeError, prefix: str, contains: str = "") -> None:
    """Raise the compiled op's message as a ValueError when it reports a bad argument value (it starts
    with ``prefix`` and contains ``contains``); return otherwise."""
    text = str(err)
    start = text.find(prefix)
    if start >= 0 and contains in text:
        raise ValueError(text[start:].splitlines()[0]) from None
