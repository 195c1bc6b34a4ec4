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


def _warm(fn, times: int = 5):
    """Steps before the checked one: lazy state (optimiser moments, compiled kernels, cached
    tensors, a CUDA graph's capture after its warm-up calls) is created once, outside the per-step
    path."""
    for _ in range(times):
        fn()


def _batch(device: torch.device, n: int = 16):
    fake = make_cache(n, 0)
    images = torch.from_numpy(fake.images[:, :, :CROP[0], :CROP[1]].copy()).to(device)
    return fake, images, torch.from_numpy(fake.labels).to(device)


# ------------------------------------------------------------------------------ victim step


def _step_variants():
    variants = [("cpu", False)]
    if torch.cuda.is_available():
        variants += [("cuda", False), ("cuda", True)]
    return variants


@pytest.mark.parametrize("weighting", sorted(STRATEGIES))
@pytest.mark.parametrize("device_name,graph", _step_variants())
def test_training_step_reads_nothing(weighting, device_name, graph):
    device = torch.device(device_name)
    fake, images, labels = _batch(device)
    view = select_tasks(fake, None, CROP)
    parts = build_training(view, TINY.replace(weighting=weighting, cuda_graph=graph), device)
    _warm(lambda: parts.step(images, labels))
    with no_sync(device) as reads:
        losses = parts.step(images, labels)
    assert not reads, f"{weighting}: host reads in the training step at {reads.where()}"
    assert losses.shape == (len(TASKS),)
    if graph:  # a step that could not be captured runs eagerly: the check above would not see it
        assert parts.step.graph is not None and parts.step.replays > 0, f"{weighting}: the step was not captured"


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


def test_host_data_copied_to_a_device_is_counted():
    """``torch.as_tensor(list, device=...)`` in the package's code is counted (on a GPU it is a copy
    from pageable memory that waits for the device); the same call on a tensor is not."""
    from mtlue_fast.ue.objectives import shifted_labels

    labels = torch.zeros(4, 3, dtype=torch.int64)
    with count_host_reads() as reads:
        shifted_labels(labels, (2, 9, 2))
    assert list(reads.values()) == [1] and "as_tensor(host data" in reads.where()
    with count_host_reads() as reads:
        shifted_labels(labels, torch.tensor([2, 9, 2]))
    assert not reads


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


# ------------------------------------------------------------------------------ CUDA graphs


def test_graphed_step_passes_through_on_the_cpu():
    from mtlue_fast.train.graphed import GraphedStep

    calls = []
    step = GraphedStep(lambda images, labels: calls.append(1) or images.sum(), warmup=1)
    for _ in range(3):
        step(torch.ones(2, 2), torch.zeros(2))
    assert len(calls) == 3 and step.graph is None
    with pytest.raises(ValueError, match="warmup"):
        GraphedStep(lambda *a: None, warmup=0)


def test_graph_status_says_what_became_of_the_graph():
    from mtlue_fast.train.graphed import GraphedStep, graph_status

    assert graph_status(lambda images, labels: images) is None  # not a graphed step
    step = GraphedStep(lambda images, labels: images.sum())
    assert graph_status(step) == "not captured yet"
    step.failed = True
    assert graph_status(step) == "not captured: ran eagerly"
    step.failed, step.graph, step.replays = False, object(), 7
    assert graph_status(step) == "replayed 7 times"


