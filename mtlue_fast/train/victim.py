"""The one training loop (docs/method.md section 3): clean surrogates, SEP checkpoints, MTL and STL victims.

``train(train_cache, test_cache, out_dir, config)`` trains a multi-task network on the training
cache (clean or protected: same layout), evaluates it on the clean test cache, and leaves in
``out_dir``:

- ``metrics.jsonl``: one line per epoch (train losses per task, learning rate, images/s, test
  metrics when evaluated);
- ``last.pt``: the resumable state after the latest epoch (see :mod:`.checkpoint`); a rerun with
  the same settings and data continues from it and ends with the same weights as an uninterrupted
  run (bitwise on the CPU with ``deterministic=True``);
- ``epoch_NNN.pt``: the weights every ``keep_every`` epochs (SEP's checkpoint ensemble);
- ``final.pt`` and ``result.json`` once finished; a rerun then returns the stored result.

``train_stl`` trains one single-task network per task through the same loop.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import dist, ops
from ..data.loader import DeviceBatches, to_unit_float
from ..fileio import read_json, read_jsonl, write_json, write_jsonl
from ..models import build_model
from ..mtl import weighting as weighting_registry
from ..mtl.losses import ClassificationLoss, DenseLoss
from ..mtl.metrics import ClassificationMetrics, DenseMetrics
from ..mtl.task_grads import TaskGradients
from ..progress import Progress
from . import checkpoint
from .graphed import GraphedStep, capturable_adam
from .settings import TrainConfig, compile_mode_graphs
from .tasks import DENSE_TASKS, TaskView, select_tasks

@dataclass
class TrainResult:
    """What a finished training leaves: final clean-test metrics and the per-epoch history."""

    out_dir: Path
    metrics: dict
    history: list[dict] = field(default_factory=list)
    task_names: tuple[str, ...] = ()
    images_per_second: float = float("nan")

    def load_model(self, device: torch.device | str = "cpu") -> nn.Module:
        """The trained network (``final.pt``) in eval mode."""
        return load_model(self.out_dir / "final.pt", device)


def load_model(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """A network saved by the loop (``final.pt`` or a kept ``epoch_NNN.pt``), in eval mode on ``device``."""
    stored = torch.load(path, map_location="cpu", weights_only=False)
    model = build_model(**stored["model_args"])
    model.load_state_dict(stored["model"])
    return model.to(device).eval()


# ---------------------------------------------------------------------------- pieces


def model_args(view: TaskView, config: TrainConfig) -> dict:
    """Keyword arguments of :func:`mtlue_fast.models.build_model` for ``view`` under ``config``."""
    if view.dense:
        tasks = {name: DENSE_TASKS[name][1] for name in view.task_names}
        return {"tasks": tasks, "dense": True, "backbone": config.backbone, "in_channels": view.channels, "width": config.width}
    return {
        "tasks": list(view.num_classes), "dense": False, "backbone": config.backbone, "in_channels": view.channels,
        "crop": view.crop, "width": config.width, "rep_dim": config.rep_dim,
    }  # fmt: skip


def make_loss(view: TaskView) -> Callable:
    """Per-task losses ``(outputs, labels) -> [K]`` for ``view``'s tasks."""
    if not view.dense:
        return ClassificationLoss(view.num_classes)
    per_task = {"segmentation": DenseLoss.segmentation, "depth": DenseLoss.depth, "normal": DenseLoss.normal}

    def dense_loss(outputs: dict, labels: dict) -> torch.Tensor:  # the selected tasks, in view order
        return torch.stack([per_task[name](outputs[name], labels[DENSE_TASKS[name][0]]) for name in view.task_names])

    return dense_loss


def make_metrics(view: TaskView, config: TrainConfig, dataset: str | None, device: torch.device):
    if view.dense:
        return DenseMetrics(device=device)
    auc = config.metric == "auc" or (config.metric == "auto" and dataset == "chestxray")
    return ClassificationMetrics(view.num_classes, task_names=view.task_names, auc=auc, device=device)


