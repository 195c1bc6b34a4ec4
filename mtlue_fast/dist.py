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
- gradients are averaged across ranks, which makes each rank's update that of the global-batch mean
  loss: by ``DistributedDataParallel`` (:func:`data_parallel`: bucketed all-reduces launched during
  the backward as the gradients become ready) wherever a step's gradients come from autograd, and by
  :func:`average_gradients` (one flat all-reduce after the backward) where they are written by hand
  (parameter-space gradient surgery) or live outside the wrapped module (a weighting's parameters);
- only rank 0 evaluates, writes checkpoints and reports, and shows progress.

Where the time of a CPU step goes, and what this module does about it: every synchronised batch
norm needs one all-reduce in its forward and one in its backward, and they cannot be merged (each
layer's statistics depend on the previous layer's normalised output, each layer's input gradient on
its global sums), so a ResNet-18 step has 40 collectives of a few hundred bytes, each on the critical
path. Over gloo one costs 0.2-0.3 ms on a 2-core VM (its thread hand-offs and loopback TCP, measured),
as much as a fifth of a victim step's compute in all. When every rank runs on one machine (checked
by opening one shared-memory file) they go through shared memory instead (:class:`_HostSum`: a few
microseconds), else over a gloo group of their own, where they never queue behind a gradient bucket's
all-reduce. The arithmetic around them is ATen's batch-norm kernels.
"""

from __future__ import annotations

import datetime
import gc
import inspect
import mmap
import os
import platform
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
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


def teardown() -> None:
    """Destroy the process groups. Objects that hold a group (a ``DistributedDataParallel`` reducer
    kept alive by a reference cycle) are collected first: destroyed only at interpreter exit, they
    take gloo's worker threads down with the interpreter, which aborts the process now and then
    ("terminate called without an active exception", seen in 1 of ~10 two-process test runs)."""
    global _STATS, _SIDE
    _STATS = _SIDE = None
    if dist.is_available() and dist.is_initialized():
        gc.collect()
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


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over the ranks of ``group`` (default: all), in place (identity for one process).
    Returns ``tensor``."""
    if info().distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
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


# ---------------------------------------------------------------------------- synchronised BN


class _GlooSum:
    """In-place sum over ranks of a float64 NumPy vector, over a gloo group of its own."""

    def __init__(self, group) -> None:
        self.group = group

    def sum_(self, values: np.ndarray) -> np.ndarray:
        all_reduce_sum(torch.from_numpy(values), self.group)
        return values