def test_cuda_graph_switch_resolves_off_the_gpu_and_with_a_defence():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert TINY.resolved(cpu)["cuda_graph"] is False
    assert TINY.replace(cuda_graph=True).resolved(cpu)["cuda_graph"] is False
    assert TINY.resolved(cuda)["cuda_graph"] is True
    assert TINY.replace(defense="augment").resolved(cuda)["cuda_graph"] is False
    assert TINY.replace(compile=True, compile_mode="reduce-overhead").resolved(cuda)["cuda_graph"] is False
    assert GenerateConfig(base="em").use_cuda_graph("cuda", False) is False
    assert GenerateConfig(base="tap").use_cuda_graph("cuda", False) is True
    assert GenerateConfig(base="tap").use_cuda_graph("cuda", True) is False
    with pytest.raises(ValueError, match="'cuda_graph' cannot be true with base 'em'"):
        GenerateConfig(base="em", cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph"):
        TrainConfig(cuda_graph="sometimes")
    with pytest.raises(ValueError, match="cuda_graph"):
        GenerateConfig(cuda_graph="sometimes")


def test_cuda_graphs_cannot_be_forced_under_torch_distributed(monkeypatch):
    """Each process decides alone whether its step is captured; collectives captured on one rank and
    run eagerly on another would hang or reduce the wrong buffers."""
    from mtlue_fast import dist
    from mtlue_fast.train import settings

    monkeypatch.setattr(settings, "_distributed", lambda: True)
    cuda = torch.device("cuda")
    assert TINY.resolved(cuda)["cuda_graph"] is False
    with pytest.raises(ValueError, match="train config field 'cuda_graph' cannot be true under torch.distributed"):
        TINY.replace(cuda_graph=True).resolved(cuda)
    assert TINY.replace(cuda_graph=True).resolved(torch.device("cpu"))["cuda_graph"] is False
    with pytest.raises(ValueError, match="generate config field 'cuda_graph' cannot be true under torch.distributed"):
        GenerateConfig(base="tap", cuda_graph=True).use_cuda_graph("cuda", True)
    assert dist.info().distributed is False  # the fake stayed inside the settings module


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.cuda
@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("weighting", ["ew", "uw", "mgda"])  # no random draws inside the step
def test_graphed_training_equals_eager(weighting):
    """Eight steps replayed as a CUDA graph (fp32) give the eager steps' losses and weights, through a
    learning-rate change in between (the schedule must reach the replayed optimiser)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    device = torch.device("cuda")
    fake = make_cache(64, 0)
    view = select_tasks(fake, None, CROP)
    config = TINY.replace(weighting=weighting, amp=False, batch_size=16)
    runs = []
    for graph in (False, True):
        parts = build_training(view, config.replace(cuda_graph=graph), device)
        batches = DeviceBatches(fake.images, fake.labels, 16, device, crop=CROP, train=True, seed=1, drop_last=True)
        losses = []
        for epoch in range(2):
            batches.set_epoch(epoch)
            for images, labels in batches:
                losses.append(parts.step(images, labels))
            parts.scheduler.step()
            for group in parts.optimizer.param_groups:
                group["lr"] = group["lr"] * 0.5 if not torch.is_tensor(group["lr"]) else group["lr"].mul_(0.5)
        runs.append((torch.stack(losses), _params(parts.model), parts.step))
    assert runs[1][2].replays > 0
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=1e-3, atol=1e-4)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("base,surrogates", [("tap", 1), ("sep", 3)])
def test_graphed_generator_step_equals_eager(base, surrogates):
    """The generator step replayed as a CUDA graph (the default on one GPU, TAP and SEP) gives the
    eager step's losses and parameters."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from mtlue_fast.train.graphed import GraphedStep

    device = torch.device("cuda")
    fake = make_cache(16, 0)
    images, labels = torch.from_numpy(fake.images).to(device), torch.from_numpy(fake.labels).to(device)
    runs = []
    for graph in (False, True):
        step = _generator_step(device, base, surrogates)
        step.augment = False  # random windows are drawn inside the step: eager and replayed draws differ
        if graph:
            step.optimizer = make_generator_optimizer(step.generator, step.config, capturable=True)
            step = GraphedStep(step)
        torch.manual_seed(0)
        losses = [step(images, labels) for _ in range(6)]
        runs.append((torch.stack(losses), _params(step.generator)))
    assert step.replays == 6 - step.warmup, "the generator step was not captured"
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=2e-2, atol=1e-3)
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)


@pytest.mark.cuda
def test_graphed_step_runs_another_shape_eagerly():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    device = torch.device("cuda")
    fake, images, labels = _batch(device)
    view = select_tasks(fake, None, CROP)
    parts = build_training(view, TINY.replace(cuda_graph=True), device)
    for _ in range(5):
        parts.step(images, labels)
    replays = parts.step.replays
    parts.step(images[:7], labels[:7])  # a last, smaller batch
    assert parts.step.replays == replays and parts.step.graph is not None
    parts.step(images, labels)
    assert parts.step.replays == replays + 1


