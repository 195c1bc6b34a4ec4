"""Per-task gradients of the shared part of a multi-task network, in one batched backward pass.

A step of hard-parameter-sharing MTL computes K task losses from one shared representation. Loss
weighting strategies only need ``sum_k w_k L_k``; gradient strategies (PCGrad, MGDA, Aligned-MTL,
FairGrad) need the K gradients of the shared part as a matrix ``G [K, P]``. :class:`TaskGradients`
gives them that matrix with one vectorised backward (``is_grads_batched``: the K one-hot
cotangents are pushed through the graph together), never K retained passes, and writes the
combined gradient back.

Two spaces (``space``):

- ``"representation"`` (default): gradients with respect to the shared representation ``z``
  (``[B, rep_dim]``, or the dense feature map), so ``P = z.numel()``. The backward to ``z`` crosses
  only the task heads, and the backbone runs one ordinary backward with the combined ``dL/dz``:
  a step costs about what an equal-weight step costs. This is LibMTL's ``rep_grad`` mode and the
  definition of MGDA-UB.
- ``"parameters"``: gradients with respect to every shared parameter, ``P`` = their total size.
  Exact per-parameter surgery, but the batched backward crosses the backbone K times over (compute
  and memory grow with K).

Task-specific parameters (the heads) always receive the gradient of the unweighted sum of the task
losses: each head only sees its own task, so there is nothing to reconcile there.

Under ``torch.distributed`` (see :mod:`mtlue_fast.dist`) the strategies see the global batch: the
Gram matrix of the representation-space gradients is summed over ranks (each rank holds its own
samples' columns), parameter-space gradients and GradNorm's layer gradients are averaged, and
:meth:`TaskGradients.global_losses` averages the losses. The combined gradient is then applied
locally and averaged with every other gradient by the training loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import dist

SPACES = ("representation", "parameters")


class TaskGradients:
    """The backward of one training step.

    Args:
        losses: ``[K]`` per-task mean losses of this batch (graph attached).
        shared_parameters: the backbone's and projection's parameters.
        task_parameters: the heads' parameters.
        representation: the tensor the heads were applied to when it was cut from the shared graph:
            a detached leaf with ``requires_grad`` (``encoded.detach().requires_grad_()``); needed for
            ``"representation"``-space task gradients. None when the heads ran on ``encoded`` itself.
        encoded: the shared part's output that ``representation`` was detached from, or None.
        space: ``"representation"`` or ``"parameters"``.
        batched: every per-task gradient in one batched backward (default); False: one backward
            per task, for a network whose backward communicates (synchronised batch norms under
            ``torch.distributed``, in the backbone or in dense heads: a collective cannot run
            inside a batched backward).
    """

    def __init__(
        self,
        losses: torch.Tensor,
        shared_parameters: Sequence[torch.nn.Parameter],
        task_parameters: Sequence[torch.nn.Parameter],
        *,
        representation: torch.Tensor | None = None,
        encoded: torch.Tensor | None = None,
        space: str = "representation",
        batched: bool = True,
    ) -> None:
        if space not in SPACES:
            raise ValueError(f"grad space must be one of {', '.join(SPACES)}, got {space!r}")
        if (representation is None) != (encoded is None) or (representation is not None and not representation.is_leaf):
            raise ValueError("pass both encoded and its detached leaf copy representation, or neither")
        self.losses, self.space, self.batched = losses, space, batched
        self.shared = [p for p in shared_parameters if p.requires_grad]
        self.task = [p for p in task_parameters if p.requires_grad]
        self.representation, self.encoded = representation, encoded
        self._grads: torch.Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return self.losses.shape[0]

    def backward_weighted(self, weights: torch.Tensor, extra: torch.Tensor | None = None) -> None:
        """Ordinary backward of ``sum_k weights_k * losses_k (+ extra)`` into every ``.grad``
        (``extra``: a scalar term of the strategy's own parameters, e.g. UW's regulariser)."""
        total = (weights.to(self.losses.dtype) * self.losses).sum()
        if extra is not None:
            total = total + extra
        total.backward()
        if self.representation is not None:
            self.encoded.backward(self.representation.grad)

    def _per_task(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``[K, *input.shape]`` per input: the gradients of every task loss, zeros where an input
        does not reach a loss. One batched backward of the K one-hot cotangents, or (``batched``
        False) K ordinary backwards stacked the same way, each running the same collectives in the
        same order on every rank."""
        eye = torch.eye(self.num_tasks, dtype=self.losses.dtype, device=self.losses.device)
        if self.batched:
            grads = torch.autograd.grad(self.losses, inputs, eye, retain_graph=True, is_grads_batched=True, allow_unused=True)
        else:
            per_task = [torch.autograd.grad(self.losses, inputs, row, retain_graph=True, allow_unused=True) for row in eye]
            grads = [None if all(g is None for g in column) else torch.stack([torch.zeros_like(x) if g is None else g for g in column])
                     for column, x in zip(zip(*per_task), inputs)]  # fmt: skip
        return [torch.zeros(self.num_tasks, *x.shape, dtype=x.dtype, device=x.device) if g is None else g for g, x in zip(grads, inputs)]

    def task_grads(self) -> torch.Tensor:
        """``G [K, P]`` float32: row k is the gradient of ``losses[k]`` (computed once, cached)."""
        if self._grads is None:
            if self.space == "representation":
                if self.representation is None:
                    raise ValueError("representation-space task gradients need representation and encoded")
                (grad,) = self._per_task([self.representation])
                self._grads = grad.reshape(self.num_tasks, -1).float()
            else:
                rows = [g.reshape(self.num_tasks, -1).float() for g in self._per_task(self.shared)]
                self._grads = torch.cat(rows, dim=1)
                world = dist.info().world_size
                if world > 1:  # every rank's parameters are the same: average to the global gradient
                    self._grads = dist.all_reduce_sum(self._grads) / world
        return self._grads

    def gram(self) -> torch.Tensor:
        """``G G^T [K, K]`` float64 of the global batch's task gradients (summed over ranks)."""
        grads = self.task_grads().double()
        gram = grads @ grads.T
        world = dist.info().world_size
        if world > 1 and self.space == "representation":
            # Rank r holds the columns of its samples, each 1/world of the global mean's gradient.
            gram = dist.all_reduce_sum(gram) / world**2
        return gram

    def global_losses(self) -> torch.Tensor:
        """``[K]`` detached losses of the global batch (the mean over ranks)."""
        losses = self.losses.detach().clone()
        world = dist.info().world_size
        return dist.all_reduce_sum(losses) / world if world > 1 else losses

    def layer_grads(self, weight: torch.Tensor) -> torch.Tensor:
        """``[K, *weight.shape]``: per-task gradients of one shared tensor (GradNorm's last layer)."""
        (grad,) = self._per_task([weight])
        world = dist.info().world_size
        return dist.all_reduce_sum(grad.detach().clone()) / world if world > 1 else grad

    def apply(self, combined: torch.Tensor) -> None:
        """Write ``combined [P]`` as the shared gradient; heads get the unweighted sum's gradient."""
        if self.task:
            self.losses.sum().backward(inputs=self.task)
        if self.space == "representation":
            self.encoded.backward(combined.reshape(self.encoded.shape).to(self.encoded.dtype))
            return
        offset = 0
        for p in self.shared:
            part = combined[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
            # empty_like keeps p's strides (channels-last weights): fused optimisers require
            # gradients laid out like their parameters.
            p.grad = torch.empty_like(p).copy_(part) if p.grad is None else p.grad.add_(part)
