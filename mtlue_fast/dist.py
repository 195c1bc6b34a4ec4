"""Multi-process training with ``torch.distributed`` (torchrun): setup, gradient averaging, sync BN.

A single process is the same code with world size 1 (every helper is then a no-op). Under
``torchrun`` the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...) selects
the process group: NCCL on GPUs, gloo on the CPU, with a timeout on every collective
(``MTLUE_DIST_TIMEOUT`` seconds, default 600) so a dead rank ends the run instead of hanging it.

Replication scheme (what keeps results independent of the number of processes):

- every rank builds the same model from the same seed and draws the same random numbers;
- the data is sharded by :class:`~mtlue_fast.data.loader.DeviceBatches` (rank r takes every N-th
  sample of one global permutation), so the N per-rank batches of a step are one global batch;
- batch normalisation is synchronised (statistics over the global batch): ``torch.nn.SyncBatchNorm``
  on GPUs, :class:`CpuSyncBatchNorm` on the CPU, where torch's refuses to run;
- after the backward, gradients are averaged across ranks (:func:`average_gradients`), which makes
  each rank's update that of the global-batch mean loss;
- only rank 0 evaluates, writes checkpoints and reports, and shows progress.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

DEFAULT_TIMEOUT_S = 600


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def info() -> DistInfo:
    """The current process group's rank and size (world size 1 when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return DistInfo()


def setup(device_type: str) -> DistInfo:
    """Join the torchrun job described by the environment (nothing to do for a single process).

    Args:
        device_type: ``"cuda"`` (NCCL, one GPU per local rank) or ``"cpu"`` (gloo).

    Raises:
        RuntimeError: the rendezvous fails or times out (the message says which variables to check).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or dist.is_initialized():
        return info()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=float(os.environ.get("MTLUE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    except Exception as err:  # noqa: BLE001 - re-raised with what to check
        raise RuntimeError(
            f"rank {rank}/{world_size}: could not join the process group ({backend}) within {timeout}: {err}; "
            "check MASTER_ADDR/MASTER_PORT (or torchrun's --rdzv-endpoint) and that every rank was started"
        ) from err
    return info()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if info().distributed:
        dist.barrier()


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """The per-process batch of a global batch; the world size must divide it."""
    if global_batch % world_size:
        raise ValueError(
            f"the global batch size {global_batch} is not divisible by the {world_size} processes; "
            "choose a batch size that is a multiple of the process count"
        )
    return global_batch // world_size


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (identity for one process). Returns ``tensor``."""
    if info().distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not info().distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Replace every ``.grad`` by its mean over ranks (one flat all-reduce per dtype and device).

    A parameter without a gradient on this rank contributes zeros, so all ranks take part in the
    same collectives.
    """
    world = info().world_size
    if world == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    groups: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        groups.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in groups.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= world
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def broadcast_parameters(module: nn.Module) -> None:
    """Rank 0's parameters and buffers everywhere (a safety net after construction)."""
    if not info().distributed:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


# ---------------------------------------------------------------------------- synchronised BN


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over the global batch: per-channel sums all-reduced in forward and backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        dims = [0] + list(range(2, x.dim()))
        x32 = x.float()
        # Sums in float64: E[x^2] - E[x]^2 in float32 loses digits when the mean is large.
        x64 = x.double()
        stats = torch.cat([x64.sum(dims), (x64 * x64).sum(dims), x64.new_tensor([x64.numel() / x64.shape[1]])])
        all_reduce_sum(stats)
        c = x.shape[1]
        count = stats[-1]
        mean64 = stats[:c] / count
        var64 = (stats[c : 2 * c] / count - mean64 * mean64).clamp_min(0)
        mean, var, count = mean64.float(), var64.float(), count.float()
        invstd = torch.rsqrt(var + eps)
        shape = [1, c] + [1] * (x.dim() - 2)
        xhat = (x32 - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, weight, invstd, count)
        out = xhat * weight.float().view(shape) + bias.float().view(shape)
        return out.to(x.dtype), mean, var * count / (count - 1).clamp_min(1)

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        xhat, weight, invstd, count = ctx.saved_tensors
        dims = [0] + list(range(2, xhat.dim()))
        c = xhat.shape[1]
        shape = [1, c] + [1] * (xhat.dim() - 2)
        g = grad_out.float()
        local = torch.cat([g.sum(dims), (g * xhat).sum(dims)])
        grad_bias_local, grad_weight_local = local[:c].clone(), local[c:].clone()
        all_reduce_sum(local)
        sum_g, sum_gx = local[:c], local[c:]
        grad_x = (weight.float() * invstd).view(shape) * (g - (sum_g.view(shape) + xhat * sum_gx.view(shape)) / count)
        # Parameter gradients stay local: average_gradients() averages them like every other one.
        return grad_x.to(grad_out.dtype), grad_weight_local.to(weight.dtype), grad_bias_local.to(weight.dtype), None


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics cover the global batch of all ranks (CPU, gloo).

    With one process it is an ordinary ``BatchNorm2d``. Running statistics use the global mean and
    the unbiased global variance, so they stay identical on every rank.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and info().distributed):
            return super().forward(x)
        out, mean, var = _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(var.to(self.running_var.dtype), alpha=momentum)
        return out


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Every ``BatchNorm2d`` synchronised across ranks (unchanged for a single process)."""
    if not info().distributed:
        return module
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, CpuSyncBatchNorm):
        sync = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        sync.load_state_dict(module.state_dict())
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        setattr(module, name, _convert_cpu(child))
    return module


def gather_rows(tensor: torch.Tensor, counts: Sequence[int] | None = None) -> torch.Tensor:
    """All ranks' ``[n_r, ...]`` tensors concatenated in rank order on every rank (``counts``: the
    row count of every rank when they differ; default: all equal)."""
    world = info().world_size
    if world == 1:
        return tensor
    counts = list(counts) if counts is not None else [tensor.shape[0]] * world
    size = max(counts)
    padded = torch.zeros((size, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)])
