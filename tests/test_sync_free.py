"""No host synchronisation in any per-step path.

On the CPU, :func:`mtlue_fast.host_reads.count_host_reads` counts the package's value reads
(``.item()``, ``.tolist()``, ``bool(t)``, ``.cpu()``, ...) inside a training step, a generator step,
a loader iteration and an export; a read made once per epoch or pass is allowed, so the loops are
also checked for reads that grow with the number of steps. On a GPU the same steps run under
``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising call, PyTorch's own
included.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlue_fast.data import open_cache
from mtlue_fast.data.loader import DeviceBatches
from mtlue_fast.host_reads import count_host_reads
from mtlue_fast.models.generator import MTLGenerator
from mtlue_fast.mtl.weighting import STRATEGIES
from mtlue_fast.train import TrainConfig, select_tasks
from mtlue_fast.train.victim import build_training, make_batches, train_epoch
from mtlue_fast.ue.export import write_protected
from mtlue_fast.ue.generate import GeneratorStep, make_generator_optimizer
from mtlue_fast.ue.objectives import Objective
from mtlue_fast.ue.settings import GenerateConfig

sys.path.insert(0, str(Path(__file__).parent))
from test_generate import cache_dir  # noqa: E402
from test_train import CLASSES, TASKS, make_cache  # noqa: E402

CROP = (32, 32)
TINY = TrainConfig(width=0.125, batch_size=16, epochs=1, progress=False, rep_dim=32)


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@contextlib.contextmanager
def no_sync(device: torch.device):
    """Count the package's reads (any device); on a GPU also fail on any synchronising call."""
    with count_host_reads() as reads:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("error")
        try:
            yield reads
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")


def _warm(fn, times: int = 2):
    """Steps before the checked one: lazy state (optimiser moments, compiled kernels, cached
    tensors) is created once, outside the per-step path."""
    for _ in range(times):
        fn()


def _batch(device: torch.device, n: int = 16):
    fake = make_cache(n, 0)
    images = torch.from_numpy(fake.images[:, :, :CROP[0], :CROP[1]].copy()).to(device)
    return fake, images, torch.from_numpy(fake.labels).to(device)


# ------------------------------------------------------------------------------ victim step


@pytest.mark.parametrize("weighting", sorted(STRATEGIES))
@pytest.mark.parametrize("device_name", _devices())
def test_training_step_reads_nothing(weighting, device_name):
    device = torch.device(device_name)
    fake, images, labels = _batch(device)
    view = select_tasks(fake, None, CROP)
    parts = build_training(view, TINY.replace(weighting=weighting), device)
    _warm(lambda: parts.step(images, labels))
    with no_sync(device) as reads:
        losses = parts.step(images, labels)
    assert not reads, f"{weighting}: host reads in the training step at {reads.where()}"
    assert losses.shape == (len(TASKS),)


@pytest.mark.parametrize("device_name", _devices())
def test_training_epoch_reads_once_not_per_step(device_name):
    """The epoch loop (loader + steps + the epoch's loss read) reads as often for 2 steps as for 6."""
    device = torch.device(device_name)
    counts = []
    for n in (32, 96):
        fake = make_cache(n, 0)
        view = select_tasks(fake, None, CROP)
        parts = build_training(view, TINY, device)
        batches = make_batches(view, TINY, device, train=True)
        train_epoch(parts.step, batches, 0, device, TINY)  # warm
        with count_host_reads() as reads:
            train_epoch(parts.step, batches, 1, device, TINY)
        counts.append(sum(reads.values()))
    assert counts[0] == counts[1], f"host reads grow with the number of steps: {counts}"


# ------------------------------------------------------------------------------ generator step


def _generator_step(device, base: str, surrogates: int = 1):
    from mtlue_fast.models import build_model

    torch.manual_seed(0)
    models = [build_model(list(CLASSES), backbone="resnet18", in_channels=3, crop=CROP, width=0.125).to(device).eval()
              for _ in range(surrogates)]  # fmt: skip
    for m in models:
        m.requires_grad_(False)
    generator = MTLGenerator(list(CLASSES), in_channels=3, image_size=(36, 36), task_names=list(TASKS), width=0.125).to(device)
    config = GenerateConfig(width=0.125, batch_size=16, crop=CROP, base=base, progress=False)
    optimizer = make_generator_optimizer(generator, config)
    objective = Objective(base, CLASSES)
    return GeneratorStep(generator, objective, models, optimizer, config, CROP, amp=device.type == "cuda")


@pytest.mark.parametrize("base,surrogates", [("tap", 1), ("em", 1), ("sep", 3)])
@pytest.mark.parametrize("device_name", _devices())
def test_generator_step_reads_nothing(base, surrogates, device_name):
    device = torch.device(device_name)
    fake = make_cache(16, 0)
    images, labels = torch.from_numpy(fake.images).to(device), torch.from_numpy(fake.labels).to(device)
    step = _generator_step(device, base, surrogates)
    _warm(lambda: step(images, labels))
    with no_sync(device) as reads:
        step(images, labels)
    assert not reads, f"{base}: host reads in the generator step at {reads.where()}"


# ------------------------------------------------------------------------------ loader and export


@pytest.mark.parametrize("device_name", _devices())
@pytest.mark.parametrize("train", [True, False])
def test_loader_batches_read_nothing(device_name, train):
    device = torch.device(device_name)
    fake = make_cache(64, 0)
    batches = DeviceBatches(fake.images, fake.labels, 16, device, crop=CROP, train=train, seed=3)
    list(batches)  # warm: the resident copy is made once
    iterator = iter(batches)
    next(iterator)  # the epoch's plan is made (and copied to the device) once per epoch
    with no_sync(device) as reads:
        for _ in iterator:
            pass
    assert not reads, f"host reads per batch in the loader at {reads.where()}"


@pytest.mark.parametrize("device_name", _devices())
def test_export_reads_once_not_per_batch(tmp_path, device_name):
    device = torch.device(device_name)
    clean = open_cache(cache_dir(tmp_path / "clean", 64, 0))
    eps = 8 / 255

    def perturb(images, labels, indices):
        g = torch.Generator(device=images.device).manual_seed(0)
        return (torch.rand(images.shape, generator=g, device=images.device) * 2 - 1) * eps

    counts = []
    for batch_size in (32, 8):  # 2 batches, then 8
        with count_host_reads() as reads:
            write_protected(clean, tmp_path / f"out{batch_size}", perturb, method="noise", eps=eps, device=device,
                            batch_size=batch_size, progress=False)  # fmt: skip
        counts.append(sum(reads.values()))
    assert counts[0] == counts[1], f"host reads grow with the number of export batches: {counts}"
    a = np.load(tmp_path / "out32" / "images.npy")
    b = np.load(tmp_path / "out8" / "images.npy")
    assert a.shape == b.shape
