"""Moving the rows and columns of tensors sharded over the ranks: :func:`gather_rows` and
:func:`row_counts` (all-gathers), :func:`exchange_columns` (a differentiable all-to-all from column
blocks to row blocks), and :func:`side_group` for such collectives inside a forward or a backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .. import dist as job  # this package, looked up at call time (its ``info`` may be replaced)


def gather_rows(tensor: torch.Tensor, counts: Sequence[int] | None = None, group=None) -> torch.Tensor:
    """All ranks' ``[n_r, ...]`` tensors concatenated in rank order on every rank (``counts``: the
    row count of every rank when they differ; default: all equal). Not differentiable."""
    world = job.info().world_size
    if world == 1:
        return tensor
    counts = list(counts) if counts is not None else [tensor.shape[0]] * world
    size = max(counts)
    padded = torch.zeros((size, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


def row_counts(rows: int, group=None, device: torch.device | str | None = None) -> list[int]:
    """Every rank's ``rows`` (one small all-gather; ``[rows]`` for a single process). ``device``:
    where the exchange runs (None: this process's GPU under NCCL, which reduces GPU tensors only,
    else the CPU)."""
    if not job.info().distributed:
        return [rows]
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    mine = torch.tensor([rows], dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return [int(p) for p in parts]


_SIDE = None  # (the default group it was made for, the side group)


def side_group():
    """A process group of its own (gloo on the CPU) for collectives issued inside a forward or a
    backward, beside DistributedDataParallel's bucket all-reduces on the default group. Collective
    on first use: every rank must ask for it at the same point."""
    global _SIDE
    world = dist.group.WORLD
    if _SIDE is None or _SIDE[0] is not world:
        group = dist.new_group(backend="gloo", timeout=job._timeout()) if dist.get_backend() == "gloo" else dist.new_group(timeout=job._timeout())
        _SIDE = (world, group)
    return _SIDE[1]


class _ColumnExchange(torch.autograd.Function):
    """Forward: from ``[sum(rows), columns[me]]`` (every rank's rows, this rank's column block) to
    ``[rows[me], sum(columns)]`` (this rank's rows, every column block in rank order), by one
    all-to-all. Backward: the reverse all-to-all of the gradient."""

    @staticmethod
    def forward(ctx, block, rows, columns, group):
        me = dist.get_rank(group)
        ctx.rows, ctx.columns, ctx.group, ctx.me = rows, columns, group, me
        sent = [n * columns[me] for n in rows]
        received = [rows[me] * c for c in columns]
        out = block.new_empty(sum(received))
        dist.all_to_all_single(out, block.contiguous().view(-1), received, sent, group=group)
        return torch.cat([part.view(rows[me], c) for part, c in zip(out.split(received), columns)], dim=1)

    @staticmethod
    def backward(ctx, grad):
        rows, columns, me = ctx.rows, ctx.columns, ctx.me
        sent = [rows[me] * c for c in columns]
        received = [n * columns[me] for n in rows]
        flat = torch.cat([part.contiguous().view(-1) for part in grad.split(columns, dim=1)])
        out = grad.new_empty(sum(received))
        dist.all_to_all_single(out, flat, received, sent, group=ctx.group)
        return out.view(sum(rows), columns[me]), None, None, None


def exchange_columns(block: torch.Tensor, rows: Sequence[int], columns: Sequence[int], group=None) -> torch.Tensor:
    """Redistribute a matrix held by column blocks into one held by row blocks (differentiable).

    Args:
        block: ``[sum(rows), columns[rank]]``: every rank's rows (rank 0's first), this rank's
            columns.
        rows: the row count of every rank; columns: the column count of every rank (block widths).
    Returns:
        ``[rows[rank], sum(columns)]``: this rank's rows with all columns (rank 0's block first).
        The gradient flows back by the reverse exchange.
    """
    if not job.info().distributed:
        return block
    group = group if group is not None else dist.group.WORLD
    return _ColumnExchange.apply(block, list(rows), list(columns), group)
