"""Sample-wise PGD baselines (docs/method.md section 5): per-image perturbations for EM, TAP and SEP.

Every sample gets its own ``delta`` found by projected sign-gradient descent on the base objective
(:class:`~mtlue_fast.ue.objectives.Objective`, which is always minimised): ``steps`` (20) steps of
``step_size`` (0.8/255), each ``delta <- clip(delta - step_size * sign(grad), -eps, eps)`` followed by
the [0, 1] projection ``delta <- clip(x + delta, 0, 1) - x``. The surrogate sees the centre crop.

- TAP / SEP: the surrogate(s) are fixed, so a sample's delta depends on that sample only: it is
  computed batch by batch during export (:func:`pgd_perturb`).
- EM (min-min, Huang et al. 2021): deltas persist across passes; each pass trains the surrogate for
  ``train_steps`` optimiser steps on the current poisons, then runs PGD on every sample; stop when
  the surrogate's error on the poisoned stop subset is <= 0.01 (or at ``max_passes``). The state is
  an int8 memory map of ``delta / eps * 127`` (no float copy of the dataset; resolution eps/127,
  finer than one 8-bit level) plus ``last.pt``, saved after every pass, so EM resumes.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..fileio import read_json, write_json
from ..ops.reference import UINT8_SCALE
from ..train import checkpoint
from ..train.tasks import select_tasks
from .objectives import Objective

STATE_LEVELS = 127


def _centre(x: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    height, width = x.shape[-2:]
    top, left = (height - crop[0]) // 2, (width - crop[1]) // 2
    return x[..., top : top + crop[0], left : left + crop[1]]


def pgd(
    images: torch.Tensor,
    labels: torch.Tensor,
    surrogates: Sequence[nn.Module],
    objective: Objective,
    *,
    eps: float,
    crop: tuple[int, int],
    steps: int = 20,
    step_size: float = 0.8 / 255,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """``delta [B, C, H, W]`` float32 minimising ``objective`` (mean over ``surrogates``) by PGD.

    ``images`` uint8 ``[B, C, H, W]``; ``start`` an initial delta (default 0).
    """
    x = images.to(torch.float32) * UINT8_SCALE
    delta = torch.zeros_like(x) if start is None else start.to(torch.float32).clone()
    for _ in range(steps):
        delta.requires_grad_(True)
        x_adv = _centre((x + delta).clamp(0, 1), crop)
        loss = objective.ensemble_loss([m(x_adv) for m in surrogates], labels)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = (delta - step_size * grad.sign()).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
    return delta.detach()


def pgd_perturb(surrogates: Sequence[nn.Module] | nn.Module, objective: Objective, *, eps: float, crop: tuple[int, int],
                steps: int = 20, step_size: float = 0.8 / 255) -> Callable:
    """A ``perturb(images, labels, indices) -> delta`` for :func:`mtlue_fast.ue.export.write_protected`
    (TAP / SEP: fixed surrogates)."""
    models = [surrogates] if isinstance(surrogates, nn.Module) else list(surrogates)
    for m in models:
        m.eval().requires_grad_(False)

    def perturb(images, labels, indices):
        return pgd(images, labels, models, objective, eps=eps, crop=crop, steps=steps, step_size=step_size)

    return perturb


def em_pgd(
    train_cache,
    out_dir: str | Path,
    surrogate: nn.Module,
    *,
    eps: float = 8 / 255,
    steps: int = 20,
    step_size: float = 0.8 / 255,
    train_steps: int = 10,
    max_passes: int = 100,
    stop_error: float = 0.01,
    stop_subset: int = 4096,
    batch_size: int = 512,
    lr: float = 1e-3,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Callable:
    """Sample-wise error-minimising noise (see the module docstring). Returns the ``perturb`` callable
    that reads the final deltas for export. ``surrogate`` starts untrained and is trained here."""
    device = torch.device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    view = select_tasks(train_cache)
    objective = Objective("em", view.num_classes)
    settings = {"eps": eps, "steps": steps, "step_size": step_size, "train_steps": train_steps,
                "max_passes": max_passes, "stop_error": stop_error, "batch_size": batch_size, "lr": lr,
                "seed": seed, "data": view.identity}  # fmt: skip
    digest = checkpoint.digest(settings)
    state_path = out / "delta_state.npy"
    n = len(view.images)
    scale = eps / STATE_LEVELS

    def perturb(images, labels, indices):
        levels = torch.from_numpy(np.asarray(state[indices.cpu().numpy()])).to(images.device)
        return levels.to(torch.float32) * scale

    done = read_json(out / "result.json")
    if done is not None and done.get("digest") == digest and state_path.exists():
        state = np.load(state_path, mmap_mode="r")
        return perturb

    torch.manual_seed(seed)
    surrogate = surrogate.to(device)
    optimizer = torch.optim.Adam(surrogate.parameters(), lr=lr, weight_decay=1e-4)
    start_pass = 0
    saved = checkpoint.load(out / "last.pt", digest)
    if saved is not None and state_path.exists():
        surrogate.load_state_dict(saved["surrogate"])
        optimizer.load_state_dict(saved["optimizer"])
        start_pass = saved["passes"]
        checkpoint.set_rng_state(saved["rng"], device)
        state = np.load(state_path, mmap_mode="r+")
    else:
        state = np.lib.format.open_memmap(state_path, mode="w+", dtype=np.int8, shape=view.images.shape)
        state[:] = 0
    rng = np.random.default_rng([seed, 3])
    subset = np.sort(rng.permutation(n)[:stop_subset])
    labels_all = np.asarray(view.labels)
    from ..mtl.losses import ClassificationLoss

    loss_fn = ClassificationLoss(view.num_classes)

    def batch(rows):
        images = torch.from_numpy(np.ascontiguousarray(view.images[rows])).to(device)
        labels = torch.from_numpy(labels_all[rows]).to(device)
        delta = torch.from_numpy(np.asarray(state[rows])).to(device).to(torch.float32) * scale
        return images, labels, delta

    for pass_index in range(start_pass, max_passes):
        order = np.random.default_rng([seed, pass_index]).permutation(n)
        surrogate.train()
        for step in range(train_steps):
            rows = np.sort(order[(step * batch_size) % n :][:batch_size])
            images, labels, delta = batch(rows)
            x_adv = _centre((images.float() * UINT8_SCALE + delta).clamp(0, 1), view.crop)
            loss = loss_fn(surrogate(x_adv), labels).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(surrogate.parameters(), 5.0)
            optimizer.step()
        surrogate.eval()
        for p in surrogate.parameters():
            p.requires_grad_(False)
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(start + batch_size, n))
            images, labels, delta = batch(rows)
            delta = pgd(images, labels, [surrogate], objective, eps=eps, crop=view.crop, steps=steps, step_size=step_size, start=delta)
            state[rows] = torch.round(delta / scale).clamp(-STATE_LEVELS, STATE_LEVELS).to(torch.int8).cpu().numpy()
        for p in surrogate.parameters():
            p.requires_grad_(True)
        state.flush()
        errors, count = None, 0
        with torch.no_grad():
            for start in range(0, len(subset), batch_size):
                rows = subset[start : start + batch_size]
                images, labels, delta = batch(rows)
                logits = surrogate(_centre((images.float() * UINT8_SCALE + delta).clamp(0, 1), view.crop))
                e = objective.errors(logits.float(), labels)
                errors = e if errors is None else errors + e
                count += len(rows)
        error = objective.mean_error(errors, count)
        checkpoint.save(out / "last.pt", {"digest": digest, "passes": pass_index + 1, "surrogate": surrogate.state_dict(),
                                          "optimizer": optimizer.state_dict(), "rng": checkpoint.rng_state(device), "error": error})
        if progress:
            print(f"sample-wise EM pass {pass_index + 1}: surrogate error {error:.3f} (stop at <= {stop_error})",
                  file=sys.stderr, flush=True)
        if not math.isnan(error) and error <= stop_error:
            break
    write_json(out / "result.json", {"digest": digest, "settings": settings})
    state = np.load(state_path, mmap_mode="r")
    return perturb
