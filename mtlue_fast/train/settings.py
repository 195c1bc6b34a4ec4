"""Settings of one training run (docs/method.md section 3 defaults) and their resolution for a device."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..mtl.task_grads import SPACES
from ..mtl.weighting import STRATEGIES
from ..models import BACKBONES

AUTO = "auto"


@dataclass(frozen=True)
class TrainConfig:
    """How to train one victim / surrogate (defaults: docs/method.md section 3, CelebA-sized).

    Model:
        backbone: one of ``mtlue_fast.models.BACKBONES``.
        width: channel multiplier of the backbone (1.0 = the torchvision architecture).
        rep_dim: size of the shared representation ``Linear(F, rep_dim)`` + ELU.
    Optimisation:
        epochs, batch_size, lr, weight_decay: Adam's settings; batch_size is per process.
        schedule: ``"multistep"`` (decay by ``gamma`` at ``milestones``, fractions of ``epochs``) or
            ``"step"`` (every ``step_size`` epochs; NYUv2).
        grad_clip: max global gradient norm of the model's parameters (0 = off).
        weighting, weighting_options: task-weighting strategy (``mtlue_fast.mtl.weighting.get``).
        grad_space: where gradient strategies take per-task gradients (``"representation"`` or
            ``"parameters"``; see ``mtlue_fast.mtl.task_grads``).
    Evaluation and checkpoints:
        metric: ``"accuracy"``, ``"auc"`` (also reports accuracy) or ``"auto"`` (AUC for ChestX-ray14).
        eval_every: evaluate on the clean test split every this many epochs (and after the last).
        keep_every: keep the model's weights every this many epochs as ``epoch_NNN.pt`` (SEP needs
            them; 0 = keep none).
    Speed (``"auto"``: see :meth:`resolved`):
        amp: bf16 autocast (auto: CUDA, and CPUs with native bf16 matrix units, AMX or AVX512-BF16).
        channels_last: NHWC memory format (auto: on; oneDNN and cuDNN both prefer it).
        fused_adam: ``Adam(fused=True)`` (auto: CUDA).
        compile: ``torch.compile`` the model. compile_mode: ``torch.compile`` mode;
            ``"reduce-overhead"`` replays the steps as CUDA graphs (static shapes only).
        cuda_graph: capture the whole step (forward, losses, backward, clipping, Adam) once and
            replay it as one CUDA graph (:mod:`mtlue_fast.train.graphed`; auto: CUDA with one process,
            no training-time defence and no compile mode that graphs by itself, ``"reduce-overhead"``
            or ``"max-autotune"``).
        resident: keep the uint8 training set on the GPU (``DeviceBatches``'s ``resident``; auto: CUDA
            when it fits).
        host_augment: crop and flip on the host and copy each batch (the straightforward path).
        sync_every_step: read the loss to the host after every step (the straightforward path).
        deterministic: ``torch.use_deterministic_algorithms(True)`` (bitwise-reproducible resume; sets
            ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless set, as cuBLAS needs on a GPU). Refused for
            dense tasks on a GPU, where PyTorch has no deterministic kernels for some of their ops.
    Several processes (torchrun):
        sync_bn: batch-norm statistics over the global batch, as one process computes them (true),
            or over each process's share (false: no communication inside the forward and the
            backward, ~40 synchronisation points fewer per ResNet-18 step; rank 0's running
            statistics are broadcast before each forward, as DistributedDataParallel does by
            default). With one process both are the same. Auto: true on CUDA, false on the CPU
            (see :meth:`resolved`); true keeps a CPU job's result that of one process.
    Other:
        defense: a training-time victim defence applied to every batch (``"augment"``: strong
            augmentation; ``"adv"``: PGD adversarial training at ``defense_eps``); ``"none"``. The
            data-level defences (jpeg, bdr, grayscale) transform the cache before training instead.
        defense_eps: the adversarial-training budget on the [0, 1] scale.
        seed: model initialisation, data order and augmentation.
        progress: print a progress line and a summary per epoch.
    """

    backbone: str = "resnet18"
    width: float = 1.0
    rep_dim: int = 256
    epochs: int = 60
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "multistep"
    milestones: tuple[float, ...] = (0.6, 0.8)
    step_size: int = 100
    gamma: float = 0.1
    grad_clip: float = 5.0
    weighting: str = "ew"
    weighting_options: dict = field(default_factory=dict)
    grad_space: str = "representation"
    metric: str = AUTO
    eval_every: int = 1
    keep_every: int = 0
    amp: bool | str = AUTO
    channels_last: bool | str = AUTO
    fused_adam: bool | str = AUTO
    compile: bool = False
    compile_mode: str = "default"
    cuda_graph: bool | str = AUTO
    resident: bool | str = AUTO
    host_augment: bool = False
    sync_every_step: bool = False
    deterministic: bool = False
    sync_bn: bool | str = AUTO
    defense: str = "none"
    defense_eps: float = 8 / 255
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        _check(self.backbone in BACKBONES, "backbone", f"one of {', '.join(BACKBONES)}", self.backbone)
        _check(self.width > 0, "width", "> 0", self.width)
        _check(self.epochs >= 1, "epochs", ">= 1", self.epochs)
        _check(self.batch_size >= 1, "batch_size", ">= 1", self.batch_size)
        _check(self.lr > 0, "lr", "> 0", self.lr)
        _check(self.schedule in ("multistep", "step"), "schedule", "'multistep' or 'step'", self.schedule)
        _check(all(0 < m <= 1 for m in self.milestones), "milestones", "fractions in (0, 1]", self.milestones)
        _check(self.weighting.lower() in STRATEGIES, "weighting", f"one of {', '.join(STRATEGIES)}", self.weighting)
        _check(self.grad_space in SPACES, "grad_space", f"one of {', '.join(SPACES)}", self.grad_space)
        _check(self.metric in ("accuracy", "auc", AUTO), "metric", "'accuracy', 'auc' or 'auto'", self.metric)
        _check(self.eval_every >= 1, "eval_every", ">= 1", self.eval_every)
        _check(self.keep_every >= 0, "keep_every", ">= 0", self.keep_every)
        _check(self.defense in ("none", "augment", "adv"), "defense", "'none', 'augment' or 'adv'", self.defense)
        for name in ("amp", "channels_last", "fused_adam", "resident", "cuda_graph", "sync_bn"):
            value = getattr(self, name)
            _check(isinstance(value, bool) or value == AUTO, name, "true, false or 'auto'", value)
        strategy = STRATEGIES[self.weighting.lower()]
        if self.compile and (strategy.needs_layer_grads or (strategy.needs_task_grads and self.grad_space == "parameters")):
            what = f"weighting {self.weighting!r}" + ("" if strategy.needs_layer_grads else " with grad_space 'parameters'")
            raise ValueError(
                f"train config field 'compile' cannot be true with {what}: its per-task gradients run "
                "through the backbone's backward once per task, which a compiled backward does not "
                "support (set compile false, or use grad_space 'representation')"
            )
        if self.compile and self.cuda_graph is True and compile_mode_graphs(self.compile_mode):
            raise ValueError(
                f"train config field 'cuda_graph' cannot be true with compile_mode {self.compile_mode!r}, "
                "which replays CUDA graphs itself (use 'auto' or false)"
            )

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """The settings that decide the result (``to_dict`` without ``progress``), for digests."""
        return {k: v for k, v in self.to_dict().items() if k != "progress"}

    def milestone_epochs(self) -> list[int]:
        """MultiStepLR milestones in epochs (60 epochs -> [36, 48])."""
        return sorted({max(1, round(m * self.epochs)) for m in self.milestones})

    def resolved(self, device: torch.device) -> dict[str, bool]:
        """The speed switches with ``"auto"`` decided for ``device``.

        Measured on the 2-core CI CPU (Xeon with AMX, ResNet-18 w0.25, batch 128): channels-last 1.2x,
        bf16 autocast 1.3x, both 1.75x the fp32 contiguous step.

        ``sync_bn``: synchronised on CUDA (``SyncBatchNorm`` over NCCL costs microseconds a layer),
        per process on the CPU. There a synchronised batch norm makes two gloo all-reduces (forward
        and backward; 0.4-0.5 ms each alone, measured), each of which also waits for the slower rank,
        40 per ResNet-18 step: two processes at
        one thread each on a 2-vCPU AMD EPYC trained the victim at 1,095 images/s with synchronised
        batch norms, slower than one process (0.53x), and at 2,838 (1.41x) with per-process ones
        (medians of 4 alternating rounds, ``bench/results/cpu-2core-scaling-syncbn-gloo-amd-epyc-2026-12-04.json``).
        ``sync_bn=True`` stays for runs whose result must not depend on the process count.
        """
        cuda = device.type == "cuda"
        if cuda and self.cuda_graph is True and _distributed():
            raise ValueError(CUDA_GRAPH_UNDER_DIST.format(section="train"))
        own_graphs = self.compile and compile_mode_graphs(self.compile_mode)
        graphable = cuda and self.defense == "none" and not own_graphs and not _distributed()
        auto = {"amp": cuda or cpu_has_native_bf16(), "channels_last": True, "fused_adam": cuda, "resident": cuda,
                "cuda_graph": graphable, "sync_bn": cuda}  # fmt: skip
        switches = {name: auto[name] if getattr(self, name) == AUTO else bool(getattr(self, name)) for name in auto}
        switches["cuda_graph"] = switches["cuda_graph"] and cuda  # a CPU step is never graphed
        return switches


#: Each rank decides alone whether its step can be captured (a step that synchronises is not), and
#: captured NCCL collectives must be captured on every rank or on none.
CUDA_GRAPH_UNDER_DIST = ("{section} config field 'cuda_graph' cannot be true under torch.distributed: each process "
                      "decides alone whether its step can be captured, and the steps' collectives must be "
                      "captured on every process or on none (use 'auto', which runs eagerly there, or false)")  # fmt: skip


def compile_mode_graphs(mode: str) -> bool:
    """Whether ``torch.compile(mode=mode)`` replays CUDA graphs itself (``"reduce-overhead"``,
    ``"max-autotune"``)."""
    from torch._inductor import list_mode_options

    return bool(list_mode_options(mode).get("triton.cudagraphs", False))


def _distributed() -> bool:
    from .. import dist

    return dist.info().distributed


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AMX tiles or AVX512-BF16): bf16 autocast
    then speeds training up instead of emulating bf16 in software."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    try:
        return any(getattr(torch.cpu, name)() for name in probes if hasattr(torch.cpu, name))
    except RuntimeError:
        return False


def _check(ok: bool, name: str, expected: str, got: object) -> None:
    if not ok:
        raise ValueError(f"train config field {name!r} must be {expected}, got {got!r}")
