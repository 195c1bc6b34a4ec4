"""Training checkpoints: everything an interrupted run needs to continue as if never stopped.

A ``last.pt`` holds the model, optimiser, scheduler and weighting states, the next epoch, the
metric history, the random generators' states (CPU and every CUDA device) and a digest of the run's
inputs. Data order needs no state: ``DeviceBatches`` derives each epoch's order and augmentation
from ``(seed, epoch)``. Files are written to a temporary name and renamed (atomic).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..fileio import atomic_path


def digest(obj: object) -> str:
    """A stable hex digest of a JSON-serialisable object (the run's inputs)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
