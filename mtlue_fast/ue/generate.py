"""The MTL-UE generator loop (docs/method.md sections 4-5): train the generator against a surrogate.

``generate(train_cache, out_dir, config, surrogates=...)`` trains an
:class:`~mtlue_fast.models.generator.MTLGenerator` on the (clean) training cache:

per batch: ``raw = G(x, y)``; ``x' = perturb_apply(x, raw, eps, crop, flip)`` (bounded, added,
clamped to [0, 1] and cropped/flipped as the victim will see it, one fused op; SEP: no augmentation);
``L = L_base(f, x', y) + lambda1 * L_intra + lambda2 * L_inter`` (``embedding_reg`` on the label-prior
table); one Adam step on the generator.

- EM: the surrogate starts untrained; after every generator pass it trains for ``train_steps`` epochs
  on freshly generated poisons (train mode, clip 5).
- TAP: one frozen surrogate trained on clean data.
- SEP: the checkpoints of one clean training, all resident; the generator runs once per batch and
  the checkpoints' losses are averaged (``shared_pass=False`` reruns it per checkpoint, for the
  benchmark only).

After each pass the stop test runs the surrogate (eval mode, no gradients) on a fixed random subset
of the training set (default 4096) perturbed by the generator in eval mode: EM stops when the mean
error over the protected tasks is <= 0.01, TAP when >= 0.9, SEP >= 0.99, or at the pass cap.

``out_dir`` gets ``last.pt`` after every pass (an interrupted generation resumes from the last pass),
``history.jsonl``, and when done ``generator.pt`` and ``result.json``.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import dist, ops
from ..ops import reference
from ..ops._checks import MODES
from ..data.loader import DeviceBatches, to_unit_float
from ..fileio import read_json, read_jsonl, write_json, write_jsonl
from ..models.generator import DenseGenerator, MTLGenerator
from ..progress import Progress
from ..train import checkpoint
from ..train.graphed import GraphedStep, capturable_adam
from ..train.settings import cpu_has_native_bf16
from ..train.tasks import DENSE_TASKS, TaskView, select_tasks
from . import split_prior
from .objectives import Objective
from .settings import GenerateConfig



@dataclass
class GenerateResult:
    out_dir: Path
    passes: int
    stopped: str  # "stop_error" or "max_passes"
    history: list[dict] = field(default_factory=list)

    def load_generator(self, device: torch.device | str = "cpu") -> MTLGenerator:
        return load_generator(self.out_dir / "generator.pt", device)


def load_generator(path: str | Path, device: torch.device | str = "cpu") -> MTLGenerator | DenseGenerator:
    """A generator saved by :func:`generate`, in eval mode on ``device``."""
    stored = torch.load(path, map_location="cpu", weights_only=False)
    generator = build_generator(**stored["generator_args"])
    generator.load_state_dict(stored["generator"])
    return generator.to(device).eval()


# ---------------------------------------------------------------------------- pieces


def generator_args(view: TaskView, config: GenerateConfig) -> dict:
    """Constructor arguments of the generator for ``view`` (``dense`` picks :class:`DenseGenerator`)."""
    common = {
        "in_channels": view.channels, "image_size": tuple(int(s) for s in view.images.shape[-2:]),
        "embed_dim": config.embed_dim, "width": config.width, "eps": config.eps, "mode": config.mode,
        "protect": list(config.protect) if config.protect is not None else None,
    }  # fmt: skip
    if view.dense:
        return {"dense": True, "tasks": {name: DENSE_TASKS[name][1] for name in view.task_names}, **common}
    return {"dense": False, "num_classes": list(view.num_classes), "task_names": list(view.task_names),
            "fast": config.fast, "stride": config.stride, **common}


def build_generator(dense: bool = False, **args) -> MTLGenerator | DenseGenerator:
    return DenseGenerator(**args) if dense else MTLGenerator(**args)


def _use_amp(config: GenerateConfig, device: torch.device) -> bool:
    if config.amp == "auto":
        return device.type == "cuda" or cpu_has_native_bf16()
    return bool(config.amp)


def _surrogate_outputs(models: Sequence[nn.Module], x: torch.Tensor, amp: bool) -> list:
    if models and _is_channels_last(models[0]):
        x = x.contiguous(memory_format=torch.channels_last)  # once for every checkpoint
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        return [m(x) for m in models]


def _is_channels_last(model: nn.Module) -> bool:
    weight = next((p for p in model.parameters() if p.dim() == 4), None)
    return weight is not None and weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def prepare_surrogate(model: nn.Module, channels_last: bool, bf16: bool) -> nn.Module:
    """A frozen surrogate made ready once: NHWC memory format, and bf16 weights (under autocast the
    convolutions run in bf16 anyway; cast once here, a checkpoint's weights are not cast again at
    every step). The caller's module is left as it is when a copy is needed for bf16."""
    if bf16:
        model = copy.deepcopy(model).to(torch.bfloat16)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


