"""The perturbation generator (docs/method.md section 4): encoder + label prior -> decoder -> bounded delta.

Shapes, with ``S = (S_h, S_w)`` the encoder output size (:func:`generator_feature_size`):

* encoder: ResNet-18 trunk through ``layer2``: ``[B, C, H, W]`` in [0, 1] -> ``[B, F, S_h, S_w]``,
  ``F = round(128 * width)``. The stem follows :func:`encoder_stride`: stride 2 overall (3x3
  stride-1 stem, no max-pool) for images with ``min(H, W) < 192``, else stride 8 (torchvision's
  7x7 stride-2 stem + max-pool).
* label prior: one learned map ``e^k_c`` of shape ``[D, S_h, S_w]`` (``D = embed_dim``) per task
  ``k`` and class ``c``, all rows in one table ``[R, D*S_h*S_w]``, ``R = sum_k C_k``; task ``k``
  owns rows ``task_offsets[k]:task_offsets[k+1]``. Dense tasks (NYUv2) use
  :class:`DenseLabelPrior` networks instead.
* decoder: ``concat(K maps [B, D*K, S], features [B, F, S])`` -> ConvT(k4 s2 p1, -> c1) ->
  ConvT(c1, c1, k3 s1 p1) -> IN -> ReLU -> ConvT(c1 -> c2) -> IN -> ReLU -> ConvT(c2 -> C); the
  last two are k3 s1 p1 for the stride-2 encoder and k4 s2 p1 for the stride-8 one, so ``raw`` is
  ``[B, C, H, W]`` (cropped at the bottom/right when H or W is not a multiple of the stride).
  ``c1, c2 = round(64 * width), round(32 * width)``.
* output: ``x' = perturb_apply(x, raw, eps, mode)``: delta = ``clamp(raw, -eps, eps)`` (``"clamp"``)
  or ``eps * tanh(raw)`` (``"tanh"``), added to the clean image and clamped to [0, 1].

:class:`MTLGenerator` has two paths with identical results (``fast``): the straightforward one
gathers the K maps and applies the first ConvT to the concatenation; the fast one uses the
linearity of that ConvT: the embedding part of its weight is applied once to every table row (one
grouped ConvT, independent of the batch), and each sample's sum over tasks is one matrix product
with the multi-hot label matrix (:meth:`MTLGenerator.label_matrix`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtlue_fast.ops import perturb_apply

from .backbones import build_resnet, scaled
from .multitask import NYUV2_DENSE_TASKS

__all__ = [
    "DENSE_STRIDE_MIN_SIDE",
    "DenseGenerator",
    "DenseLabelPrior",
    "MTLGenerator",
    "encoder_stride",
    "generator_feature_size",
]

DENSE_STRIDE_MIN_SIDE = 192  # images with min(H, W) >= this get the stride-8 (torchvision) stem
MODES = ("clamp", "tanh")
NYUV2_LABEL_KEYS: Mapping[str, str] = {"segmentation": "seg", "depth": "depth", "normal": "normal"}


# ----------------------------------------------------------------------------------------------
# sizes and validation
# ----------------------------------------------------------------------------------------------


def _pair(size: int | Sequence[int], name: str = "image_size") -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    if len(size) != 2 or any(int(s) < 1 for s in size):
        raise ValueError(f"{name} must be a positive int or (h, w), got {size!r}")
    return int(size[0]), int(size[1])


def encoder_stride(image_size: int | Sequence[int], override: int | None = None) -> int:
    """The encoder's overall stride for an image size (the stem rule, in one place).

    2 (3x3 stride-1 stem, no max-pool; ``layer2`` halves) if ``min(H, W) < 192``: CelebA 70 -> 35,
    UTKFace 140 -> 70. Otherwise 8 (torchvision's 7x7 stride-2 stem + max-pool): ChestX-ray
    256 -> 32, NYUv2 288x384 -> 36x48. ``override`` (2 or 8) replaces the rule: reduced images
    (e.g. a 64x64 CPU sample) can use the 1/8 encoder, whose label-prior maps are 16x smaller.
    """
    if override is not None:
        if override not in (2, 8):
            raise ValueError(f"stride must be 2 or 8 (or None for the size rule), got {override!r}")
        return override
    return 2 if min(_pair(image_size)) < DENSE_STRIDE_MIN_SIDE else 8


def generator_feature_size(image_size: int | Sequence[int], stride: int | None = None) -> tuple[int, int]:
    """``(S_h, S_w)`` of the encoder output: every stride-2 layer (k3 p1, or the 7x7 p3 stem, or the
    3x3 p1 max-pool) maps n to ceil(n / 2)."""
    stride = encoder_stride(image_size, stride)
    halvings = int(math.log2(stride))
    out = []
    for n in _pair(image_size):
        for _ in range(halvings):
            n = -(-n // 2)
        out.append(n)
    return out[0], out[1]


def _check_common_args(in_channels: int, embed_dim: int, width: float, eps: float, mode: str) -> None:
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be an int >= 1, got {in_channels!r}")
    if not isinstance(embed_dim, int) or embed_dim < 1:
        raise ValueError(f"embed_dim must be an int >= 1, got {embed_dim!r}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    if not (isinstance(eps, (int, float)) and 0 <= eps < math.inf):
        raise ValueError(f"eps must be a finite float >= 0, got {eps!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def _resolve_protect(protect: Sequence[int | str] | None, task_names: Sequence[str]) -> tuple[bool, ...]:
    """Per task: is it protected? ``None`` = all; else task indices or names (ValueError otherwise)."""
    num_tasks = len(task_names)
    if protect is None:
        return (True,) * num_tasks
    if isinstance(protect, (str, int)):
        protect = [protect]
    chosen = set()
    for item in protect:
        if isinstance(item, str):
            if item not in task_names:
                raise ValueError(f"protect: unknown task name {item!r}; tasks are {', '.join(task_names)}")
            chosen.add(task_names.index(item))
        elif isinstance(item, int) and not isinstance(item, bool):
            if not -num_tasks <= item < num_tasks:
                raise ValueError(f"protect: task index {item} out of range for {num_tasks} tasks")
            chosen.add(item % num_tasks)
        else:
            raise ValueError(f"protect: entries must be task indices or names, got {item!r}")
    return tuple(k in chosen for k in range(num_tasks))


def _init_conv_transpose(module: nn.ConvTranspose2d) -> None:
    """Kaiming-normal (ReLU gain) for a ConvTranspose2d, with the fan-in it really has: each output
    pixel sums ``in_channels / groups * prod(kernel) / prod(stride)`` inputs on average. Bias 0."""
    taps = math.prod(module.kernel_size) / math.prod(module.stride)
    fan_in = module.in_channels // module.groups * taps
    nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_in))
    if module.bias is not None:
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------------------------
# encoder, decoder and the shared generator body
# ----------------------------------------------------------------------------------------------


def build_encoder(in_channels: int, image_size: tuple[int, int], width: float, stride: int | None = None) -> tuple[nn.Sequential, int]:
    """ResNet-18 trunk through ``layer2`` (stem per :func:`encoder_stride`), Kaiming init, and its
    channel count ``round(128 * width)``: ``[B, in_channels, H, W] -> [B, F, S_h, S_w]``."""
    small = encoder_stride(image_size, stride) == 2
    net, _ = build_resnet("resnet18", in_channels, width, small_stem=small)
    encoder = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2)
    return encoder, scaled(128, width)


def build_decoder_tail(c1: int, c2: int, out_channels: int, stride: int) -> nn.Sequential:
    """Everything after the first ConvT: ``[B, c1, 2S_h, 2S_w] -> [B, out_channels, stride*S_h,
    stride*S_w]``. The last two ConvTs are k3 s1 p1 (``stride == 2``) or k4 s2 p1 (``stride == 8``)."""
    k, s = (3, 1) if stride == 2 else (4, 2)
    tail = nn.Sequential(
        nn.ConvTranspose2d(c1, c1, 3, stride=1, padding=1),
        nn.InstanceNorm2d(c1),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(c1, c2, k, stride=s, padding=1),
        nn.InstanceNorm2d(c2),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(c2, out_channels, k, stride=s, padding=1),
    )
    for m in tail.modules():
        if isinstance(m, nn.ConvTranspose2d):
            _init_conv_transpose(m)
    return tail


class _GeneratorBody(nn.Module):
    """Encoder, first ConvT (``prior_channels + F -> c1``), decoder tail and the output mapping.

    Subclasses provide ``raw(x, labels)``; this class provides the image handling, ``delta`` and
    ``forward``.
    """

    def __init__(
        self,
        *,
        prior_channels: int,
        in_channels: int,
        image_size: int | Sequence[int],
        embed_dim: int,
        width: float,
        eps: float,
        mode: str,
        stride: int | None = None,
    ) -> None:
        super().__init__()
        _check_common_args(in_channels, embed_dim, width, eps, mode)
        self.in_channels = in_channels
        self.image_size = _pair(image_size)
        self.embed_dim = embed_dim
        self.width = float(width)
        self.eps = float(eps)
        self.mode = mode
        self.stride = encoder_stride(self.image_size, stride)
        self.feature_size = generator_feature_size(self.image_size, stride)
        self.encoder, self.feature_channels = build_encoder(in_channels, self.image_size, width, stride)
        c1, c2 = scaled(64, width), scaled(32, width)
        self.up1 = nn.ConvTranspose2d(prior_channels + self.feature_channels, c1, 4, stride=2, padding=1)
        _init_conv_transpose(self.up1)
        self.decoder = build_decoder_tail(c1, c2, in_channels, self.stride)

    @property
    def up1_size(self) -> tuple[int, int]:
        """``(2 S_h, 2 S_w)``: the spatial size after the first ConvT."""
        return 2 * self.feature_size[0], 2 * self.feature_size[1]

    @property
    def protected_tasks(self) -> tuple[int, ...]:
        """Indices of the protected tasks (``self.protected`` is the per-task bool mask)."""
        return tuple(k for k, p in enumerate(self.protected) if p)

    def _check_image(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a [B, C, H, W] tensor, got {getattr(x, 'shape', type(x).__name__)}")
        if x.dtype != torch.uint8 and not x.dtype.is_floating_point:
            raise ValueError(f"x must be uint8 or floating, got {x.dtype}")
        if x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(
                f"x must have shape [B, {self.in_channels}, {self.image_size[0]}, {self.image_size[1]}], "
                f"got {tuple(x.shape)}"
            )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Clean images ``[B, C, H, W]`` (uint8, or float in [0, 1]) -> features ``[B, F, S_h, S_w]``."""
        self._check_image(x)
        dtype = self.up1.weight.dtype
        x = x.to(dtype) * (1.0 / 255.0) if x.dtype == torch.uint8 else x.to(dtype)
        return self.encoder(x)

    def _decode(self, h: torch.Tensor) -> torch.Tensor:
        """First-ConvT output ``[B, c1, 2S_h, 2S_w]`` -> raw ``[B, C, H, W]``."""
        out = self.decoder(h)
        height, width = self.image_size
        if out.shape[-2] != height or out.shape[-1] != width:  # H or W not a multiple of the stride
            out = out[..., :height, :width]
        return out

    def raw(self, x: torch.Tensor, labels) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta(self, raw: torch.Tensor) -> torch.Tensor:
        """The bounded perturbation ``[B, C, H, W]`` (raw's dtype): ``clamp(raw, -eps, eps)`` or
        ``eps * tanh(raw)``; what :func:`mtlue_fast.ops.quantize_export` publishes."""
        if self.mode == "tanh":
            return self.eps * torch.tanh(raw)
        return raw.clamp(-self.eps, self.eps)

    def forward(
        self,
        x: torch.Tensor,
        labels,
        *,
        crop: torch.Tensor | None = None,
        flip: torch.Tensor | None = None,
        out_size: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Protected images ``x' = perturb_apply(x, raw(x, labels), eps, mode, crop, flip, out_size)``.

        ``x``: clean ``[B, C, H, W]`` uint8 or float in [0, 1]. Returns ``[B, C, h, w]`` in raw's
        dtype (``(h, w) = out_size``, default ``(H, W)``); gradients reach the generator through raw.
        """
        raw = self.raw(x, labels)
        return perturb_apply(x, raw, self.eps, mode=self.mode, crop=crop, flip=flip, out_size=out_size)


# ----------------------------------------------------------------------------------------------
# classification tasks: the class-embedding table
# ----------------------------------------------------------------------------------------------


class MTLGenerator(_GeneratorBody):
    """Generator for classification tasks, with the per-task class-embedding table.

    Args:
        num_classes: ``C_k >= 2`` per task (binary tasks own 2 rows).
        in_channels: image channels.
        image_size: ``(H, W)`` (or one int) of the clean images fed to the generator.
        task_names: names for ``protect`` (default ``task0, task1, ...``).
        embed_dim: channels ``D`` of each class map.
        width: channel multiplier of encoder and decoder.
        eps: L-inf budget on the [0, 1] scale.
        mode: ``"clamp"`` or ``"tanh"``.
        protect: task indices or names that get label-dependent perturbations (None = all). An
            unprotected task's map is the mean of its class maps, whatever its label.
        fast: default path of :meth:`raw` (see the module docstring).
        stride: encoder stride 2 or 8 overriding :func:`encoder_stride`'s size rule (None: the rule).

    Attributes:
        table: ``nn.Parameter [R, D*S_h*S_w]``, N(0, 1) at init.
        task_offsets: CPU int64 ``[K+1]`` (a plain attribute: it stays on the CPU).
        feature_size: ``(S_h, S_w)``; protected: per task bool; protected_tasks: their indices.
    """

    def __init__(
        self,
        num_classes: Sequence[int],
        *,
        in_channels: int = 3,
        image_size: int | Sequence[int],
        task_names: Sequence[str] | None = None,
        embed_dim: int = 16,
        width: float = 1.0,
        eps: float = 8 / 255,
        mode: str = "clamp",
        protect: Sequence[int | str] | None = None,
        fast: bool = True,
        stride: int | None = None,
    ) -> None:
        classes = tuple(num_classes)
        if not classes or any(not isinstance(c, int) or isinstance(c, bool) or c < 2 for c in classes):
            raise ValueError(f"num_classes must be a non-empty sequence of ints >= 2, got {classes!r}")
        names = tuple(task_names) if task_names is not None else tuple(f"task{k}" for k in range(len(classes)))
        if len(names) != len(classes) or len(set(names)) != len(names):
            raise ValueError(f"task_names must be {len(classes)} distinct names, got {names!r}")
        super().__init__(
            prior_channels=embed_dim * len(classes),
            in_channels=in_channels,
            image_size=image_size,
            embed_dim=embed_dim,
            width=width,
            eps=eps,
            mode=mode,
            stride=stride,
        )
        self.num_classes = classes
        self.task_names = names
        self.num_tasks = len(classes)
        self.fast = bool(fast)
        # The fast path's prior in training steps with gradients: ``override(generator, padded
        # label matrix [B, N*K]) -> [B, c1*2S_h*2S_w]`` (None: ``padded @ _padded_responses()``).
        self.prior_override = None
        self.task_offsets = torch.tensor([0, *itertools.accumulate(classes)], dtype=torch.int64)
        rows = int(self.task_offsets[-1])
        s_h, s_w = self.feature_size
        self.table = nn.Parameter(torch.randn(rows, embed_dim * s_h * s_w))

        # Fast-path layout: class c of task k sits at padded row c*K + k of an [N*K] table, N = max C_k.
        self.max_classes = max(classes)
        pad_index = [c * self.num_tasks + k for k, ck in enumerate(classes) for c in range(ck)]
        self.register_buffer("_row_base", self.task_offsets[:-1].clone(), persistent=False)
        self.register_buffer("_pad_index", torch.tensor(pad_index, dtype=torch.int64), persistent=False)
        self.register_buffer("_protected_mask", torch.ones(self.num_tasks, dtype=torch.bool), persistent=False)
        self.register_buffer("_protected_tasks", torch.arange(self.num_tasks), persistent=False)
        self.register_buffer("_mean_rows", torch.zeros(rows), persistent=False)
        self.register_buffer("_task_mean", self._task_mean_matrix(), persistent=False)
        self.set_protect(protect)

    # -- protection ----------------------------------------------------------------------------

    def _task_mean_matrix(self) -> torch.Tensor:
        """``[K, R]``: row k averages task k's rows (1/C_k on them, 0 elsewhere)."""
        mat = torch.zeros(self.num_tasks, int(self.task_offsets[-1]))
        for k, (lo, hi) in enumerate(zip(self.task_offsets[:-1].tolist(), self.task_offsets[1:].tolist())):
            mat[k, lo:hi] = 1.0 / (hi - lo)
        return mat

    def set_protect(self, protect: Sequence[int | str] | None) -> None:
        """Choose the protected tasks (indices or names; None = all). Unprotected tasks' maps become
        the mean of their class maps in both paths."""
        self.protected = _resolve_protect(protect, self.task_names)
        device = self._row_base.device
        mask = torch.tensor(self.protected, dtype=torch.bool)
        self._protected_mask = mask.to(device)
        self._protected_tasks = mask.nonzero().flatten().to(device)
        self._mean_rows = (self._task_mean_matrix()[~mask].sum(0)).to(device=device, dtype=self._mean_rows.dtype)

    # -- the label prior -----------------------------------------------------------------------

    def embedding_table(self) -> torch.Tensor:
        """The table ``[R, D*S_h*S_w]`` (for ``ops.embedding_reg(table, task_offsets)``)."""
        return self.table

    def class_maps(self) -> torch.Tensor:
        """The table as maps: ``[R, D, S_h, S_w]`` (a view)."""
        return self.table.view(self.table.shape[0], self.embed_dim, *self.feature_size)

    def _check_labels(self, labels: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """Validate labels ``[B, K]`` (shape and dtype always; values only when on the CPU, where it
        costs no device sync, and unless ``trust_label_values``: a training loop that checked the whole
        label array once with :meth:`check_label_values` sets it, so its steps read nothing); return
        them as int64 on the table's device."""
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex:
            raise ValueError(f"labels must be an integer tensor [B, K], got {getattr(labels, 'dtype', labels)!r}")
        if labels.dtype == torch.bool:
            raise ValueError("labels must be an integer tensor [B, K], got torch.bool")
        batch = labels.shape[0] if batch is None else batch
        if tuple(labels.shape) != (batch, self.num_tasks):
            raise ValueError(f"labels must have shape [B, K]=[{batch}, {self.num_tasks}], got {tuple(labels.shape)}")
        checked = getattr(self, "trust_label_values", False)
        if labels.device.type == "cpu" and labels.numel() and not checked and not torch.compiler.is_compiling():
            self.check_label_values(labels.numpy())
        return labels.to(device=self._row_base.device, dtype=torch.int64, non_blocking=True)

    def check_label_values(self, labels: np.ndarray) -> None:
        """Raise ValueError naming the task when a label of ``labels [N, K]`` is outside 0..C_k-1."""
        labels = np.asarray(labels)
        if not labels.size:
            return
        low, high = labels.min(axis=0), labels.max(axis=0)
        for k, (lo, hi) in enumerate(zip(low.tolist(), high.tolist())):
            if lo < 0 or hi >= self.num_classes[k]:
                raise ValueError(
                    f"labels: task {self.task_names[k]!r} (column {k}) needs classes in 0..{self.num_classes[k] - 1}, "
                    f"got {lo}..{hi}"
                )

    def label_matrix(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels ``[B, K]`` (int) -> ``[B, R]`` in the table's dtype: for a protected task a 1 at row
        ``task_offsets[k] + labels[:, k]``; for an unprotected one ``1/C_k`` on all its rows.

        ``label_matrix(y) @ table`` is, per sample, the sum over tasks of the (mean) class maps.
        """
        labels = self._check_labels(labels)
        batch, rows = labels.shape[0], self.table.shape[0]
        mat = self._mean_rows.to(self.table.dtype).expand(batch, rows).clone()
        hot = (labels + self._row_base).index_select(1, self._protected_tasks)  # [B, P]
        return mat.scatter_(1, hot, 1.0)

    def _padded_table(self) -> torch.Tensor:
        """The table rearranged for the grouped ConvT: ``[N, K*D, S_h, S_w]`` with ``N = max C_k``;
        sample n, channels ``k*D:(k+1)*D`` = class n of task k (zeros where ``n >= C_k``)."""
        n, k = self.max_classes, self.num_tasks
        padded = self.table.new_zeros(n * k, self.table.shape[1]).index_copy(0, self._pad_index, self.table)
        return padded.view(n, k * self.embed_dim, *self.feature_size)

    def _padded_responses(self, channels: slice | None = None) -> torch.Tensor:
        """The first ConvT's embedding part applied to every class map: ``[N*K, c1*2S_h*2S_w]``, row
        ``c*K + k`` = task k's weight slice ``weight[k*D:(k+1)*D]`` on class c's map (no bias).
        ``channels``: only those output channels (``[N*K, len*2S_h*2S_w]``).

        One grouped ConvT (``groups=K``) does all tasks at once: group k sees input channels
        ``k*D:(k+1)*D`` of the padded table and weight rows ``k*D:(k+1)*D``, and writes output
        channels ``k*c1:(k+1)*c1``; the batch dimension runs over the classes.
        """
        kd = self.num_tasks * self.embed_dim
        weight = self.up1.weight[:kd] if channels is None else self.up1.weight[:kd, channels]
        out = F.conv_transpose2d(
            self._padded_table(), weight, None, stride=2, padding=1, groups=self.num_tasks
        )  # [N, K*c1, 2S_h, 2S_w]
        return out.reshape(self.max_classes * self.num_tasks, -1)

    def class_responses(self) -> torch.Tensor:
        """``P [R, c1, 2S_h, 2S_w]``: row ``task_offsets[k] + c`` is ``ConvT_emb,k(e^k_c)`` (no bias)."""
        c1 = self.up1.out_channels
        return self._padded_responses().index_select(0, self._pad_index).view(-1, c1, *self.up1_size)

    def gathered_maps(self, labels: torch.Tensor) -> torch.Tensor:
        """The straightforward prior: ``[B, K*D, S_h, S_w]``, task k's channels are
        ``e^k_{y_k}`` (protected) or the mean of task k's maps (unprotected)."""
        labels = self._check_labels(labels)
        rows = self.table[labels + self._row_base]  # [B, K, D*S_h*S_w]
        if not all(self.protected):
            means = self._task_mean.to(self.table.dtype) @ self.table  # [K, D*S_h*S_w]
            rows = torch.where(self._protected_mask[None, :, None], rows, means.to(rows.dtype)[None])
        return rows.view(rows.shape[0], self.num_tasks * self.embed_dim, *self.feature_size)

    # -- the two paths -------------------------------------------------------------------------

    def _first_layer_straightforward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        maps = self.gathered_maps(labels).to(features.dtype)
        return self.up1(torch.cat([maps, features], dim=1))

    def _first_layer_fast(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        kd = self.num_tasks * self.embed_dim
        h = F.conv_transpose2d(features, self.up1.weight[kd:], self.up1.bias, stride=2, padding=1)
        mat = self.label_matrix(labels)  # [B, R]
        padded = mat.new_zeros(mat.shape[0], self.max_classes * self.num_tasks).index_copy(1, self._pad_index, mat)
        if self.prior_override is not None and self.training and torch.is_grad_enabled():
            prior = self.prior_override(self, padded)  # e.g. split across processes (ue/split_prior.py)
        else:
            prior = padded @ self._padded_responses()  # [B, c1*2S_h*2S_w]
        return h + prior.view(h.shape).to(h.dtype)

    def raw(self, x: torch.Tensor, labels: torch.Tensor, *, fast: bool | None = None) -> torch.Tensor:
        """Unbounded decoder output ``[B, C, H, W]`` for clean images ``x [B, C, H, W]`` (uint8 or
        float in [0, 1]) and labels ``[B, K]`` (int, class indices). ``fast`` overrides ``self.fast``."""
        if not isinstance(labels, torch.Tensor) or labels.dim() != 2 or labels.shape[0] != x.shape[0]:
            raise ValueError(
                f"labels must be an integer tensor [B, K]=[{x.shape[0]}, {self.num_tasks}], "
                f"got {getattr(labels, 'shape', type(labels).__name__)}"
            )
        features = self.encode(x)
        use_fast = self.fast if fast is None else fast
        first = self._first_layer_fast if use_fast else self._first_layer_straightforward
        return self._decode(first(features, labels))


# ----------------------------------------------------------------------------------------------
# dense tasks (NYUv2)
# ----------------------------------------------------------------------------------------------


class DenseLabelPrior(nn.Module):
    """A dense label map -> ``[B, D, S_h, S_w]``.

    Categorical (segmentation): int ``[B, H, W]`` with -1 = ignore, mapped to an extra "void"
    class ``channels``; each pixel gets ``nn.Embedding(channels + 1, D)``, then the conv stack.
    Continuous (depth ``[B, 1, H, W]``, normals ``[B, 3, H, W]``): the conv stack on the map.
    Conv stack: ``log2(stride)`` times (3x3 stride-2 conv -> ReLU), then a 3x3 conv to D channels;
    each stride-2 conv maps n to ceil(n / 2), like the encoder.
    """

    def __init__(
        self, channels: int, *, stride: int, embed_dim: int = 16, categorical: bool = False, hidden: int = 32
    ) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels!r}")
        if stride not in (2, 4, 8, 16):
            raise ValueError(f"stride must be a power of two in 2..16, got {stride!r}")
        self.channels, self.categorical, self.embed_dim = channels, categorical, embed_dim
        self.embed = nn.Embedding(channels + 1, embed_dim) if categorical else None
        layers: list[nn.Module] = []
        c_in = embed_dim if categorical else channels
        for _ in range(int(math.log2(stride))):
            layers += [nn.Conv2d(c_in, hidden, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
            c_in = hidden
        layers.append(nn.Conv2d(c_in, embed_dim, 3, padding=1))
        self.net = nn.Sequential(*layers)
        for m in self.net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, label: torch.Tensor) -> torch.Tensor:
        """``[B, H, W]`` int (categorical) or ``[B, channels, H, W]`` float -> ``[B, D, S_h, S_w]``."""
        dtype = self.net[0].weight.dtype
        if self.categorical:
            if label.dim() != 3 or label.dtype.is_floating_point:
                raise ValueError(
                    f"a categorical label map must be an integer [B, H, W], got {label.dtype} {tuple(label.shape)}"
                )
            label = label.to(torch.int64)
            label = torch.where(label < 0, self.channels, label)  # -1 (ignore) -> the void class
            x = self.embed(label).permute(0, 3, 1, 2)  # [B, D, H, W] (channels-last strides)
        else:
            if label.dim() != 4 or label.shape[1] != self.channels:
                raise ValueError(f"a label map must be [B, {self.channels}, H, W], got {tuple(label.shape)}")
            x = label.to(dtype)
        return self.net(x)


class DenseGenerator(_GeneratorBody):
    """Generator for dense tasks (NYUv2): :class:`DenseLabelPrior` maps instead of table rows.

    Args:
        tasks: task name -> label channels (segmentation: its class count), in concat order.
        categorical: the names of the categorical (segmentation-like) tasks.
        label_keys: task name -> key of its map in the labels mapping (default NYUv2's
            ``segmentation -> "seg"``, else the task name); the task name itself is accepted too.
        protect: protected task names or indices (None = all); an unprotected task's map is
            zeros (no label signal).
        Other arguments as :class:`MTLGenerator`. There is no table, fast path or embedding
        regulariser for dense tasks.
    """

    def __init__(
        self,
        tasks: Mapping[str, int] = NYUV2_DENSE_TASKS,
        *,
        in_channels: int = 3,
        image_size: int | Sequence[int] = (288, 384),
        embed_dim: int = 16,
        width: float = 1.0,
        eps: float = 8 / 255,
        mode: str = "clamp",
        protect: Sequence[int | str] | None = None,
        categorical: Sequence[str] = ("segmentation",),
        label_keys: Mapping[str, str] | None = None,
    ) -> None:
        if not tasks or min(tasks.values()) < 1:
            raise ValueError(f"tasks must map names to channel counts >= 1, got {dict(tasks)!r}")
        super().__init__(
            prior_channels=embed_dim * len(tasks),
            in_channels=in_channels,
            image_size=image_size,
            embed_dim=embed_dim,
            width=width,
            eps=eps,
            mode=mode,
        )
        self.task_names = tuple(tasks)
        self.num_tasks = len(self.task_names)
        keys = dict(NYUV2_LABEL_KEYS if label_keys is None else label_keys)
        self.label_keys = {name: keys.get(name, name) for name in self.task_names}
        self.priors = nn.ModuleDict(
            {
                name: DenseLabelPrior(
                    int(c), stride=self.stride, embed_dim=embed_dim, categorical=name in categorical
                )
                for name, c in tasks.items()
            }
        )
        self.protected = _resolve_protect(protect, self.task_names)

    def set_protect(self, protect: Sequence[int | str] | None) -> None:
        """Choose the protected tasks (names or indices; None = all)."""
        self.protected = _resolve_protect(protect, self.task_names)

    def _label(self, labels: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        key = self.label_keys[name]
        if key in labels:
            return labels[key]
        if name in labels:
            return labels[name]
        raise ValueError(f"labels: no map for task {name!r} (key {key!r}); got keys {sorted(labels)}")

    def prior_maps(self, labels: Mapping[str, torch.Tensor], batch: int) -> torch.Tensor:
        """``[B, K*D, S_h, S_w]``: each task's :class:`DenseLabelPrior` map (zeros if unprotected)."""
        maps = []
        for name, protected in zip(self.task_names, self.protected):
            if protected:
                m = self.priors[name](self._label(labels, name))
                if tuple(m.shape) != (batch, self.embed_dim, *self.feature_size):
                    raise ValueError(
                        f"labels[{self.label_keys[name]!r}]: expected maps of {self.image_size} for {batch} "
                        f"images, got {tuple(self._label(labels, name).shape)}"
                    )
            else:
                m = self.up1.weight.new_zeros(batch, self.embed_dim, *self.feature_size)
            maps.append(m)
        return torch.cat(maps, dim=1)

    def raw(self, x: torch.Tensor, labels: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Unbounded decoder output ``[B, C, H, W]`` for clean images ``x`` and the label maps
        ``labels`` (``{"seg": int [B,H,W], "depth": [B,1,H,W], "normal": [B,3,H,W]}``)."""
        if not isinstance(labels, Mapping):
            raise ValueError(f"labels must be a mapping of label maps, got {type(labels).__name__}")
        features = self.encode(x)
        maps = self.prior_maps(labels, x.shape[0]).to(features.dtype)
        return self._decode(self.up1(torch.cat([maps, features], dim=1)))
