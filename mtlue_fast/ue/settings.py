"""Settings of one generator training (docs/method.md sections 4-5): a plain dataclass, cheap to import."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

BASES = ("em", "tap", "sep")


@dataclass(frozen=True)
class GenerateConfig:
    """Settings of one generator training (docs/method.md section 4-5 defaults).

    Attributes:
        base: ``"em"``, ``"tap"`` or ``"sep"``. targeted: binary tasks use the ``1 - y`` target.
        eps: L-inf budget on the [0, 1] scale. mode: ``"clamp"`` or ``"tanh"`` output mapping.
        lambda_intra, lambda_inter: weights of ``L_intra`` and ``L_inter`` (paper: 20 and 100).
        lr, weight_decay, milestones, gamma: Adam and MultiStepLR (stepped once per pass).
        table_lr: learning rate of the label-prior table (None = ``lr``).
        batch_size: per step. max_passes, stop_error: None = the base method's defaults.
        stop_subset: samples in the fixed stop-test subset.
        train_steps: EM's surrogate training after each generator pass, in epochs over the freshly
            generated poisons (docs/method.md: "train_steps (default 2) surrogate updates"; read as passes,
            matching the generator's full pass, since a couple of optimiser steps cannot fit a
            surrogate to the poisons).
        augment: per-sample random crop + flip of ``x + delta`` as the victim sees it (SEP: never).
        crop: the augmentation's window ``(h, w)``; None = the dataset's victim crop.
        protect: tasks (indices or names) the perturbation protects; None = all.
        width, embed_dim: generator size (1.0 and 16 in the paper).
        stride: the encoder's stride, 2 or 8 (None: docs/method.md's rule by image size); 8 on a small image
            makes the label-prior maps 16x smaller (the CPU default's choice).
        fast: the linearity path of the first decoder layer. shared_pass: SEP's one generator pass.
        fused_ops: the compiled ``perturb_apply`` / ``embedding_reg``; False composes them from
            plain torch ops (the straightforward path, for the benchmark).
        amp: bf16 autocast (``"auto"``: CUDA or a CPU with native bf16). compile: ``torch.compile``
            the generator's forward.
        channels_last: the generator and the frozen surrogates in NHWC memory format (``"auto"``:
            on; cuDNN and oneDNN both prefer it: a CPU generator pass takes ~20% less time).
        surrogate_bf16: TAP's and SEP's frozen surrogates cast to bf16 once, instead of autocast
            casting every checkpoint's weights at every step (``"auto"``: CUDA with ``amp``).
        cuda_graph: replay the whole generator step as one CUDA graph (``"auto"``: CUDA with one
            process, no ``compile``, TAP or SEP; never with EM; see :mod:`mtlue_fast.train.graphed`).
        seed: generator initialisation, data order, augmentation, stop subset.
    """

    base: str = "tap"
    targeted: bool = False
    eps: float = 8 / 255
    mode: str = "clamp"
    lambda_intra: float = 20.0
    lambda_inter: float = 100.0
    lr: float = 1e-3
    weight_decay: float = 1e-4
    milestones: tuple[int, ...] = (60, 80)
    gamma: float = 0.1
    table_lr: float | None = None
    batch_size: int = 512
    max_passes: int | None = None
    stop_error: float | None = None
    stop_subset: int = 4096
    train_steps: int = 2
    augment: bool = True
    crop: tuple[int, int] | None = None
    protect: tuple | None = None
    width: float = 1.0
    embed_dim: int = 16
    stride: int | None = None
    fast: bool = True
    shared_pass: bool = True
    fused_ops: bool = True
    amp: bool | str = "auto"
    channels_last: bool | str = "auto"
    surrogate_bf16: bool | str = "auto"
    compile: bool = False
    cuda_graph: bool | str = "auto"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise ValueError(f"generate config field 'base' must be one of {', '.join(BASES)}, got {self.base!r}")
        if self.mode not in ("clamp", "tanh"):
            raise ValueError(f"generate config field 'mode' must be 'clamp' or 'tanh', got {self.mode!r}")
        if not 0 < self.eps < 1:
            raise ValueError(f"generate config field 'eps' must be in (0, 1), got {self.eps!r}")
        for name in ("cuda_graph", "channels_last", "surrogate_bf16", "amp"):
            value = getattr(self, name)
            if not (isinstance(value, bool) or value == "auto"):
                raise ValueError(f"generate config field {name!r} must be true, false or 'auto', got {value!r}")
        for name in ("batch_size", "stop_subset"):
            if getattr(self, name) < 1:
                raise ValueError(f"generate config field {name!r} must be >= 1, got {getattr(self, name)!r}")
        if self.cuda_graph is True and self.base == "em":
            raise ValueError("generate config field 'cuda_graph' cannot be true with base 'em': EM trains its "
                             "surrogate between passes, and the generator step's backward fills the surrogate's "
                             "gradients, which live outside a graph's memory (use 'auto' or false)")  # fmt: skip

    def use_cuda_graph(self, device_type: str, distributed: bool) -> bool:
        """Whether the generator step is replayed as a CUDA graph on ``device_type``."""
        if device_type != "cuda":
            return False
        if self.cuda_graph == "auto":
            # EM trains its surrogate between passes, whose gradients the generator's backward
            # also fills: outside a graph's memory, so EM's step stays eager.
            return not distributed and not self.compile and self.base != "em"
        if self.cuda_graph and distributed:
            from ..train.settings import CUDA_GRAPH_UNDER_DIST

            raise ValueError(CUDA_GRAPH_UNDER_DIST.format(section="generate"))
        return bool(self.cuda_graph)

    def use_channels_last(self, device_type: str) -> bool:
        """NHWC on every device unless switched off (``device_type``: the other switches' signature)."""
        return self.channels_last == "auto" or bool(self.channels_last)

    def use_surrogate_bf16(self, device_type: str, amp: bool) -> bool:
        if self.base == "em":  # EM trains its surrogate: it keeps fp32 weights
            return False
        # bf16 weights need autocast to cast the fp32 input: never without amp.
        return amp and (device_type == "cuda" if self.surrogate_bf16 == "auto" else bool(self.surrogate_bf16))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def identity(self) -> dict:
        """The settings that decide the result (``to_dict`` without ``progress``), for digests."""
        return {k: v for k, v in self.to_dict().items() if k != "progress"}

    def replace(self, **changes) -> GenerateConfig:
        return dataclasses.replace(self, **changes)
