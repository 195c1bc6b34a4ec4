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
  on GPUs, :class:`CpuSyncBatchNorm` on the CPU, where torch's refuses to run. The generator's batch
  norms always are; a victim's follow ``train.sync_bn``, whose default on the CPU is per-process
  batch norms (faster over gloo, but the result then depends on the process count; see
  :meth:`mtlue_fast.train.TrainConfig.resolved`);
- gradients are averaged across ranks, which makes each rank's update that of the global-batch mean
  loss: by ``DistributedDataParallel`` (:func:`data_parallel`: bucketed all-reduces launched during
  the backward as the gradients become ready) wherever a step's gradients come from autograd, and by
  :func:`average_gradients` (one flat all-reduce after the backward) where they are written by hand
  (parameter-space gradient surgery) or live outside the wrapped module (a weighting's parameters);
- the cache build, the evaluation, the export and its image files are split over the ranks; only
  rank 0 assembles them, writes checkpoints and reports, and shows progress.

Waits: collectives fail after ``MTLUE_DIST_TIMEOUT``; the waits between stages (:func:`barrier`,
:func:`broadcast_object`) have no timer and end only when a rank dies (:mod:`.liveness`:
heartbeats in the job's store), so rank 0 may work alone for as long as it takes.

This package is the import surface (``from mtlue_fast import dist``). This module holds the process
group and the data parallelism: setup and teardown, the process's place, barriers and broadcasts,
per-rank batches, DDP wrapping and gradient averaging. The synchronised batch norm (its statistics
summed over a gloo group of their own) is in :mod:`.sync_bn`, the row and column exchanges of
sharded tensors in :mod:`.exchange`; both are re-exported here.
"""

from __future__ import annotations

import datetime
import gc
import inspect
import os
from collections.abc import Iterable
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
        return DistInfo(dist.get_rank(), dist.get_world_size(), _local_rank(dist.get_rank()))
    return DistInfo()


def _local_rank(rank: int, device_type: str | None = None) -> int:
    """This process's index on its host: ``LOCAL_RANK`` (torchrun sets it); without it, the global
    rank, wrapped around the visible GPUs for a CUDA job (one host)."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    if device_type == "cuda" or (device_type is None and torch.cuda.is_available() and dist.get_backend() == "nccl"):
        return rank % max(1, torch.cuda.device_count())
    return rank


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
    rank = int(os.environ["RANK"])
    local_rank = _local_rank(rank, device_type)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        gpus = torch.cuda.device_count()
        if local_rank >= gpus:
            raise RuntimeError(
                f"rank {rank}/{world_size}: local rank {local_rank} needs GPU {local_rank}, but this host shows "
                f"{gpus} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); start at most "
                f"{gpus} processes per host (torchrun --nproc-per-node={gpus}) or pass --device cpu"
            )
        torch.cuda.set_device(local_rank)
    timeout = _timeout()
    if device_type != "cuda":
        _fit_threads(world_size)
    try:
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    except Exception as err:  # noqa: BLE001 - re-raised with what to check
        raise RuntimeError(
            f"rank {rank}/{world_size}: could not join the process group ({backend}) within {timeout}: {err}; "
            "check MASTER_ADDR/MASTER_PORT (or torchrun's --rdzv-endpoint) and that every rank was started"
        ) from err
    liveness.start(rank, world_size)
    return info()


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("MTLUE_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))


def _fit_threads(world_size: int) -> None:
    """On the CPU, keep this host's processes from oversubscribing its cores: with torch's default
    thread count (one per core) in every process, N processes run N times as many OpenMP threads as
    there are cores, which spin-wait on each other and slow the job 10-100x. ``OMP_NUM_THREADS``
    (torchrun sets 1) is the caller's choice and kept, and so is a smaller ``torch.set_num_threads``."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    cores = os.cpu_count() or 1
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() * local > cores:
        torch.set_num_threads(max(1, cores // local))


def teardown(failed: bool = False) -> None:
    """Destroy the process groups. Objects that hold a group (a ``DistributedDataParallel`` reducer
    kept alive by a reference cycle) are collected first: destroyed only at interpreter exit, they
    take gloo's worker threads down with the interpreter, which aborts the process now and then
    ("terminate called without an active exception", seen in 1 of ~10 two-process test runs).

    ``failed``: this process is ending with an error. NCCL's orderly destruction first lets every
    collective finish, and so waits for ranks that may never take part in one again; a failed
    NCCL process aborts its communicators instead, so that it exits and torchrun ends the job."""
    sync_bn._STATS = exchange._SIDE = None  # the caches made for this group
    liveness.stop()
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        if failed and dist.get_backend() == "nccl":
            _abort_process_groups()
        else:
            dist.destroy_process_group()


def _abort_process_groups() -> None:
    """Abort every process group of this process without waiting for the other ranks (torch's
    experimental abort, NCCL only; where this torch lacks it, the orderly destruction)."""
    from torch.distributed import distributed_c10d

    abort = getattr(distributed_c10d, "_abort_process_group", None)
    if abort is None:
        dist.destroy_process_group()
    else:
        abort()


def barrier(what: str = "waiting for the other ranks") -> None:
    """Wait for every rank, however long the slowest takes; a rank that dies meanwhile ends the wait
    with :class:`RankDiedError` naming it (:mod:`.liveness`: the store, not a timed collective).
    ``what`` says in that error what this rank was waiting for."""
    if info().distributed:
        liveness.barrier(what)


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """The per-process batch of a global batch; the world size must divide it."""
    if global_batch % world_size:
        raise ValueError(
            f"the global batch size {global_batch} is not divisible by the {world_size} processes; "
            "choose a batch size that is a multiple of the process count"
        )
    return global_batch // world_size


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over the ranks of ``group`` (default: all), in place (identity for one process).
    Returns ``tensor``."""
    if info().distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def broadcast_object(obj, what: str = "waiting for rank 0"):
    """Rank 0's small picklable ``obj`` on every rank, however late rank 0 arrives (through the
    store, like :func:`barrier`)."""
    if not info().distributed:
        return obj
    return liveness.broadcast_object(obj, what)


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


def data_parallel(module: nn.Module, *, bucket_cap_mb: float | None = None, find_unused_parameters: bool = False,
                  sync_buffers: bool = False) -> nn.Module:
    """``module`` in ``DistributedDataParallel`` (``module`` itself for a single process).

    Calling the wrapper runs ``module.forward`` and arms the gradient averaging of the backward
    that follows: gradients are summed into buckets in the order the backward produces them and
    each bucket's all-reduce (already divided by the world size) starts as soon as it is full, so
    communication overlaps the rest of the backward. Every parameter of ``module`` must receive
    its gradient through autograd in that backward, exactly once (one ``backward`` call, or several
    that each reach a disjoint part of the parameters); gradients written by hand to ``.grad`` are
    not seen and would stall the reduction (use :func:`average_gradients` there). A module with
    parameters that a step does not use needs ``find_unused_parameters`` (a graph traversal per step).

    Buffers are not broadcast before each forward: the synchronised batch norms keep their running
    statistics identical on every rank. ``sync_buffers`` broadcasts rank 0's buffers before each
    forward instead (one coalesced broadcast), for per-process batch norms whose running statistics
    would otherwise drift apart. ``bucket_cap_mb`` (default: DDP's) sets the bucket size.
    """
    place = info()
    if not place.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    accepted = inspect.signature(DistributedDataParallel.__init__).parameters
    options: dict = {"gradient_as_bucket_view": True, "find_unused_parameters": find_unused_parameters}
    # torch >= 2.13 renamed broadcast_buffers; older versions only know the old name.
    options["forward_sync_buffers" if "forward_sync_buffers" in accepted else "broadcast_buffers"] = sync_buffers
    if "batched_grad_copy" in accepted:  # one copy per bucket instead of one per parameter
        options["batched_grad_copy"] = True
    if bucket_cap_mb is not None:
        options["bucket_cap_mb"] = bucket_cap_mb
    device = next(module.parameters()).device
    if device.type == "cuda":
        options["device_ids"] = [device.index if device.index is not None else place.local_rank]
    return DistributedDataParallel(module, **options)


def broadcast_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (batch-norm running statistics and counters) on every rank, one broadcast
    per dtype: what ``DistributedDataParallel(broadcast_buffers=True)`` does before each forward,
    for a module that is not wrapped in it."""
    if not info().distributed:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for buffers in by_dtype.values():
        flat = torch.cat([b.detach().reshape(-1) for b in buffers])
        dist.broadcast(flat, src=0)
        offset = 0
        for b in buffers:
            b.data.copy_(flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


def broadcast_parameters(module: nn.Module) -> None:
    """Rank 0's parameters and buffers everywhere (a safety net after construction)."""
    if not info().distributed:
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


# The other modules look this one up at call time (``job.info()``...), so they are imported last;
# ``_stats_reducer`` is re-exported for the tests that call the statistics' sum directly.
from . import exchange, liveness, sync_bn  # noqa: E402
from .exchange import exchange_columns, gather_rows, row_counts, side_group  # noqa: E402
from .liveness import RankDiedError  # noqa: E402
from .sync_bn import CpuSyncBatchNorm, _stats_reducer, convert_sync_batchnorm  # noqa: E402

__all__ = [
    "DEFAULT_TIMEOUT_S", "CpuSyncBatchNorm", "DistInfo", "RankDiedError", "all_reduce_sum", "average_gradients", "barrier",
    "broadcast_buffers", "broadcast_object", "broadcast_parameters", "convert_sync_batchnorm", "data_parallel",
    "exchange_columns", "gather_rows", "info", "per_rank_batch", "row_counts", "setup", "side_group", "teardown",
]  # fmt: skip
