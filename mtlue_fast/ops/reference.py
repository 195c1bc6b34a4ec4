"""Pure-PyTorch definitions of the mtlue ops: the oracle for the compiled kernels and the fallback
when no compiled library is available.

These functions assume arguments have been validated (see ``mtlue_fast.ops._checks``). Gradients
come from autograd. The compiled kernels in ``csrc/`` follow
the same arithmetic, including:

- computation in float32 for half/bfloat16 inputs ("opmath"), float64 when any input is float64;
- uint8 images are multiplied by ``1/255`` (rounded to the compute dtype) before the
  perturbation is added;
- ``torch.clamp`` semantics: NaN propagates, the gradient mask is inclusive at both bounds;
- ``torch.round`` (half to even) for export.
"""

from __future__ import annotations

import torch

MODE_CLAMP = 0
MODE_TANH = 1
NORM_EPS = 1e-8
# uint8 -> [0, 1]: a multiplication by the rounded reciprocal, not a division, so that CPU and CUDA
# (whose scalar division multiplies by the reciprocal) give identical bits.
UINT8_SCALE = 1.0 / 255.0


def opmath_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any floating input is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def perturb_apply(
    x: torch.Tensor,
    raw: torch.Tensor,
    eps: float,
    mode: int,
    crop: torch.Tensor | None,
    flip: torch.Tensor | None,
    out_size: tuple[int, int],
) -> torch.Tensor:
    """Perturb, clamp to the image range, then crop and flip each sample.

    Args:
        x: ``[B,C,H,W]`` uint8 (0..255) or floating image in [0, 1].
        raw: ``[B,C,H,W]`` floating, the generator's unbounded output.
        eps: L-inf budget on the [0, 1] scale.
        mode: ``MODE_CLAMP`` (delta = clamp(raw, -eps, eps)) or ``MODE_TANH`` (eps * tanh(raw)).
        crop: int64 ``[B,2]`` (top, left) of each window, or None for the centred window
            ``((H-h)//2, (W-w)//2)`` of every sample (the whole image when ``out_size`` is its size).
        flip: bool ``[B]``, horizontal flip of each window, or None.
        out_size: ``(h, w)`` of the window.

    Returns:
        ``[B,C,h,w]`` in raw's dtype, values in [0, 1].
    """
    compute = opmath_dtype(x.dtype, raw.dtype)
    xf = x.to(compute) * UINT8_SCALE if x.dtype == torch.uint8 else x.to(compute)
    rawf = raw.to(compute)
    delta = torch.clamp(rawf, -eps, eps) if mode == MODE_CLAMP else eps * torch.tanh(rawf)
    y = torch.clamp(xf + delta, 0.0, 1.0)
    y = crop_flip(y, crop, flip, out_size)
    return y.to(raw.dtype)


def crop_flip(
    y: torch.Tensor,
    crop: torch.Tensor | None,
    flip: torch.Tensor | None,
    out_size: tuple[int, int],
) -> torch.Tensor:
    """Per-sample window ``[top:top+h, left:left+w]`` of ``y`` ``[B,C,H,W]``, flipped where ``flip``.

    ``crop`` None: the centred window of every sample (a slice). Otherwise one gather, so autograd
    routes the gradient back exactly.
    """
    batch, _, height, width = y.shape
    h, w = out_size
    if crop is None:
        top, left = (height - h) // 2, (width - w) // 2
        windowed = y[:, :, top : top + h, left : left + w]
    else:
        rows = crop[:, 0:1].to(torch.int64) + torch.arange(h, device=y.device)  # [B,h]
        cols = crop[:, 1:2].to(torch.int64) + torch.arange(w, device=y.device)  # [B,w]
        batch_idx = torch.arange(batch, device=y.device)[:, None, None]
        # Advanced indexing with the channel slice in the middle puts the indexed dims first.
        windowed = y.permute(0, 2, 3, 1)[batch_idx, rows[:, :, None], cols[:, None, :]]
        windowed = windowed.permute(0, 3, 1, 2)
    if flip is not None:
        flipped = torch.flip(windowed, dims=(3,))
        windowed = torch.where(flip.view(-1, 1, 1, 1), flipped, windowed)
    return windowed


def embedding_reg(table: torch.Tensor, task_offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean within-task cosine and mean absolute cross-task cosine of stacked class embeddings.

    Args:
        table: ``[R, D]`` floating; task k owns rows ``task_offsets[k]:task_offsets[k+1]``.
        task_offsets: int64 ``[K+1]``, increasing, first 0, last R (any device).

    Returns:
        ``(intra, inter)``: 0-dim tensors in table's dtype. ``intra`` averages cos over the
        ``sum_k C_k (C_k-1)/2`` within-task pairs m<n; ``inter`` averages |cos| over the
        ``sum_{k<l} C_k C_l`` cross-task pairs. A mean over zero pairs is 0.
    """
    compute = opmath_dtype(table.dtype)
    t = table.to(compute)
    unit = t / t.norm(dim=1, keepdim=True).clamp_min(NORM_EPS)
    cos = unit @ unit.T
    within, cross = pair_masks(task_offsets, table.shape[0], table.device)
    # Masked sums over counts clamped at 1: a mean over no pairs is 0, with no host sync.
    intra = (cos * within).sum() / within.sum().clamp_min(1)
    inter = (cos.abs() * cross).sum() / cross.sum().clamp_min(1)
    return intra.to(table.dtype), inter.to(table.dtype)


def pair_masks(task_offsets: torch.Tensor, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``[R,R]`` masks of the upper-triangle (m<n) within-task and cross-task pairs."""
    offsets = task_offsets.to(device=device, dtype=torch.int64)
    sizes = offsets[1:] - offsets[:-1]
    task_of_row = torch.repeat_interleave(torch.arange(sizes.numel(), device=device), sizes, output_size=rows)
    same_task = task_of_row[:, None] == task_of_row[None, :]
    upper = torch.ones(rows, rows, dtype=torch.bool, device=device).triu(diagonal=1)
    return same_task & upper, ~same_task & upper


def quantize_export(x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a perturbed image for publication.

    Args:
        x: ``[N,C,H,W]`` uint8 clean image.
        delta: ``[N,C,H,W]`` floating perturbation on the [0, 1] scale. NaN entries count as 0
            (the pixel is left unchanged).

    Returns:
        ``(protected, delta_q)``: uint8 ``round(clamp(x + 255*delta, 0, 255))`` (half to even) and
        int8 ``protected - x``. Raises ``ValueError`` if some |protected - x| exceeds 127.
    """
    compute = opmath_dtype(delta.dtype)
    d = torch.nan_to_num(delta.to(compute), nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    protected = torch.round(torch.clamp(x.to(compute) + d * 255.0, 0.0, 255.0))
    diff = protected.to(torch.int16) - x.to(torch.int16)
    overflow = int((diff.abs() > 127).sum())
    if overflow:
        raise ValueError(
            f"quantize_export: {overflow} element(s) of delta move a pixel by more than 127/255; "
            "delta_q is int8, so |255*delta| must stay <= 127"
        )
    return protected.to(torch.uint8), diff.to(torch.int8)