class _HostSum:
    """In-place sum over ranks of a small float64 NumPy vector through shared memory, for ranks that
    all run on this machine: the batch-norm statistics' all-reduces, which are latency-bound.

    A hand-written transport because torch offers none for this: gloo's small all-reduce crosses
    threads and loopback TCP (0.2-0.3 ms on a 2-core VM), torch's SyncBatchNorm refuses the CPU, and
    DistributedDataParallel only averages gradients. Here a call costs a few microseconds while the
    other ranks arrive at the same time, as they do at a batch norm.

    Layout of the segment: one sequence number per rank (a cache line each), the ranks' process ids,
    then two buffers of ``world`` slots of ``capacity`` float64. Call ``k`` uses buffer ``k % 2``: a
    rank writes its slot, then publishes ``k`` as its sequence number, waits until every rank has
    published ``k``, and sums the slots in rank order (the same bytes in the same order on every
    rank, so every rank gets the same result). A rank only writes buffer ``k % 2`` again at call
    ``k + 2``, after every rank has published ``k + 1``, i.e. finished reading call ``k``. The order of
    a rank's stores (data, then sequence number) and of its loads is kept by x86-64's memory model,
    which is why this runs on x86-64 only (elsewhere: gloo).

    Waiting polls for about 50 microseconds, then yields the core at every poll (so that a rank
    sharing a core with the one it waits for lets it run), then sleeps 0.2 ms between polls after
    10 ms. It gives up with an error when a rank's process has died, or after ``MTLUE_DIST_TIMEOUT``.
    """

    CAPACITY = 8192  # float64 per slot: 2C + 1 statistics, C <= 4095 channels
    _LINE = 8  # int64 per cache line

    def __init__(self, buffer: mmap.mmap, rank: int, world: int, timeout_s: float) -> None:
        self.buffer, self.rank, self.world, self.timeout_s = buffer, rank, world, timeout_s
        self.seq = 0
        self.check_pids = False  # set by connect() once every rank's process is seen alive
        self.flags = np.frombuffer(buffer, dtype=np.int64, count=world * self._LINE)
        self.pids = np.frombuffer(buffer, dtype=np.int64, count=world, offset=self.flags.nbytes)
        offset = -(-(self.flags.nbytes + self.pids.nbytes) // 64) * 64
        self.data = np.frombuffer(buffer, dtype=np.float64, count=2 * world * self.CAPACITY, offset=offset)
        self.data = self.data.reshape(2, world, self.CAPACITY)

    @classmethod
    def nbytes(cls, world: int) -> int:
        return -(-(world * (cls._LINE + 1) * 8) // 64) * 64 + 2 * world * cls.CAPACITY * 8

    @classmethod
    def connect(cls) -> _HostSum | None:
        """Collective: rank 0 creates a shared-memory file, every rank maps it; None on every rank
        unless every rank could (other machines, another /dev/shm, no /dev/shm)."""
        rank, world = dist.get_rank(), dist.get_world_size()
        path = None
        if rank == 0:
            try:
                path = f"/dev/shm/mtlue-stats-{uuid.uuid4().hex}"
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
                os.ftruncate(fd, cls.nbytes(world))
                os.close(fd)
            except OSError:
                path = None
        holder = [path]
        dist.broadcast_object_list(holder, src=0)
        path, reducer = holder[0], None
        if path is not None:
            try:
                fd = os.open(path, os.O_RDWR)
                try:
                    reducer = cls(mmap.mmap(fd, cls.nbytes(world)), rank, world, _timeout().total_seconds())
                finally:
                    os.close(fd)
                reducer.pids[rank] = os.getpid()
            except (OSError, ValueError):
                reducer = None
        ready = torch.tensor([1 if reducer is not None else 0])
        dist.all_reduce(ready, op=dist.ReduceOp.MIN)  # also: every rank has mapped it and written its pid
        if rank == 0 and path is not None:
            os.unlink(path)  # the mappings stay; nothing is left behind
        if not int(ready):
            return None
        reducer.check_pids = all(_alive(int(pid)) for pid in reducer.pids)  # same process-id namespace
        return reducer

    def sum_(self, values: np.ndarray) -> np.ndarray:
        n = values.size
        if n > self.CAPACITY:  # the same decision on every rank: the sizes are the same
            dist.all_reduce(torch.from_numpy(values), op=dist.ReduceOp.SUM)
            return values
        self.seq += 1
        slots = self.data[self.seq & 1, :, :n]
        slots[self.rank] = values
        self.flags[self.rank * self._LINE] = self.seq
        for q in range(self.world):
            self._wait(q)
        np.sum(slots, axis=0, out=values)
        return values

    def _wait(self, q: int) -> None:
        flag, seq = q * self._LINE, self.seq
        polls = 0
        while self.flags[flag] < seq:
            polls += 1
            if polls < 500:
                continue
            if polls == 500:
                since = time.monotonic()
            waited = time.monotonic() - since
            if waited < 0.01:
                os.sched_yield()
                continue
            time.sleep(2e-4)
            if polls % 256 == 0:
                pid = int(self.pids[q])
                if self.check_pids and not _alive(pid):
                    raise RuntimeError(f"rank {self.rank}: rank {q} (process {pid}) died during a synchronised batch norm")
                if waited > self.timeout_s:
                    raise RuntimeError(
                        f"rank {self.rank}: no batch-norm statistics from rank {q} within {self.timeout_s:.0f} s "
                        "(MTLUE_DIST_TIMEOUT); the ranks may have left the same sequence of batch norms"
                    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_STATS = None  # (the default group it was made for, the reducer)
_ONE = np.ones(1)


def _stats_reducer() -> _HostSum | _GlooSum:
    """The sum of the batch-norm statistics, made on first use (every rank reaches its first
    synchronised batch norm at the same point): :class:`_HostSum` where every rank runs on this
    x86-64 machine (``MTLUE_SHM_STATS=0`` turns it off), else :class:`_GlooSum`."""
    global _STATS
    world = dist.group.WORLD
    if _STATS is None or _STATS[0] is not world:  # none yet, or made for an earlier default group
        reducer = None
        use_shm = os.environ.get("MTLUE_SHM_STATS", "1") != "0" and platform.machine().lower() in ("x86_64", "amd64")
        if use_shm and dist.get_backend() == "gloo":
            reducer = _HostSum.connect()
        if reducer is None:
            group = dist.new_group(backend="gloo", timeout=_timeout()) if dist.get_backend() == "gloo" else world
            reducer = _GlooSum(group)
        _STATS = (world, reducer)
    return _STATS[1]


class _SyncBatchNormFunction(torch.autograd.Function):
    """Batch norm over the global batch: ATen's batch-norm kernels (in the input's dtype, no
    temporaries of another) around one all-reduce forward and one backward.

    Forward: this rank's per-channel mean and variance (ATen's statistics kernel: two-pass, float32
    also for a bfloat16 input), combined over ranks in float64 by one all-reduce of
    ``n * [mean, var + mean^2, 1]``; then ATen's evaluation-mode transform with the global
    statistics, which is what its training mode computes once it has them. The float64 combination
    keeps ``E[x^2] - E[x]^2`` exact to float32 precision: its inputs are statistics ATen already
    centred per rank, so nothing large cancels.

    Backward: ``grad_x = a * g - a * (sum_g + xhat * sum_gx) / n`` with ``a = weight * invstd``.
    ATen's evaluation-mode backward gives this rank's per-channel ``sum(g)`` and ``sum(g * xhat)``;
    after the all-reduce of the sums, the second term is ATen's evaluation-mode transform of ``x``
    with weight ``-a * sum_gx / n`` and bias ``-a * sum_g / n``, and ``a * g`` is added to it
    (float32: ``addcmul_``; bfloat16: ``a * g`` from the same ATen call, then added; both terms are
    then rounded to bfloat16 before they are added, one rounding more than ATen's single-process
    kernel makes).

    The per-channel arithmetic on the C statistics runs in NumPy on views of the CPU tensors: a
    torch operation costs microseconds of dispatch whatever its size, and with ~20 of them per layer
    and direction they cost a ResNet-18 step as much as the batch norms' own passes over the data.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, bn, reducer):
        c, eps = x.shape[1], bn.eps
        count = x.numel() // c
        if x.dtype == torch.float32:
            mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
        else:  # float32 scratch running statistics make ATen return float32 statistics, not x's dtype
            scratch = bn.scratch(c)
            mean, var = torch.batch_norm_update_stats(x, scratch[0], scratch[1], 0.0)
        mean64 = mean.numpy().astype(np.float64)
        stats = np.concatenate((mean64, var.numpy() + mean64 * mean64, _ONE)) * count
        reducer.sum_(stats)
        total = float(stats[-1])
        mean64 = stats[:c] / total
        var64 = np.maximum(stats[c : 2 * c] / total - mean64 * mean64, 0.0)
        stat_type = np.float64 if x.dtype == torch.float64 else np.float32  # ATen: float32 beside bf16/fp16
        mean, var = torch.from_numpy(mean64.astype(stat_type)), torch.from_numpy(var64.astype(stat_type))
        out = torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
        if bn.track_running_stats:  # NumPy views of the buffers: no torch dispatch for C values
            tracked = bn.num_batches_tracked.numpy()
            tracked += 1
            momentum = bn.momentum if bn.momentum is not None else 1.0 / float(tracked)
            running_mean, running_var = bn.running_mean.numpy(), bn.running_var.numpy()
            running_mean += momentum * (mean64 - running_mean)
            running_var += momentum * (var64 * (total / max(total - 1.0, 1.0)) - running_var)  # unbiased
        ctx.save_for_backward(x, weight)
        ctx.stats, ctx.eps, ctx.total, ctx.reducer = (mean, var), eps, total, reducer
        invstd = 1.0 / np.sqrt(var64 + eps)
        ctx.scale = invstd if weight is None else weight.detach().float().numpy() * invstd  # a
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        mean, var = ctx.stats
        fp32 = x.dtype == torch.float32 and grad_out.dtype == torch.float32
        # Evaluation mode: this rank's per-channel sum(g * xhat) and sum(g), and for a bfloat16
        # input a * g as well (measured fastest per dtype: ATen's float32 input-gradient kernel is
        # several times slower than the reduction, the transform and addcmul together).
        grad_x, sum_gx, sum_g = torch.ops.aten.native_batch_norm_backward(
            grad_out, x, weight, mean, var, None, None, False, ctx.eps, [not fp32, True, True]
        )
        sums = np.concatenate((sum_g.numpy(), sum_gx.numpy())).astype(np.float64)
        ctx.reducer.sum_(sums)
        scaled = (sums.reshape(2, -1) * (ctx.scale * (-1.0 / ctx.total))).astype(mean.numpy().dtype)
        bias, gain = torch.from_numpy(scaled[0]), torch.from_numpy(scaled[1])  # -a sum_g / n, -a sum_gx / n
        correction = torch.batch_norm(x, gain, bias, mean, var, False, 0.0, ctx.eps, False)
        if fp32:
            scale = torch.from_numpy(ctx.scale.astype(np.float32)).view([1, -1] + [1] * (x.dim() - 2))  # (fp32 only)
            grad_x = correction.addcmul_(grad_out, scale)
        else:
            grad_x += correction
        # Parameter gradients stay local: the gradient averaging averages them like every other one.
        if weight is None:
            return grad_x, None, None, None, None
        return grad_x, sum_gx.to(weight.dtype), sum_g.to(weight.dtype), None, None


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics cover the global batch of all ranks (CPU, gloo).

    With one process it is an ordinary ``BatchNorm2d``. Running statistics use the global mean and
    the unbiased global variance, so they stay identical on every rank.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        return _SyncBatchNormFunction.apply(x, self.weight, self.bias, self, _stats_reducer())

    def scratch(self, channels: int) -> torch.Tensor:
        """Two float32 rows of zeros (reused: ATen leaves them unchanged at momentum 0)."""
        buffer = getattr(self, "_scratch", None)
        if buffer is None or buffer.shape[1] != channels:
            buffer = self._scratch = torch.zeros(2, channels)
        return buffer


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


def gather_rows(tensor: torch.Tensor, counts: Sequence[int] | None = None, group=None) -> torch.Tensor:
    """All ranks' ``[n_r, ...]`` tensors concatenated in rank order on every rank (``counts``: the
    row count of every rank when they differ; default: all equal). Not differentiable."""
    world = info().world_size
    if world == 1:
        return tensor
    counts = list(counts) if counts is not None else [tensor.shape[0]] * world
    size = max(counts)
    padded = torch.zeros((size, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


def row_counts(rows: int, group=None, device: torch.device | str = "cpu") -> list[int]:
    """Every rank's ``rows`` (one small all-gather; ``[rows]`` for a single process)."""
    if not info().distributed:
        return [rows]
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
        group = dist.new_group(backend="gloo", timeout=_timeout()) if dist.get_backend() == "gloo" else dist.new_group(timeout=_timeout())
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
    if not info().distributed:
        return block
    group = group if group is not None else dist.group.WORLD
    return _ColumnExchange.apply(block, list(rows), list(columns), group)
