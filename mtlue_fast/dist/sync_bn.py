"""The synchronised batch norm on the CPU (:class:`CpuSyncBatchNorm`, :func:`convert_sync_batchnorm`)
and the sum of its statistics over the ranks (:class:`_GlooSum`: a gloo group of its own).

Every synchronised batch norm needs one all-reduce in its forward and one in its backward, and they
cannot be merged (each layer's statistics depend on the previous layer's normalised output, each
layer's input gradient on its global sums), so a ResNet-18 step has 40 collectives of a few hundred
bytes, each on the critical path. They go over a gloo group of their own, where they never queue
behind a gradient bucket's all-reduce; one costs 0.2-0.5 ms on a 2-core machine (gloo's thread
hand-offs and loopback TCP, measured) and waits for the slower rank. Two such processes train a
victim slower than one, which is why ``train.sync_bn`` defaults to per-process batch norms for CPU
jobs (the numbers: :meth:`mtlue_fast.train.TrainConfig.resolved`); this module serves the runs that
need the global-batch statistics (``train.sync_bn=true``) and the generator. The arithmetic around
the all-reduces is ATen's batch-norm kernels.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import dist as job  # this package, looked up at call time (its ``info`` may be replaced)


class _GlooSum:
    """In-place sum over ranks of a float64 NumPy vector, over a gloo group of its own."""

    def __init__(self, group) -> None:
        self.group = group

    def sum_(self, values: np.ndarray) -> np.ndarray:
        job.all_reduce_sum(torch.from_numpy(values), self.group)
        return values


_STATS = None  # (the default group it was made for, the reducer)
_ONE = np.ones(1)


def _stats_reducer() -> _GlooSum:
    """The sum of the batch-norm statistics, made on first use (every rank reaches its first
    synchronised batch norm at the same point): over a gloo group of its own under a gloo job, over
    the default group otherwise."""
    global _STATS
    world = dist.group.WORLD
    if _STATS is None or _STATS[0] is not world:  # none yet, or made for an earlier default group
        group = dist.new_group(backend="gloo", timeout=job._timeout()) if dist.get_backend() == "gloo" else world
        _STATS = (world, _GlooSum(group))
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
    if not job.info().distributed:
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
