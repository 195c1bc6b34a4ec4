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
- it sets the gradients to None with ``optimizer.zero_grad(set_to_none=True)``, before its
  backward or after its optimiser step (the gradients the captured backward allocates then live in
  the graph's memory and are overwritten by every replay).

The first ``warmup`` calls run eagerly on a side stream (as the capture requires: lazy state such as
the optimiser's moments and cuDNN's algorithm choice is created outside the graph); the next call
captures and replays. A batch of another shape or dtype (the last, smaller batch of an epoch) runs
eagerly.

A step that synchronises with the host cannot be captured, and a failed capture can leave CUDA state
behind (the capture stream current, the random generator marked as capturing). So the last warm-up
call runs under ``torch.cuda.set_sync_debug_mode("warn")``: a synchronising call there (a host read,
a copy from pageable host memory) means no capture is tried, and the warning names the line that
made it. If the capture fails anyway, that state is undone. Either way the step warns once and runs
eagerly from then on.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import torch

from ..devices import cuda_index
from . import checkpoint

__all__ = ["GraphedStep", "capturable_adam", "graph_status"]


def capturable_adam(groups: list[dict], lr: float, device: torch.device, **kwargs) -> torch.optim.Adam:
    """``Adam`` whose step can be captured: ``capturable=True``, fused, and every group's learning rate
    a 0-dim tensor on ``device`` (LR schedulers then update it in place).

    ``load_state_dict`` keeps those tensors: it copies the saved values into them. (By default it
    puts the saved tensors in their place: read with ``map_location="cpu"`` they live on the host,
    where the fused step reads them back on every call, and a graph captured with them never sees
    the schedule's changes.)"""
    for group in groups:
        group["lr"] = torch.tensor(float(group.get("lr", lr)), dtype=torch.float32, device=device)
    optimizer = torch.optim.Adam(groups, lr=torch.tensor(float(lr), device=device), capturable=True, fused=True, **kwargs)
    checkpoint.keep_setup_on_load(optimizer)
    return optimizer


def graph_status(step) -> str | None:
    """What became of a step's CUDA graph, for benchmark records: ``"replayed N times"``,
    ``"not captured: ran eagerly"`` (it synchronised, or its capture failed: warned), ``"not
    captured yet"``; None for a step that is not a :class:`GraphedStep`."""
    if not isinstance(step, GraphedStep):
        return None
    if step.failed:
        return "not captured: ran eagerly"
    return f"replayed {step.replays} times" if step.graph is not None else "not captured yet"


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
        fn: the step; it must set the gradients to None (see the module docstring).
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
        if self.calls < self.warmup:
            return self._side_stream(images, labels)
        if self.calls == self.warmup:
            out, syncs = _watching_syncs(lambda: self._side_stream(images, labels))
            if syncs:
                self._give_up(f"it synchronises with the host ({'; '.join(syncs)})", stacklevel=3)
            return out
        return self._capture(images, labels, key)

    def _give_up(self, why: str, stacklevel: int = 4) -> None:
        """Warn (at the step's caller) and run eagerly from now on."""
        self.failed = True
        warnings.warn(f"{self.label}: not replayed as a CUDA graph: {why}; running the step eagerly", RuntimeWarning,
                      stacklevel=stacklevel)  # fmt: skip

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
        stream = torch.cuda.current_stream(images.device)
        pool = torch.cuda.graph_pool_handle()  # named, so that a failed capture's pool can be released
        try:
            torch.cuda.synchronize(images.device)
            # thread_local: a loader thread pinning host memory meanwhile does not spoil the capture
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.static_out = self.fn(*self.static_in)
        except Exception as err:  # noqa: BLE001 - any capture failure falls back to the eager step
            self.static_in = self.static_out = None
            _recover_from_failed_capture(images.device, stream, pool)
            optimizer = getattr(self.fn, "optimizer", None)
            if optimizer is not None:  # gradients allocated by the failed capture must not be used
                optimizer.zero_grad(set_to_none=True)
            self._give_up(f"the capture failed ({_causes(err)})")
            graph = None
        if self.failed:  # outside the handler: its traceback would keep the capture's tensors alive
            return self.fn(images, labels)
        self.graph, self.key = graph, key
        _copy_into(self.static_in[0], images)
        _copy_into(self.static_in[1], labels)
        graph.replay()  # the capture itself ran nothing: this is the step for this batch
        self.replays += 1
        return _clone(self.static_out)


def _watching_syncs(call: Callable):
    """``(call(), syncs)``: ``syncs`` the places (``file:line``) of the synchronising CUDA calls made by
    this thread during ``call``, as ``torch.cuda.set_sync_debug_mode("warn")`` reports them."""
    syncs: list[str] = []
    thread = threading.get_ident()
    previous_mode = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=".*synchronizing CUDA operation.*")
        show = warnings.showwarning

        def record(message, category, filename, lineno, *args, **kwargs):
            if "synchronizing CUDA operation" in str(message) and threading.get_ident() == thread:
                syncs.append(f"{filename}:{lineno}")
            else:
                show(message, category, filename, lineno, *args, **kwargs)

        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = call()
        finally:
            torch.cuda.set_sync_debug_mode(previous_mode)
    return out, list(dict.fromkeys(syncs))


def _recover_from_failed_capture(device: torch.device, stream: torch.cuda.Stream, pool) -> None:
    """Undo what a capture that raised leaves behind. ``torch.cuda.graph`` ends the capture before it
    restores the caller's stream, and a failed end skips the rest of its clean-up: the capture stream
    stays current, the allocator keeps routing to the graph's private ``pool`` (never released), and
    the random generators still count themselves as capturing, which a later eager random call
    rejects. The stream is restored, the pool's routing ended and the pool released (where the end
    had not done it), and an empty capture, begun and ended cleanly, resets the generators."""
    torch.cuda.set_stream(stream)
    try:
        torch.cuda.synchronize(device)
    except RuntimeError:
        pass  # the error of the failed capture, reported again: already reported by the caller
    index = cuda_index(device)
    try:  # private bindings (what torch.cuda.use_mem_pool calls): a torch without them keeps the pool
        torch._C._cuda_endAllocateToPool(index, pool)
    except Exception:  # noqa: BLE001 - RuntimeError: the capture's end got that far, the graph releases it
        pass
    else:
        torch._C._cuda_releasePool(index, pool)
    try:
        with warnings.catch_warnings(), torch.cuda.graph(torch.cuda.CUDAGraph(), capture_error_mode="thread_local"):
            warnings.filterwarnings("ignore", message=".*CUDA Graph is empty.*")
    except RuntimeError:
        pass
    torch.cuda.set_stream(stream)


def _causes(err: BaseException) -> str:
    """The error and the errors it was raised from or while handling, first cause first: a failed
    capture is usually reported by ``capture_end``, after the call that broke it raised."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(f"{type(err).__name__}: {err}")
        err = err.__cause__ or err.__context__
    return "; then ".join(reversed(chain))