def make_optimizer(model: nn.Module, strategy: nn.Module, config: TrainConfig, fused: bool,
                   capturable: bool = False) -> torch.optim.Optimizer:
    """Adam over the model's (and the weighting's own) parameters; ``capturable``: one a CUDA graph
    can capture (:func:`mtlue_fast.train.graphed.capturable_adam`)."""
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": config.weight_decay}]
    extra = [p for p in strategy.parameters() if p.requires_grad]
    if extra:
        groups.append({"params": extra, "weight_decay": 0.0})
    if capturable:
        return capturable_adam(groups, config.lr, next(model.parameters()).device)
    optimizer = torch.optim.Adam(groups, lr=config.lr, fused=True if fused else None)
    checkpoint.keep_setup_on_load(optimizer)
    return optimizer


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    if config.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.gamma)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, config.milestone_epochs(), config.gamma)


def reserve_deterministic_cublas() -> None:
    """Set ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (unless set): cuBLAS is deterministic only with a fixed
    workspace configuration, and PyTorch reads the variable once, at the process's first matrix
    product on a GPU; a deterministic training run that starts after one (a resumed run whose
    earlier stages multiply matrices) would raise. Entry points call this before any GPU work when
    ``train.deterministic`` is on."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def _check_deterministic(dense: bool, device: torch.device) -> None:
    if dense and device.type == "cuda":
        raise ValueError(
            "train config field 'deterministic' cannot be true for dense tasks on a GPU: PyTorch has no "
            "deterministic CUDA kernels for the backward of bilinear upsampling and for the per-pixel "
            "cross-entropy (it would raise at the first step); set it false, or train on the CPU"
        )


@contextlib.contextmanager
def _deterministic(enabled: bool):
    previous = torch.are_deterministic_algorithms_enabled()
    if enabled:
        reserve_deterministic_cublas()  # for callers of train() that did not
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _to_device(labels, device: torch.device):
    if isinstance(labels, dict):
        return {k: v.to(device, non_blocking=True) for k, v in labels.items()}
    return labels.to(device, non_blocking=True)


@dataclass
class Training:
    """The objects of one training run (see :func:`build_training`)."""

    model: nn.Module
    strategy: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: TrainStep | GraphedStep
    model_args: dict


def build_training(view: TaskView, config: TrainConfig, device: torch.device | str) -> Training:
    """Seed, build the model (channels-last if asked), the weighting, Adam, the schedule and the step."""
    device = torch.device(device)
    switches = config.resolved(device)
    torch.manual_seed(config.seed)
    args = model_args(view, config)
    model = build_model(**args)
    if switches["sync_bn"]:
        model = dist.convert_sync_batchnorm(model, device.type)
    model = model.to(device)
    dist.broadcast_parameters(model)
    if switches["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    strategy = weighting_registry.get(config.weighting, view.num_tasks, **config.weighting_options).to(device)
    strategy.attach(model)
    graphed = switches["cuda_graph"]
    optimizer = make_optimizer(model, strategy, config, switches["fused_adam"] and device.type == "cuda", capturable=graphed)
    scheduler = make_scheduler(optimizer, config)
    step = TrainStep(model, strategy, optimizer, make_loss(view), config, switches["amp"], switches["channels_last"])
    if graphed:
        step = GraphedStep(step, label="training step")
    return Training(model, strategy, optimizer, scheduler, step, args)


def make_batches(view: TaskView, config: TrainConfig, device: torch.device | str, *, train: bool, dataset: str | None = None) -> DeviceBatches:
    """Training (shuffled, random crop + flip, NYUv2 random scale) or test (centre crop) batches.
    With ``host_augment`` they are made on the CPU and the loop copies each one to ``device``.
    With several processes, test batches are this rank's evaluation shard (every ``world_size``-th
    sample, no padding: each sample on exactly one rank) of ``config.batch_size`` samples each."""
    device = torch.device(device)
    batch_device = torch.device("cpu") if config.host_augment else device
    resident = config.resident  # "auto" is DeviceBatches' own: resident on a GPU when it fits
    place = dist.info()
    if not train:
        return DeviceBatches(
            view.images, view.labels, config.batch_size, batch_device, crop=view.crop, train=False, resident=resident,
            rank=place.rank, world_size=place.world_size, pad=False,
        )  # fmt: skip
    return DeviceBatches(
        view.images, view.labels, dist.per_rank_batch(config.batch_size, place.world_size), batch_device,
        crop=view.crop, train=True, seed=config.seed, drop_last=len(view.images) >= config.batch_size,
        resident=resident, scales=_scales(dataset), rank=place.rank, world_size=place.world_size,
    )  # fmt: skip


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: DeviceBatches,
    metrics,
    *,
    amp: bool = False,
    channels_last: bool = False,
    encode: Callable | None = None,
    decode: Callable | None = None,
    mark_steps: bool = False,
) -> dict:
    """Metrics of ``model`` over ``batches`` (one host read at the end). Leaves the model in eval mode.
    With ``amp`` the encoder runs in bf16 and the heads in float32. ``mark_steps``: ``encode`` /
    ``decode`` replay torch.compile's CUDA graphs (:attr:`TrainStep.mark_steps`), so each batch is
    marked as a step of its own (a later call would otherwise overwrite this batch's outputs).

    Data parallel: every rank calls it with its evaluation shard (``DeviceBatches(..., pad=False)``,
    each sample on exactly one rank) and the same model; the ranks' accumulators are merged
    (``metrics.merge_ranks()``, collective) and every rank returns the metrics of the whole split.
    The forward runs no collective (batch norms in eval mode), so the ranks' batch counts may differ.
    """
    model.eval()
    encode, decode = encode or model.encode, decode or model.decode
    metrics.reset()
    device = next(model.parameters()).device
    for images, labels in batches:
        if mark_steps and device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        images, labels = images.to(device, non_blocking=True), _to_device(labels, device)
        x = to_unit_float(images, channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            z = encode(x)
        # The heads in float32: bf16 scores (8 significant bits) tie many test images in the
        # ranking AUC is computed from, and round the depth maps.
        outputs = decode(z.float(), x.shape[-2:])
        metrics.update(outputs, labels)
    metrics.merge_ranks()
    return metrics.compute()


# ---------------------------------------------------------------------------- training


def train(
    train_cache,
    test_cache,
    out_dir: str | Path,
    config: TrainConfig = TrainConfig(),
    *,
    device: torch.device | str = "cpu",
    tasks: Sequence[int | str] | None = None,
    crop: tuple[int, int] | None = None,
    resume: bool = True,
    label: str = "train",
    on_epoch_end: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train one network on ``train_cache``'s ``tasks`` and evaluate it on ``test_cache``.

    Args:
        train_cache, test_cache: :class:`mtlue_fast.data.Cache` (or the same fields), the training
            one clean or protected; the test one clean.
        out_dir: this run's folder (created); see the module docstring for its files.
        config: the settings (:class:`TrainConfig`).
        device: where to train; batches are made on it from the uint8 cache.
        tasks: task indices or names to train on (None = all).
        crop: the victim's crop ``(h, w)``; None = the dataset's crop scaled to the cache.
        resume: continue from ``out_dir/last.pt`` when present (its settings and data must match).
        label: the progress line's name.
        on_epoch_end: called with each epoch's record (after it is saved).

    Returns:
        :class:`TrainResult` with the last evaluation's metrics (docs/method.md: the reported number).
    """
    device = torch.device(device)
    out = Path(out_dir)
    view = select_tasks(train_cache, tasks, crop)
    test_view = select_tasks(test_cache, view.task_names, view.crop)
    dataset = train_cache.manifest.get("dataset")
    run_digest = checkpoint.digest(
        {"config": config.identity(), "train": view.identity, "test": test_view.identity, "tasks": view.task_names, "crop": view.crop}
    )
    finished = read_json(out / "result.json")
    if resume and finished is not None and finished.get("digest") == run_digest:
        return _result_from_json(out, finished)
    switches = config.resolved(device)
    if config.deterministic:
        _check_deterministic(view.dense, device)
    place = dist.info()
    out.mkdir(parents=True, exist_ok=True)

    with _deterministic(config.deterministic):
        parts = build_training(view, config, device)
        model, strategy, optimizer, scheduler, args = parts.model, parts.strategy, parts.optimizer, parts.scheduler, parts.model_args
        start_epoch, history = 0, []
        state = checkpoint.load(out / "last.pt", run_digest) if resume else None
        if state is not None:
            model.load_state_dict(state["model"])
            strategy.load_state_dict(state["weighting"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            start_epoch, history = state["epoch"], state["history"]
            if parts.step.defense is not None and state.get("defense") is not None:
                parts.step.defense.load_state_dict(state["defense"])
            checkpoint.set_rng_state(state["rng"], device)
            if config.progress and place.is_main:
                print(f"{label}: resuming after epoch {start_epoch} from {out / 'last.pt'}", file=sys.stderr, flush=True)
        metrics = make_metrics(view, config, dataset, device)
        train_batches = make_batches(view, config, device, train=True, dataset=dataset)
        test_batches = make_batches(test_view, config, device, train=False, dataset=dataset)
        step, encode, decode = parts.step, parts.step.encode, parts.step.decode
        throughput = float("nan")
        for epoch in range(start_epoch, config.epochs):
            record, throughput = train_epoch(step, train_batches, epoch, device, config, label)
            strategy.epoch_end()
            scheduler.step()
            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
                # Every rank evaluates its shard of the test split with rank 0's model: per-process batch
                # norms' running statistics differ between ranks after the last step until broadcast.
                dist.broadcast_buffers(model)
                record["test"] = evaluate(
                    model, test_batches, metrics, amp=switches["amp"], channels_last=switches["channels_last"],
                    encode=encode, decode=decode, mark_steps=step.mark_steps,
                )  # fmt: skip
            history.append(record)
            if place.is_main:
                _save_epoch(out, history, model, strategy, optimizer, scheduler, parts.step, args, run_digest, epoch, config)
            dist.barrier()
            if config.progress and place.is_main:
                _print_epoch(label, record, config.epochs, view.dense)
            if on_epoch_end is not None:
                on_epoch_end(record)

    if place.is_main:
        checkpoint.save_weights(out / "final.pt", model, {"epoch": config.epochs, "model_args": args})
    final = history[-1].get("test", {}) if history else {}
    result = {
        "digest": run_digest, "metrics": final, "task_names": list(view.task_names), "config": config.to_dict(),
        "epochs": config.epochs, "images_per_second": throughput,
    }  # fmt: skip
    if place.is_main:
        write_json(out / "result.json", result)
    dist.barrier()
    return TrainResult(out, final, history, view.task_names, throughput)


def _save_epoch(out, history, model, strategy, optimizer, scheduler, step, args, run_digest, epoch, config) -> None:
    """Rank 0's writes after an epoch: the metrics history, a kept checkpoint, ``last.pt``."""
    write_jsonl(out / "metrics.jsonl", history)
    if config.keep_every and (epoch + 1) % config.keep_every == 0:
        checkpoint.save_weights(out / f"epoch_{epoch + 1:03d}.pt", model, {"epoch": epoch + 1, "model_args": args})
    checkpoint.save(out / "last.pt", {
        "digest": run_digest, "epoch": epoch + 1, "history": history, "model": model.state_dict(),
        "weighting": strategy.state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "rng": checkpoint.rng_state(next(model.parameters()).device),
        "defense": step.defense.state_dict() if step.defense is not None else None,
    })  # fmt: skip


class _EncodeDecode(nn.Module):
    """The model's forward as the training step runs it: ``encode``, cut from the graph when the
    weighting needs representation-space task gradients, then ``decode``. A module of its own so
    that ``DistributedDataParallel`` can wrap it (DDP arms its gradient averaging in its own
    ``forward``, and the step never calls ``model.forward``)."""

    def __init__(self, model: nn.Module, encode: Callable, decode: Callable, detach: bool):
        super().__init__()
        self.model = model
        self.encode, self.decode, self.detach = encode, decode, detach

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        encoded = self.encode(x)
        rep = encoded.detach().requires_grad_() if self.detach else encoded
        return encoded, rep, self.decode(rep, x.shape[-2:])


class TrainStep:
    """One optimisation step: forward (autocast), per-task losses, weighting backward, clip, Adam.

    ``encode`` / ``decode`` are the model's, compiled when ``config.compile`` (``compile_mode``
    ``"reduce-overhead"`` and ``"max-autotune"`` add CUDA graphs; ``decode`` stays eager for the
    representation-space gradient strategies). Call with a uint8 batch and its labels on the model's
    device; returns the detached per-task losses ``[K]`` (no host read).

    With several processes the model's gradients are averaged by ``DistributedDataParallel``
    (bucketed all-reduces overlapping the backward): every weighting fills them through autograd,
    in one backward (loss weighting) or in two that reach disjoint parameters (representation-space
    gradient strategies: the heads, then the backbone from the combined ``dL/dz``). Parameter-space
    gradient strategies write the shared gradients by hand (``TaskGradients.apply``), which DDP's
    autograd hooks never see; they, and a weighting's own parameters (UW, GradNorm), which live
    outside the model, are averaged by :func:`mtlue_fast.dist.average_gradients` after the backward.
    """

    def __init__(self, model, strategy, optimizer, loss_fn, config: TrainConfig, amp: bool, channels_last: bool):
        self.model, self.strategy, self.optimizer, self.loss_fn = model, strategy, optimizer, loss_fn
        self.config, self.amp, self.channels_last = config, amp, channels_last
        self.encode, self.decode = model.encode, model.decode
        self.detach = strategy.needs_task_grads and config.grad_space == "representation"
        if config.compile:
            # dynamic=False: one static graph per batch shape (the last, partial evaluation batch
            # adds one) instead of symbolic sizes for every later compile of the same code.
            self.encode = torch.compile(model.encode, mode=config.compile_mode, dynamic=False)
            if not self.detach:
                # Per-task gradients backpropagate through the heads K times (retain_graph) or
                # batched (is_grads_batched); a compiled backward supports neither, so the heads
                # (one Linear, or the small dense heads) stay eager there.
                self.decode = torch.compile(model.decode, mode=config.compile_mode, dynamic=False)
        # torch.compile's own CUDA graphs reuse their outputs' memory at every new step; a step
        # begins where it is marked.
        self.mark_steps = config.compile and compile_mode_graphs(config.compile_mode)
        self.defense = None
        if config.defense != "none":
            from ..defenses import batch_defense

            self.defense = batch_defense(config.defense, eps=config.defense_eps, seed=config.seed, amp=amp)
        self.shared = list(model.shared_parameters())
        self.task = list(model.task_parameters())
        self.clipped = [p for p in model.parameters() if p.requires_grad]
        by_hand = strategy.needs_task_grads and config.grad_space == "parameters"
        # train.sync_bn as build_training resolved it: whether the model's batch norms are synchronised.
        sync_bn = any(isinstance(m, (nn.SyncBatchNorm, dist.CpuSyncBatchNorm)) for m in model.modules())
        # Synchronised batch norms all-reduce inside the backward, which a batched backward cannot run.
        self.batched_task_grads = not (dist.info().distributed and sync_bn)
        forward = _EncodeDecode(model, self.encode, self.decode, self.detach)
        self.forward = forward if by_hand else dist.data_parallel(forward, sync_buffers=not sync_bn)
        # Per-process batch norms outside DDP: rank 0's running statistics by hand, as DDP would.
        self.broadcast_buffers = by_hand and not sync_bn and dist.info().distributed
        self.averaged = (self.clipped if by_hand else []) + [p for p in strategy.parameters() if p.requires_grad]

    def __call__(self, images: torch.Tensor, labels) -> torch.Tensor:
        if self.mark_steps and images.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        x = to_unit_float(images, self.channels_last)
        if self.defense is not None:
            x = self.defense(x, labels, self.model, self.loss_fn)
        if self.broadcast_buffers:
            dist.broadcast_buffers(self.model)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            encoded, rep, outputs = self.forward(x)
        losses = self.loss_fn(outputs, labels)
        grads = TaskGradients(
            losses, self.shared, self.task, representation=rep if self.detach else None,
            encoded=encoded if self.detach else None, space=self.config.grad_space, batched=self.batched_task_grads,
        )  # fmt: skip
        self.strategy.backward(losses, grads)
        dist.average_gradients(self.averaged)  # what DDP does not average (nothing, for most weightings)
        if self.config.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.clipped, self.config.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses.detach()


def train_epoch(step: TrainStep | GraphedStep, batches: DeviceBatches, epoch: int, device: torch.device, config: TrainConfig, label: str = "train") -> tuple[dict, float]:
    """One pass over ``batches`` (epoch ``epoch``'s order): ``(record, images/s)``; the per-task mean
    losses are read to the host once, at the end (per step too with ``config.sync_every_step``)."""
    step.model.train()
    batches.set_epoch(epoch)
    loss_sum = None
    steps, images_seen = 0, 0
    place = dist.info()
    progress = Progress(batches.num_samples * place.world_size, f"{label} epoch {epoch + 1}/{config.epochs}",
                        enabled=config.progress and place.is_main, every=30.0)
    start = time.perf_counter()
    for images, labels in batches:
        if images.device != device:  # host-side augmentation: copy each batch
            images, labels = images.to(device), _to_device(labels, device)
        losses = step(images, labels)
        loss_sum = losses if loss_sum is None else loss_sum + losses
        if config.sync_every_step:
            float(losses.sum())  # the straightforward path's per-step host read
        steps += 1
        images_seen += images.shape[0] * place.world_size
        progress.update(images.shape[0] * place.world_size)
    progress.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        ops.raise_pending_errors(device, every_rank=True)  # value errors the GPU kernels recorded in this epoch
    elapsed = time.perf_counter() - start
    if loss_sum is not None and place.distributed:
        loss_sum = dist.all_reduce_sum(loss_sum.clone()) / place.world_size
    mean_losses = (loss_sum / max(steps, 1)).tolist() if loss_sum is not None else []
    throughput = images_seen / max(elapsed, 1e-9)
    record = {
        "epoch": epoch + 1, "train_loss": mean_losses, "train_loss_mean": sum(mean_losses) / max(len(mean_losses), 1),
        "lr": float(step.optimizer.param_groups[0]["lr"]), "images_per_second": throughput, "seconds": elapsed,
    }  # fmt: skip
    return record, throughput


def _scales(dataset: str | None):
    from ..data.loader import NYUV2_SCALES

    return NYUV2_SCALES if dataset == "nyuv2" else None


def _print_epoch(label: str, record: dict, epochs: int, dense: bool) -> None:
    text = f"{label} epoch {record['epoch']}/{epochs}: loss {record['train_loss_mean']:.4f}, {record['images_per_second']:.0f} img/s"
    test = record.get("test")
    if test:
        name = "mIoU" if dense else ("mean AUC" if "mean_auc" in test else "mean acc")
        text += f", test {name} {test['primary']:.4f}"
    print(text, file=sys.stderr, flush=True)


def _result_from_json(out: Path, stored: dict) -> TrainResult:
    history = read_jsonl(out / "metrics.jsonl")
    return TrainResult(out, stored["metrics"], history, tuple(stored["task_names"]), stored.get("images_per_second", math.nan))


# ---------------------------------------------------------------------------- single-task victims


def train_stl(
    train_cache,
    test_cache,
    out_dir: str | Path,
    config: TrainConfig = TrainConfig(),
    *,
    device: torch.device | str = "cpu",
    tasks: Sequence[int | str] | None = None,
    crop: tuple[int, int] | None = None,
    resume: bool = True,
) -> dict:
    """One independent network per task (``out_dir/task_<name>/``), each through :func:`train`.

    Returns (and writes to ``out_dir/result.json``) ``{"tasks": {name: metrics}, "task_names",
    and per metric the list over tasks and its mean}``: for classification ``accuracy`` /
    ``mean_accuracy`` (and ``auc`` / ``mean_auc`` over defined AUCs), ``primary`` the mean of the
    per-task primaries.
    """
    out = Path(out_dir)
    names = list(select_tasks(train_cache, tasks, crop).task_names)
    per_task: dict[str, dict] = {}
    for name in names:
        result = train(
            train_cache, test_cache, out / f"task_{name}", config, device=device, tasks=[name], crop=crop,
            resume=resume, label=f"stl {name}",
        )  # fmt: skip
        per_task[name] = result.metrics
    summary: dict = {"task_names": names, "tasks": per_task}
    for key in ("accuracy", "auc"):
        values = [m[key][0] for m in per_task.values() if key in m]
        if len(values) == len(names):
            summary[key] = values
            defined = [v for v in values if v is not None and not math.isnan(v)]
            summary[f"mean_{key}"] = sum(defined) / len(defined) if defined else math.nan
    primaries = [m.get("primary", math.nan) for m in per_task.values()]
    summary["primary"] = sum(primaries) / len(primaries)
    write_json(out / "result.json", summary)
    return summary
