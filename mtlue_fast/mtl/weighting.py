"""Task-weighting strategies (docs/method.md section 3): one small class each behind one interface.

``get(name, num_tasks, **options)`` builds one. Every strategy is an ``nn.Module`` (learnable
weights and running statistics live in its ``state_dict``, so checkpoints carry them) with

- ``backward(losses [K], grads: TaskGradients) -> weights [K] | None``: fill the parameters'
  ``.grad`` for this step and return the per-task weights it used (detached; None where the
  strategy has no such weights, e.g. PCGrad);
- ``epoch_end()``: called by the training loop after every epoch (DWA's loss history);
- ``needs_task_grads``: True when it needs the per-task gradient matrix of the shared part, which
  :class:`~mtlue_fast.mtl.task_grads.TaskGradients` computes in one batched pass.

Everything runs on the losses' device without host reads, and every step runs the same operations
whatever the values: nothing here keeps a CUDA graph from capturing the training step. The gradient
strategies' small solves on the ``[K, K]`` Gram matrix (:mod:`~mtlue_fast.mtl.gram_solvers`) are a bounded
number of batched operations, not loops over tiny tensors; random draws (PCGrad's orders, RLW's
weights) come from the device's default generator.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .gram_solvers import aligned_weights, fairgrad_weights, min_norm_weights, pcgrad_weights
from .task_grads import TaskGradients

__all__ = ["STRATEGIES", "Weighting", "fairgrad_weights", "get", "min_norm_weights"]


class Weighting(nn.Module):
    """Base class: equal weights through an ordinary backward."""

    name: ClassVar[str] = ""
    needs_task_grads: ClassVar[bool] = False
    #: Per-task gradients of one backbone layer (:meth:`TaskGradients.layer_grads`), through the
    #: backbone's backward.
    needs_layer_grads: ClassVar[bool] = False

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.num_tasks = num_tasks

    def backward(self, losses: torch.Tensor, grads: TaskGradients) -> torch.Tensor | None:
        raise NotImplementedError

    def epoch_end(self) -> None:
        """Hook after each training epoch (nothing by default)."""

    def attach(self, model: nn.Module) -> None:
        """Hook when training starts: look up what the strategy needs of ``model`` (nothing by
        default; GradNorm takes ``model.last_shared_layer.weight``)."""


class LossWeighting(Weighting):
    """A strategy that only rescales the losses: ``backward`` of ``sum_k w_k L_k``."""

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        """``[K]`` weights for this step (may carry a graph to learnable parameters)."""
        raise NotImplementedError

    def backward(self, losses: torch.Tensor, grads: TaskGradients) -> torch.Tensor:
        weights = self.weights(losses)
        grads.backward_weighted(weights)
        return weights.detach()


class GradientWeighting(Weighting):
    """A strategy that combines the per-task gradient matrix ``G [K, P]`` into one gradient."""

    needs_task_grads = True

    def combine(
        self, task_grads: torch.Tensor, losses: torch.Tensor, gram: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(combined [P], weights [K])`` from ``task_grads [K, P]`` float32: the strategies decide
        their weights from the Gram matrix ``G G^T`` (float64; computed here when None) and the
        losses alone, so under ``torch.distributed`` the global batch's Gram can be passed in."""
        if gram is None:
            gram = task_grads.double() @ task_grads.double().T
        weights = self.weights_from_gram(gram, losses).to(task_grads.dtype)
        return weights @ task_grads, weights

    def weights_from_gram(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """``[K]`` combination weights from the Gram matrix ``[K, K]`` and the losses ``[K]``."""
        raise NotImplementedError

    def backward(self, losses: torch.Tensor, grads: TaskGradients) -> torch.Tensor | None:
        with torch.no_grad():
            combined, weights = self.combine(grads.task_grads(), grads.global_losses(), grads.gram())
        grads.apply(combined)
        return weights


# ---------------------------------------------------------------------------- loss weighting


class EW(LossWeighting):
    """Equal weighting: ``sum_k L_k``."""

    name = "ew"

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(losses)


class UW(LossWeighting):
    """Uncertainty weighting (Kendall et al. 2018): ``sum_k L_k / (2 exp(s_k)) + s_k / 2``.

    ``s_k`` (log-variances, learnable, initialised ``init``) are trained with the model; a task whose
    loss stays large gets a larger ``s_k`` and so a smaller weight ``1 / (2 exp(s_k))``.
    """

    name = "uw"

    def __init__(self, num_tasks: int, init: float = -0.5) -> None:
        super().__init__(num_tasks)
        self.log_vars = nn.Parameter(torch.full((num_tasks,), float(init)))

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.exp(-self.log_vars)

    def backward(self, losses: torch.Tensor, grads: TaskGradients) -> torch.Tensor:
        weights = self.weights(losses)
        grads.backward_weighted(weights, extra=0.5 * self.log_vars.sum())
        return weights.detach()


class RLW(LossWeighting):
    """Random loss weighting (Lin et al. 2022): ``w = K * softmax(N(0, I))``, drawn every step.

    Draws use the default generator of the losses' device, whose state the training loop's
    checkpoints carry.
    """

    name = "rlw"

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        draw = torch.randn(self.num_tasks, device=losses.device)
        return self.num_tasks * torch.softmax(draw, dim=0)


class DWA(LossWeighting):
    """Dynamic weight average (Liu et al. 2019): ``w = K * softmax(r / T)``, ``r_k`` the ratio of the
    last two epochs' mean losses of task k; equal weights for the first two epochs.
    """

    name = "dwa"

    def __init__(self, num_tasks: int, temperature: float = 2.0) -> None:
        super().__init__(num_tasks)
        if temperature <= 0:
            raise ValueError(f"dwa temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.register_buffer("loss_sum", torch.zeros(num_tasks, dtype=torch.float64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.float64))
        self.register_buffer("history", torch.zeros(2, num_tasks, dtype=torch.float64))  # [t-2, t-1]
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.int64))

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        self.loss_sum += losses.detach().double()
        self.steps += 1
        ratio = self.history[1] / self.history[0].clamp_min(1e-12)
        dynamic = self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)
        ready = self.epochs_seen >= 2
        return torch.where(ready, dynamic, torch.ones_like(dynamic)).to(losses.dtype)

    def backward(self, losses: torch.Tensor, grads: TaskGradients) -> torch.Tensor:
        weights = self.weights(grads.global_losses())  # the history follows the global batch
        grads.backward_weighted(weights)
        return weights.detach()

    def epoch_end(self) -> None:
        mean = self.loss_sum / self.steps.clamp_min(1)
        self.history.copy_(torch.stack([self.history[1], mean]))
        self.loss_sum.zero_()
        self.steps.zero_()
        self.epochs_seen += 1


