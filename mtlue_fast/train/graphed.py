"""A whole training step replayed as one CUDA graph.

On a GPU a small network's step is bound by the host: every kernel of the forward, the per-task
losses, the backward, the clipping and the optimiser is launched from Python, one by one. Capturing
the step once (``torch.cuda.CUDAGraph``) and replaying it launches all of them with one call.

:class:`GraphedStep` wraps any step ``fn(images, labels) -> tensor`` (the victim's
:class:`~mtlue_fast.train.victim.TrainStep`, the generator's step). What the step must satisfy, and
the package's steps do:

- no host reads (``mtlue_fast.host_reads``) and no data-dependent Python control flow;
- the optimiser built with ``capturable=True`` and a tensor learning rate (:func:`capturable_adam`),
  so the schedule's changes reach the replayed kernels (a float would be baked into the graph);
- it ends with ``optimizer.zero_grad(set_to_none=True)`` (the gradients the captured backward
  allocates then live in the graph's memory and are overwritten by every replay).

The first ``warmup`` calls run eagerly on a side stream (as the capture requires: lazy state such as
the optimiser's moments and cuDNN's algorithm choice is created outside the graph); the next call
captures and replays. A batch of another shape or dtype (the last, smaller batch of an epoch) runs
eagerly. If the capture fails, the step warns once and runs eagerly from then on.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

__all__ = ["GraphedStep", "capturable_adam"]


def capturable_adam(groups: list[dict], lr: float, device: torch.device, **kwargs) -> torch.optim.Adam:
    """``Adam`` whose step can be captured: ``capturable=True``, fused, and every group's learning rate
    a 0-dim tensor on ``device`` (LR schedulers then update it in place)."""
    for group in groups:
        group["lr"] = torch.tensor(float(group.get("lr", lr)), dtype=torch.float32, device=device)
    return torch.optim.Adam(groups, lr=torch.tensor(float(lr), device=device), capturable=True, fused=True, **kwargs)


def _structure(value) -> tuple:
    """Shapes and dtypes of a tensor or a dict of tensors: what a captured graph is specific to."""
    if isinstance(value, dict):
        return tuple((k, *_structure(v)) for k, v in sorted(value.items()))
    return (tuple(value.shape), value.dtype)


def _copy_into(static, value) -> None:
    if isinstance(static, dict):
        for k in static:
            static[k].copy_(value[k], non_blocking=True)
    else:
        static.copy_(value, non_blocking=True)


def _clone(value):
    return {k: v.clone() for k, v in value.items()} if isinstance(value, dict) else value.clone()


class GraphedStep:
    """Run ``fn(images, labels) -> tensor`` as a replayed CUDA graph (see the module docstring).

    Args:
        fn: the step; it must end by setting the gradients to None.
        warmup: eager calls before the capture (at least 1; 3 as in PyTorch's examples).
        label: names the step in the warning when capture fails.
    """

    def __init__(self, fn: Callable, *, warmup: int = 3, label: str = "step") -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {warmup}")
        self.fn, self.warmup, self.label = fn, warmup, label
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self.key: tuple | None = None
        self.static_in: tuple | None = None
        self.static_out: torch.Tensor | None = None
        self.replays = 0
        self.side: torch.cuda.Stream | None = None

    def __getattr__(self, name: str):  # the wrapped step's attributes (model, optimizer, ...)
        if name == "fn":
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __call__(self, images: torch.Tensor, labels) -> torch.Tensor:
        if images.device.type != "cuda" or self.failed:
            return self.fn(images, labels)
        key = (_structure(images), _structure(labels))
        if self.graph is not None:
            if key != self.key:
                return self.fn(images, labels)  # another shape: eager
            _copy_into(self.static_in[0], images)
            _copy_into(self.static_in[1], labels)
            self.graph.replay()
            self.replays += 1
            return _clone(self.static_out)
        self.calls += 1
        if self.calls <= self.warmup:
            return self._side_stream(images, labels)
        return self._capture(images, labels, key)

    def _side_stream(self, images, labels):
        if self.side is None:
            self.side = torch.cuda.Stream(images.device)
        side = self.side
        side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(side), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            out = self.fn(images, labels)
        torch.cuda.current_stream(images.device).wait_stream(side)
        return out

    def _capture(self, images, labels, key):
        self.static_in = (_clone(images), _clone(labels))
        graph = torch.cuda.CUDAGraph()
        try:
            torch.cuda.synchronize(images.device)
            # thread_local: a loader thread pinning host memory meanwhile does not spoil the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.static_out = self.fn(*self.static_in)
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to the eager step
            self.failed = True
            self.static_in = self.static_out = None
            optimizer = getattr(self.fn, "optimizer", None)
            if optimizer is not None:  # gradients allocated by the failed capture must not be used
                optimizer.zero_grad(set_to_none=True)
            warnings.warn(f"{self.label}: CUDA graph capture failed ({type(err).__name__}: {err}); "
                          "running the step eagerly", RuntimeWarning, stacklevel=3)  # fmt: skip
            torch.cuda.synchronize(images.device)
            return self.fn(images, labels)
        self.graph, self.key = graph, key
        _copy_into(self.static_in[0], images)
        _copy_into(self.static_in[1], labels)
        graph.replay()  # the capture itself ran nothing: this is the step for this batch
        self.replays += 1
        return _clone(self.static_out)
