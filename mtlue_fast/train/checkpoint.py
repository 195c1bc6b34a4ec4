"""Training checkpoints: everything an interrupted run needs to continue as if never stopped.

A ``last.pt`` holds the model, optimiser, scheduler and weighting states, the next epoch, the
metric history, the random generators' states (the CPU's and the training GPU's) and a digest of the run's
inputs. Data order needs no state: ``DeviceBatches`` derives each epoch's order and augmentation
from ``(seed, epoch)``. Files are written to a temporary name and renamed (atomic).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..devices import cuda_index
from ..fileio import atomic_path


def digest(obj: object) -> str:
    """A stable hex digest of a JSON-serialisable object (the run's inputs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def rng_state(device: torch.device | str) -> dict:
    """The random generators' states: the CPU's, and the training device's when it is a GPU.

    Only the training device's: under ``torch.distributed`` each rank trains on its own GPU and every
    rank draws the same numbers (one global batch's augmentation), so rank 0's state of its own
    device is every rank's state. The other GPUs' generators are not the run's, and a run may resume
    where fewer GPUs are visible."""
    device = torch.device(device)
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(cuda_index(device))
    return state


def set_rng_state(state: dict, device: torch.device | str) -> None:
    """Restore :func:`rng_state`'s generators; the GPU's onto ``device`` when it is a GPU (a state
    saved on the CPU leaves the GPU's generator as seeded)."""
    device = torch.device(device)
    torch.set_rng_state(state["cpu"])
    saved = state.get("cuda")
    if saved is not None and device.type == "cuda":
        if isinstance(saved, (list, tuple)):  # older checkpoints: every visible GPU's; rank 0 trained on the first
            saved = saved[0]
        torch.cuda.set_rng_state(saved, cuda_index(device))


#: Optimiser group entries that say how a step is computed, not what it computes.
_IMPLEMENTATION_FLAGS = ("capturable", "fused", "foreach", "differentiable")


def keep_setup_on_load(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer.load_state_dict`` keep how this optimiser was built.

    By default a loaded state replaces whole parameter groups, so a checkpoint written by another
    setup (a CPU run resumed on a GPU, a CUDA-graph run resumed without) brings its ``capturable`` /
    ``fused`` / ``foreach`` flags and its learning-rate type along, and the next step fails ("lr as
    a Tensor is not supported for capturable=False"). After loading:

    - the implementation flags are this optimiser's again;
    - tensor-valued entries (a CUDA graph's learning rate and ``initial_lr``, 0-dim tensors on the
      device) receive the saved values in place, so a captured graph sees the schedule; number
      entries stay numbers;
    - each parameter's ``step`` count sits where this setup expects it: float32 on the parameter's
      device for capturable or fused steps, float32 on the host otherwise.
    """
    kept: list[dict] = []

    def before(opt, state_dict):
        kept[:] = [{k: v for k, v in group.items() if k != "params" and (k in _IMPLEMENTATION_FLAGS or isinstance(v, (torch.Tensor, float, int)))}
                   for group in opt.param_groups]  # fmt: skip

    def after(opt):
        for group, built in zip(opt.param_groups, kept):
            for key, value in built.items():
                if key in _IMPLEMENTATION_FLAGS:
                    group[key] = value
                elif key in group and isinstance(value, torch.Tensor):
                    with torch.no_grad():
                        value.copy_(torch.as_tensor(group[key], dtype=value.dtype))
                    group[key] = value
                elif isinstance(group.get(key), torch.Tensor):
                    group[key] = type(value)(group[key].item())
            on_device = bool(group.get("capturable") or group.get("fused"))
            for param in group["params"]:
                state = opt.state.get(param, {})
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].to(param.device if on_device else "cpu", torch.float32)
        kept.clear()

    optimizer.register_load_state_dict_pre_hook(before)
    optimizer.register_load_state_dict_post_hook(after)


def save(path: str | Path, state: dict) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: str | Path, expected_digest: str) -> dict | None:
    """The checkpoint at ``path``, None when there is none.

    Raises:
        ValueError: the checkpoint belongs to a run with other inputs (settings or data): resuming
            it would mix two runs. The message names the file.
    """
    path = Path(path)
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("digest") != expected_digest:
        raise ValueError(
            f"{path} was written by a training run with different settings or data; "
            "use another output folder or delete that folder to start over"
        )
    return state


def save_weights(path: str | Path, model: torch.nn.Module, meta: dict) -> None:
    """The model's weights only (``state_dict`` on the CPU) with ``meta`` (e.g. the epoch)."""
    weights = {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()}
    save(path, {"model": weights, **meta})


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The original module under ``torch.compile`` / DDP wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            return model
        model = inner