class GradNorm(LossWeighting):
    """GradNorm (Chen et al. 2018), ``alpha`` = 1.5.

    Weights ``w = K * softmax(theta)`` (always summing to K). Each step, with ``G_k`` the norm of
    ``w_k * dL_k/dW`` for the last shared layer's weight ``W`` and ``r_k`` task k's loss ratio
    ``L_k / L_k(0)`` relative to the mean ratio, ``theta`` gets the gradient of
    ``sum_k |G_k - mean(G) * r_k^alpha|`` (targets held constant); the model gets that of
    ``sum_k w_k L_k``.
    """

    name = "gradnorm"
    needs_layer_grads = True

    def __init__(self, num_tasks: int, alpha: float = 1.5) -> None:
        super().__init__(num_tasks)
        self.alpha = alpha
        self.theta = nn.Parameter(torch.zeros(num_tasks))
        self.register_buffer("initial_losses", torch.zeros(num_tasks))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))
        self._layer: list[torch.Tensor | None] = [None]  # a list: a Parameter attribute would be registered

    @property
    def layer(self) -> torch.Tensor | None:
        """The last shared layer's weight (set by :meth:`attach`)."""
        return self._layer[0]

    def attach(self, model: nn.Module) -> None:
        self._layer = [model.last_shared_layer.weight]

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return self.num_tasks * torch.softmax(self.theta, dim=0)

    def backward(self, losses: torch.Tensor, grads: TaskGradients) -> torch.Tensor:
        if self.layer is None:
            raise ValueError("gradnorm needs the last shared layer: call attach(model) first")
        detached = grads.global_losses().float()
        self.initial_losses.copy_(torch.where(self.started, self.initial_losses, detached))
        self.started.fill_(True)
        norms = grads.layer_grads(self.layer).flatten(1).float().norm(dim=1).detach()  # [K]
        with torch.enable_grad():
            weights = self.weights(losses)
            scaled = weights * norms
            ratio = detached / self.initial_losses.clamp_min(1e-12)
            target = scaled.mean().detach() * (ratio / ratio.mean()).pow(self.alpha)
            (self.theta.grad,) = torch.autograd.grad((scaled - target).abs().sum(), self.theta)
        grads.backward_weighted(weights.detach())
        return weights.detach()


# ---------------------------------------------------------------------------- gradient weighting