class _Raw(nn.Module):
    """``generator.raw`` (or its compiled form) as a module's forward, for DistributedDataParallel."""

    def __init__(self, generator: nn.Module, raw: Callable):
        super().__init__()
        self.generator, self.raw = generator, raw

    def forward(self, x: torch.Tensor, labels) -> torch.Tensor:
        return self.raw(x, labels)


class GeneratorStep:
    """One generator update: perturb (fused op), augment, surrogate loss(es), embedding regularisers.

    Returns the detached total loss (no host read). With several processes the generator's
    gradients are averaged by ``DistributedDataParallel`` during the backward (the embedding
    regulariser's gradient reaches the table in the same backward). The naive SEP path
    (``shared_pass=False`` with several checkpoints) runs the generator once per checkpoint before
    its one backward, which DDP does not support; it averages after the backward instead.
    """

    def __init__(self, generator: MTLGenerator, objective: Objective, surrogates: Sequence[nn.Module],
                 optimizer: torch.optim.Optimizer, config: GenerateConfig, crop: tuple[int, int], amp: bool):
        self.generator, self.objective, self.surrogates = generator, objective, list(surrogates)
        self.optimizer, self.config, self.crop, self.amp = optimizer, config, crop, amp
        # SEP: no augmentation (docs/method.md section 5). Dense labels would have to move with the image: the
        # generator sees NYUv2 pairs unaugmented.
        self.augment = config.augment and config.base != "sep" and getattr(generator, "task_offsets", None) is not None
        self.offsets = getattr(generator, "task_offsets", None)  # None: dense, no label-prior table
        # The loop checks the label array's values once (generate); a step reads nothing back.
        generator.trust_label_values = True
        raw = torch.compile(generator.raw) if config.compile else generator.raw
        if not config.compile:  # several CPU processes: each computes one channel block of the label prior
            split_prior.enable(generator)
        self.once = config.shared_pass or len(self.surrogates) == 1
        # A dense generator leaves an unprotected task's label-prior network unused.
        unused = isinstance(generator, DenseGenerator) and not all(generator.protected)
        self.raw_fn = dist.data_parallel(_Raw(generator, raw), find_unused_parameters=unused) if self.once else raw

    def perturbed(self, images: torch.Tensor, labels, generator_rng: torch.Generator | None = None) -> torch.Tensor:
        """``x'``: the augmented perturbed batch ``[B, C, h, w]`` (float32, graph to the generator)."""
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.amp):
            raw = self.raw_fn(to_unit_float(images), labels)
        batch, _, height, width = images.shape
        h, w = self.crop
        device = images.device
        if self.augment:
            # Drawn for the global batch, this rank keeping its interleaved share (as DeviceBatches
            # shards the samples), so the augmentation does not depend on the process count.
            place = dist.info()
            total = batch * place.world_size
            tops = torch.randint(0, height - h + 1, (total,), device=device)[place.rank :: place.world_size]
            lefts = torch.randint(0, width - w + 1, (total,), device=device)[place.rank :: place.world_size]
            crop = torch.stack([tops, lefts], 1)
            flip = (torch.rand(total, device=device) < 0.5)[place.rank :: place.world_size]
        else:
            crop = flip = None  # the fused op centre-crops
        if self.config.fused_ops:  # the op takes bf16 raw as it is (no extra float pass)
            return ops.perturb_apply(images, raw, self.config.eps, mode=self.config.mode, crop=crop, flip=flip, out_size=(h, w))
        # The straightforward path: the pure-PyTorch definition (bound, add, clamp, gather as
        # separate ops), which wants an explicit window.
        if crop is None:
            crop = torch.tensor([[(height - h) // 2, (width - w) // 2]], device=device).expand(batch, 2)
        return reference.perturb_apply(images, raw.float(), self.config.eps, MODES[self.config.mode], crop, flip, (h, w))

    def __call__(self, images: torch.Tensor, labels) -> torch.Tensor:
        if self.config.shared_pass or len(self.surrogates) == 1:
            x_adv = self.perturbed(images, labels)
            outputs = _surrogate_outputs(self.surrogates, x_adv, self.amp)
            base = self.objective.ensemble_loss(outputs, labels)
        else:  # the naive SEP: one generator pass per checkpoint
            losses = []
            for model in self.surrogates:
                x_adv = self.perturbed(images, labels)
                losses.append(self.objective.loss(_surrogate_outputs([model], x_adv, self.amp)[0], labels))
            base = sum(losses) / len(losses)
        total = base
        if self.offsets is not None and (self.config.lambda_intra or self.config.lambda_inter):
            regulariser = ops.embedding_reg if self.config.fused_ops else reference.embedding_reg
            intra, inter = regulariser(self.generator.embedding_table(), self.offsets)
            total = total + self.config.lambda_intra * intra + self.config.lambda_inter * inter
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if not self.once:
            dist.average_gradients(self.generator.parameters())
        self.optimizer.step()
        return total.detach()


def make_generator_optimizer(generator: MTLGenerator, config: GenerateConfig, capturable: bool = False) -> torch.optim.Optimizer:
    """Adam over the generator, the label-prior table at ``table_lr``; ``capturable``: one a CUDA
    graph can capture (:func:`mtlue_fast.train.graphed.capturable_adam`)."""
    table = getattr(generator, "table", None)  # dense generators have label-map modules instead
    rest = [p for p in generator.parameters() if p is not table and p.requires_grad]
    groups = [{"params": rest}]
    if table is not None:
        groups.append({"params": [table], "lr": config.table_lr or config.lr})
    if capturable:
        return capturable_adam(groups, config.lr, next(generator.parameters()).device, weight_decay=config.weight_decay)
    optimizer = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    checkpoint.keep_setup_on_load(optimizer)
    return optimizer


@torch.no_grad()
def stop_test(generator: MTLGenerator, surrogates: Sequence[nn.Module], objective: Objective, view: TaskView,
              subset: np.ndarray, config: GenerateConfig, crop: tuple[int, int], device: torch.device, amp: bool) -> float:
    """Mean error over the protected tasks of the surrogate(s) on the perturbed, centre-cropped subset
    (generator and surrogates in eval mode; SEP: the checkpoints' mean). One host read. NaN for
    dense datasets (no error rate: those runs stop at the pass cap).

    With several processes it is collective and data parallel: the subset is cut into the same
    ``config.batch_size`` batches as by one process, rank r runs batches r, r + w, ..., and the
    integer error counts are summed over the ranks, so every rank returns exactly the single-process
    value (each batch is computed as one process computes it; the forward runs no collective)."""
    if view.dense:
        return math.nan
    was_training = generator.training
    generator.eval()
    for m in surrogates:
        m.eval()
    place = dist.info()
    errors = torch.zeros(len(objective.num_classes), dtype=torch.int64, device=device)
    for start in range(0, len(subset), config.batch_size)[place.rank :: place.world_size]:
        rows = np.sort(subset[start : start + config.batch_size])
        images = torch.from_numpy(np.ascontiguousarray(view.images[rows])).to(device)
        labels = torch.from_numpy(np.asarray(view.labels)[rows]).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            raw = generator.raw(to_unit_float(images), labels)
        x_adv = ops.perturb_apply(images, raw, config.eps, mode=config.mode, out_size=crop)
        for outputs in _surrogate_outputs(surrogates, x_adv, amp):
            errors += objective.errors(outputs.float(), labels)
    dist.all_reduce_sum(errors)
    generator.train(was_training)
    return objective.mean_error(errors, len(subset) * len(surrogates))


def _em_surrogate_epochs(surrogate: nn.Module, optimizer: torch.optim.Optimizer, step: GeneratorStep,
                         batches: DeviceBatches, epochs: int, pass_index: int, trained: nn.Module | None = None) -> None:
    """EM's inner step: the surrogate trains for ``epochs`` passes over freshly generated poisons
    (train mode, grad-norm clip 5; the generator in eval mode, no gradients). ``trained``: the
    surrogate in :func:`mtlue_fast.dist.data_parallel`, which averages its gradients during the
    backward (None: the surrogate itself, averaged after the backward)."""
    from ..mtl.losses import ClassificationLoss, DenseLoss

    per_task = DenseLoss() if step.objective.dense else ClassificationLoss(step.objective.num_classes)
    surrogate.train()
    step.generator.eval()
    for epoch in range(epochs):
        batches.set_epoch(pass_index * max(epochs, 1) + epoch)
        for images, labels in batches:
            with torch.no_grad():
                x_adv = step.perturbed(images, labels)
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=step.amp):
                loss = per_task((trained or surrogate)(x_adv), labels).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if trained is None:
                dist.average_gradients(surrogate.parameters())
            nn.utils.clip_grad_norm_(surrogate.parameters(), 5.0)
            optimizer.step()
    step.generator.train()
    surrogate.eval()


# ---------------------------------------------------------------------------- the loop


def generate(
    train_cache,
    out_dir: str | Path,
    config: GenerateConfig = GenerateConfig(),
    *,
    surrogates: nn.Module | Sequence[nn.Module],
    device: torch.device | str = "cpu",
    resume: bool = True,
    surrogate_lr: float = 1e-3,
    on_pass_end: Callable[[dict], None] | None = None,
) -> GenerateResult:
    """Train the generator on ``train_cache`` against ``surrogates`` (see the module docstring).

    Args:
        train_cache: the clean training cache (``mtlue_fast.data.Cache`` or the same fields).
        out_dir: this stage's folder.
        config: :class:`GenerateConfig`.
        surrogates: TAP: the clean surrogate; SEP: the list of checkpoint models; EM: a freshly
            initialised (untrained) network, trained here between passes (its state is checkpointed).
        device: where to train.
        resume: continue from ``out_dir/last.pt`` (same settings and data) when present.
        surrogate_lr: EM's surrogate Adam learning rate.
        on_pass_end: called with each pass's record after it is saved.
    """
    device = torch.device(device)
    out = Path(out_dir)
    models = [surrogates] if isinstance(surrogates, nn.Module) else list(surrogates)
    if not models:
        raise ValueError("generate needs at least one surrogate model")
    if config.base != "sep" and len(models) != 1:
        raise ValueError(f"base {config.base!r} takes one surrogate, got {len(models)}")
    view = select_tasks(train_cache, None, config.crop)
    crop = view.crop
    args = generator_args(view, config)
    surrogate_digest = checkpoint.digest([_state_digest(m) for m in models]) if config.base != "em" else "em"
    run_digest = checkpoint.digest({"config": config.identity(), "data": view.identity, "surrogates": surrogate_digest})
    finished = read_json(out / "result.json")
    if resume and finished is not None and finished.get("digest") == run_digest:
        return GenerateResult(out, finished["passes"], finished["stopped"], read_jsonl(out / "history.jsonl"))
    out.mkdir(parents=True, exist_ok=True)
    amp = _use_amp(config, device)

    torch.manual_seed(config.seed)
    place = dist.info()
    generator = dist.convert_sync_batchnorm(build_generator(**args), device.type).to(device)
    dist.broadcast_parameters(generator)
    channels_last = config.use_channels_last(device.type)
    if channels_last:
        generator = generator.to(memory_format=torch.channels_last)
    models = [dist.convert_sync_batchnorm(m, device.type).to(device).eval() for m in models]
    for m in models:
        m.requires_grad_(config.base == "em")
    models = [prepare_surrogate(m, channels_last, config.use_surrogate_bf16(device.type, amp)) for m in models]
    objective = Objective(config.base, view.num_classes, targeted=config.targeted, protected=generator.protected_tasks, dense=view.dense)
    max_passes = config.max_passes or objective.max_passes
    stop_error = objective.stop_error if config.stop_error is None else config.stop_error
    graphed = config.use_cuda_graph(device.type, place.distributed)
    optimizer = make_generator_optimizer(generator, config, capturable=graphed)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.milestones), config.gamma)
    em_optimizer = torch.optim.Adam(models[0].parameters(), lr=surrogate_lr, weight_decay=1e-4) if config.base == "em" else None

    start_pass, history = 0, []
    state = checkpoint.load(out / "last.pt", run_digest) if resume else None
    if state is not None:
        generator.load_state_dict(state["generator"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if em_optimizer is not None:
            models[0].load_state_dict(state["surrogate"])
            em_optimizer.load_state_dict(state["surrogate_optimizer"])
        start_pass, history = state["passes"], state["history"]
        checkpoint.set_rng_state(state["rng"], device)
        if config.progress:
            if place.is_main:
                print(f"generator: resuming after pass {start_pass} from {out / 'last.pt'}", file=sys.stderr, flush=True)

    rank_batch = dist.per_rank_batch(config.batch_size, place.world_size)
    batches = DeviceBatches(view.images, view.labels, rank_batch, device, train=False, shuffle=True,
                            seed=config.seed, drop_last=len(view.images) >= config.batch_size,
                            rank=place.rank, world_size=place.world_size)
    em_batches = batches.reseeded(config.seed + 1) if em_optimizer is not None else None
    subset = np.random.default_rng([config.seed, 7]).permutation(len(view.images))[: config.stop_subset]
    if not view.dense:  # once here: the training step does not re-read the labels' values per batch
        generator.check_label_values(np.asarray(view.labels))
    step = GeneratorStep(generator, objective, models, optimizer, config, crop, amp)
    if graphed:
        step = GraphedStep(step, label="generator step")
    em_trained = dist.data_parallel(models[0]) if em_optimizer is not None else None
    stopped = "max_passes"
    if history and _met(history[-1]["stop_error"], objective.base, stop_error):
        stopped = "stop_error"
    for pass_index in range(start_pass, max_passes if stopped == "max_passes" else start_pass):
        generator.train()
        batches.set_epoch(pass_index)
        progress = Progress(batches.num_samples * place.world_size, f"generator ({config.base}) pass {pass_index + 1}/{max_passes}",
                            enabled=config.progress and place.is_main, every=30.0)
        loss_sum, steps, started = None, 0, time.perf_counter()
        for images, labels in batches:
            loss = step(images, labels)
            loss_sum = loss if loss_sum is None else loss_sum + loss
            steps += 1
            progress.update(images.shape[0] * place.world_size)
        progress.close()
        ops.raise_pending_errors(device, every_rank=True)  # value errors the GPU kernels recorded in this pass
        scheduler.step()
        if em_optimizer is not None:
            _em_surrogate_epochs(models[0], em_optimizer, step, em_batches, config.train_steps, pass_index, em_trained)
        if loss_sum is not None and place.distributed:
            loss_sum = dist.all_reduce_sum(loss_sum.clone()) / place.world_size
        # Every rank runs its share of the stop test's batches; the error counts are summed.
        error = stop_test(generator, models, objective, view, subset, config, crop, device, amp)
        intra = inter = math.nan
        if not view.dense:
            with torch.no_grad():
                intra, inter = ops.embedding_reg(generator.embedding_table().float(), generator.task_offsets)
        record = {
            "pass": pass_index + 1, "loss": float(loss_sum / max(steps, 1)) if loss_sum is not None else math.nan,
            "stop_error": error, "intra": float(intra), "inter": float(inter),
            "seconds": time.perf_counter() - started, "images_per_second": batches.num_samples / max(time.perf_counter() - started, 1e-9),
        }  # fmt: skip
        history.append(record)
        if place.is_main:
            write_jsonl(out / "history.jsonl", history)
        state = {
            "digest": run_digest, "passes": pass_index + 1, "history": history, "generator": generator.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": checkpoint.rng_state(device),
        }  # fmt: skip
        if em_optimizer is not None:
            state.update(surrogate=models[0].state_dict(), surrogate_optimizer=em_optimizer.state_dict())
        if place.is_main:
            checkpoint.save(out / "last.pt", state)
        dist.barrier()
        if config.progress and place.is_main:
            print(f"generator ({config.base}) pass {pass_index + 1}/{max_passes}: loss {record['loss']:.4f}, "
                  f"surrogate error {error:.3f}, intra {record['intra']:.3f}, inter {record['inter']:.3f}",
                  file=sys.stderr, flush=True)
        if on_pass_end is not None:
            on_pass_end(record)
        if _met(error, config.base, stop_error):
            stopped = "stop_error"
            break

    if config.progress and place.is_main and history:
        print(f"generator ({config.base}): {stop_reason(stopped, history[-1]['stop_error'], config.base, stop_error, max_passes)}",
              file=sys.stderr, flush=True)
    if place.is_main:
        checkpoint.save(out / "generator.pt", {"generator": {k: v.detach().cpu() for k, v in generator.state_dict().items()},
                                               "generator_args": args, "passes": len(history)})
        write_json(out / "result.json", {"digest": run_digest, "passes": len(history), "stopped": stopped,
                                         "config": config.to_dict(), "history": history})
    dist.barrier()
    return GenerateResult(out, len(history), stopped, history)


def stop_reason(stopped: str, error: float | None, base: str, threshold: float, max_passes: int) -> str:
    """Which rule ended the pass loop, in words: the stop error was reached, or the pass cap."""
    rule = f"surrogate error {'<=' if base == 'em' else '>='} {threshold}"
    if stopped == "stop_error":
        return f"stopped early: the stop rule ({rule}) was reached with error {error:.3f}"
    return (f"ran the configured {max_passes} passes (generate.max_passes); the early-stop rule ({rule}) "
            f"was not reached, last error {error:.3f}")


def _met(error: float, base: str, threshold: float) -> bool:
    if error is None or math.isnan(error):
        return False
    return error <= threshold if base == "em" else error >= threshold


def _state_digest(model: nn.Module) -> str:
    """A cheap fingerprint of a surrogate's weights (sums per tensor)."""
    sums = [float(v.double().sum()) for v in model.state_dict().values() if v.is_floating_point()]
    return checkpoint.digest([round(s, 6) for s in sums])