@pytest.mark.cuda
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_graphed_generator_step_with_random_windows_is_captured():
    """The default TAP step (random crop windows and flips drawn inside the step) is captured and replayed."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from mtlue_fast.train.graphed import GraphedStep

    device = torch.device("cuda")
    fake = make_cache(16, 0)
    images, labels = torch.from_numpy(fake.images).to(device), torch.from_numpy(fake.labels).to(device)
    step = _generator_step(device, "tap")
    assert step.augment
    step.optimizer = make_generator_optimizer(step.generator, step.config, capturable=True)
    step = GraphedStep(step)
    losses = torch.stack([step(images, labels) for _ in range(8)])
    assert step.replays == 8 - step.warmup and torch.isfinite(losses).all()


def _random_step(calls: list, sync_when_capturing: bool = False, sync_always: bool = False):
    """A step with a random draw on the device: ``x * rand`` summed; optionally a host read."""

    def step(images, labels):
        calls.append(torch.cuda.is_current_stream_capturing())
        out = (images * torch.rand_like(images)).sum()
        if sync_always or (sync_when_capturing and torch.cuda.is_current_stream_capturing()):
            out = out + float(out.item()) * 0  # a host read: illegal while capturing
        return out

    return step


@pytest.mark.cuda
def test_graphed_step_that_syncs_is_not_captured():
    """The last warm-up call finds the host read, names its line, and no capture is tried."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from mtlue_fast.train.graphed import GraphedStep

    calls: list = []
    step = GraphedStep(_random_step(calls, sync_always=True), label="syncing step")
    x, y = torch.ones(64, device="cuda"), torch.zeros(1, device="cuda")
    with pytest.warns(RuntimeWarning, match=r"syncing step: not replayed as a CUDA graph: it synchronises with the host \(.*test_sync_free\.py:\d+"):
        for _ in range(step.warmup):
            step(x, y)
    for _ in range(3):
        assert 0 < float(step(x, y)) < 64
    assert step.failed and step.graph is None and not any(calls)


@pytest.mark.cuda
def test_failed_capture_leaves_cuda_usable():
    """A capture that fails (here a host read only while capturing) is undone: the caller's stream is
    current again, eager random draws work, the step runs eagerly with a warning naming the cause,
    the memory the capture took is given back, and a later step is captured as usual."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import gc

    from mtlue_fast.train.graphed import GraphedStep

    x, y = torch.ones(64, device="cuda"), torch.zeros(1, device="cuda")
    good = GraphedStep(_random_step([]))  # a capture first: CUDA's lazy graph state is not counted below
    for _ in range(good.warmup + 1):
        good(x, y)
    del good
    gc.collect()
    torch.cuda.empty_cache()
    reserved = torch.cuda.memory_reserved()

    calls: list = []
    step = GraphedStep(_random_step(calls, sync_when_capturing=True), label="breaking step")
    stream = torch.cuda.current_stream()
    for _ in range(step.warmup):
        step(x, y)
    with pytest.warns(RuntimeWarning, match="breaking step: not replayed as a CUDA graph: the capture failed"):
        out = step(x, y)
    assert step.failed and step.graph is None and calls.count(True) == 1
    assert torch.cuda.current_stream() == stream
    assert 0 < float(out) < 64 and 0 < float(step(x, y)) < 64
    assert torch.rand(4, device="cuda").shape == (4,)
    del step, out
    gc.collect()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() <= reserved, "the failed capture's memory pool was not released"
    again = GraphedStep(_random_step([]))
    for _ in range(again.warmup + 2):
        again(x, y)
    assert again.replays == 2 and not again.failed


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_capturable_adam_keeps_its_learning_rate_tensors_on_load():
    """``load_state_dict`` copies the saved learning rates into the optimiser's own tensors (a resumed
    graphed run must keep the tensors the graph reads, on the device, for the schedule to reach it)."""
    from mtlue_fast.train.graphed import capturable_adam

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = torch.nn.Linear(3, 2).to(device)
    optimizer = capturable_adam([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.5}], 1e-3, device)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [1], 0.1)
    own = [(g["lr"], g["initial_lr"]) for g in optimizer.param_groups]
    saved = optimizer.state_dict()
    saved = {"state": saved["state"], "param_groups": [dict(g) for g in saved["param_groups"]]}
    for group, value in zip(saved["param_groups"], (2e-4, 0.25)):
        group["lr"] = torch.tensor(value)  # as read back with map_location="cpu"
    optimizer.load_state_dict(saved)
    for (lr, initial), group, value in zip(own, optimizer.param_groups, (2e-4, 0.25)):
        assert group["lr"] is lr and group["initial_lr"] is initial and lr.device.type == device.type
        assert float(lr) == pytest.approx(value)
    scheduler.step()  # the schedule writes into the same tensors
    assert float(own[1][0]) == pytest.approx(0.025)


def test_capture_failure_names_the_first_cause():
    """``capture_end`` reports a broken capture after the call that broke it raised: the warning puts
    that call's error first."""
    from mtlue_fast.train.graphed import _causes

    try:
        try:
            raise RuntimeError("operation not permitted when stream is capturing")
        except RuntimeError:
            raise RuntimeError("operation failed due to a previous error during capture")
    except RuntimeError as err:
        assert _causes(err) == ("RuntimeError: operation not permitted when stream is capturing; then "
                                "RuntimeError: operation failed due to a previous error during capture")  # fmt: skip
    assert _causes(ValueError("alone")) == "ValueError: alone"
