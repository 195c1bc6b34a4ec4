"""The generator's label prior split across processes by output channel (several CPU processes).

In the fast path (:class:`~mtlue_fast.models.generator.MTLGenerator`) every process of a
data-parallel step computes the first transposed convolution's response to every class map
(``_padded_responses``: ``[N*K, c1*2S_h*2S_w]``, forward and backward): the same work in every
process whatever its share of the batch. For the 40-attribute CelebA generator at width 0.25 with
16 images per process on one thread it is 118 ms of a 406 ms step (AMD EPYC, measured), so two
processes cannot approach twice one process's speed while each repeats it.

Split by output channel, process ``r`` computes only its block of the c1 channels: the responses of
that block, and that block of the prior for the *global* batch (the processes' label matrices are
gathered first: ``B x N*K`` values). One all-to-all then gives every process all channels of its
own samples. The backward runs the reverse all-to-all, so each process holds the gradient of its
channel block for the global batch and back-propagates through its part of the responses. The
table's and the first ConvT's gradients are then partial sums over channel blocks, which
DistributedDataParallel's average adds up like any other gradient (the sum over blocks of the
global-batch gradient, divided by the process count: the same average as the plain path's).

The all-to-all moves ``B_r x c1*2S_h*2S_w`` values each way and the table has ``N*K`` such rows,
so the split is used while a process's rows are at most the table's (``sum(B_r) <= world * N*K``);
above that, and with fewer channels than processes, the plain path runs. Only in training steps
with gradients (the export and the stop test keep the plain path, so the export stays the
single-process one byte for byte); on the CPU only (GPUs: not measured).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from .. import dist


def split_prior(generator, padded: torch.Tensor, group) -> torch.Tensor:
    """``[B_r, c1*2S_h*2S_w]``: this process's samples' prior, each process computing one block of
    the output channels for the global batch. ``padded``: this process's padded label matrix
    ``[B_r, N*K]`` (no gradient). Collective: every process of ``group`` calls it at the same step."""
    rows = dist.row_counts(padded.shape[0], group, padded.device)
    world, channels = len(rows), generator.up1.out_channels
    if sum(rows) > world * padded.shape[1] or channels < world:  # the same decision on every rank
        return padded @ generator._padded_responses()
    blocks = np.array_split(np.arange(channels), world)
    mine = blocks[dist.info().rank]
    pixels = generator.up1_size[0] * generator.up1_size[1]
    responses = generator._padded_responses(slice(int(mine[0]), int(mine[-1]) + 1))  # [N*K, |block|*pixels]
    labels = dist.gather_rows(padded.detach(), rows, group)  # [sum(B_r), N*K]
    part = (labels.to(responses.dtype) @ responses).float()  # float32 over the wire (gloo and bf16)
    return dist.exchange_columns(part, rows, [len(b) * pixels for b in blocks], group)


def enable(generator) -> bool:
    """Route ``generator``'s training-step prior through :func:`split_prior` when this is one of
    several CPU processes and the generator takes the fast path (``MTLUE_SPLIT_PRIOR=0``: never);
    returns whether it did. Collective (it makes the side group on first use): call it on every rank."""
    if os.environ.get("MTLUE_SPLIT_PRIOR", "1") == "0" or not dist.info().distributed:
        return False
    if not getattr(generator, "fast", False) or not hasattr(generator, "prior_override"):
        return False  # a dense generator, or the straightforward path
    if next(generator.parameters()).device.type != "cpu":
        return False
    generator.prior_override = functools.partial(split_prior, group=dist.side_group())
    return True