class PCGrad(GradientWeighting):
    """Projecting conflicting gradients (Yu et al. 2020).

    For each task i, its gradient is projected, against the other tasks' original gradients in a
    random order, onto the normal plane of every one it conflicts with (negative dot product); the
    results are summed. Every projected gradient stays a combination ``sum_j C_ij g_j`` of the
    originals, so the projections run on the Gram matrix ``G G^T`` (float64): one Gram product,
    :func:`~mtlue_fast.mtl.gram_solvers.pcgrad_weights` (two batched operations per projection
    round, all K tasks at once), one ``[K] x [K, P]`` product. The orders are drawn on the Gram
    matrix's device.
    """

    name = "pcgrad"

    def weights_from_gram(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        k = gram.shape[0]
        keys = torch.rand(k, k, device=gram.device)
        keys.fill_diagonal_(2.0)  # own task sorts last and is never used
        return pcgrad_weights(gram, keys.argsort(dim=1)[:, : k - 1])


class MGDA(GradientWeighting):
    """MGDA-UB (Sener & Koltun 2018): the min-norm convex combination of the task gradients.

    ``normalize``: how the gradients are scaled before solving: ``"none"`` (default), ``"l2"``,
    ``"loss"`` (divide by the task loss) or ``"loss+"`` (both). The found weights are applied to the
    unscaled gradients. In the default representation space this is the MGDA-UB bound.
    ``iterations``: active-set rounds of :func:`~mtlue_fast.mtl.gram_solvers.min_norm_weights`.
    """

    name = "mgda"
    NORMALIZATIONS = ("none", "l2", "loss", "loss+")

    def __init__(self, num_tasks: int, normalize: str = "none", iterations: int = 8) -> None:
        super().__init__(num_tasks)
        if normalize not in self.NORMALIZATIONS:
            raise ValueError(f"mgda normalize must be one of {self.NORMALIZATIONS}, got {normalize!r}")
        _check_iterations("mgda", iterations)
        self.normalize, self.iterations = normalize, iterations

    def weights_from_gram(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        scale = torch.ones(gram.shape[0], device=gram.device, dtype=torch.float64)
        if self.normalize in ("l2", "loss+"):
            scale = scale * torch.diagonal(gram).clamp_min(0).sqrt()
        if self.normalize in ("loss", "loss+"):
            scale = scale * losses.double()
        scale = scale.clamp_min(1e-20)
        weights = min_norm_weights(gram / (scale[:, None] * scale[None, :]), self.iterations)
        return weights / scale


class AlignedMTL(GradientWeighting):
    """Aligned-MTL (Senushkin et al. 2023): align the task gradients' principal components.

    With ``G G^T = V diag(lambda) V^T`` (components below a relative tolerance dropped), the
    aligned gradients are ``B G`` with ``B = sqrt(lambda_min) V diag(lambda^-1/2) V^T``: orthogonal
    with equal norms (a condition number of 1). The combined gradient is their sum,
    ``(B 1)^T G``, so its projections on all aligned gradients are equal. ``B 1`` comes from matrix
    iterations (:func:`~mtlue_fast.mtl.gram_solvers.aligned_weights`), not ``torch.linalg.eigh``,
    which reads its convergence flag back to the host.
    """

    name = "aligned_mtl"

    def weights_from_gram(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        return aligned_weights(gram)


class FairGrad(GradientWeighting):
    """FairGrad (Ban & Ji 2024), ``alpha`` = 1: weights solving ``G G^T w = w^(-1/alpha)`` (on the
    device, :func:`fairgrad_weights`), combined gradient ``w^T G``."""

    name = "fairgrad"

    def __init__(self, num_tasks: int, alpha: float = 1.0, iterations: int = 12) -> None:
        super().__init__(num_tasks)
        if alpha <= 0:
            raise ValueError(f"fairgrad alpha must be > 0, got {alpha}")
        _check_iterations("fairgrad", iterations)
        self.alpha, self.iterations = alpha, iterations

    def weights_from_gram(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        return fairgrad_weights(gram, self.alpha, self.iterations)


def _check_iterations(strategy: str, iterations: int) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"{strategy} iterations must be an integer >= 1, got {iterations!r}")


STRATEGIES: dict[str, type[Weighting]] = {
    cls.name: cls for cls in (EW, UW, RLW, DWA, GradNorm, PCGrad, MGDA, AlignedMTL, FairGrad)
}


def get(name: str, num_tasks: int, **options) -> Weighting:
    """Build the strategy called ``name`` (``ew``, ``uw``, ``rlw``, ``dwa``, ``gradnorm``, ``pcgrad``,
    ``mgda``, ``aligned_mtl``, ``fairgrad``) for ``num_tasks`` tasks with its ``options``."""
    try:
        cls = STRATEGIES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown weighting {name!r}; expected one of {', '.join(STRATEGIES)}") from None
    try:
        return cls(num_tasks, **options)
    except TypeError as err:
        raise ValueError(f"bad options for weighting {name!r}: {err}") from None
