"""Multi-task victim/surrogate networks with hard parameter sharing (docs/method.md section 3).

Both networks expose one interface: ``encode(x)`` is the shared part, ``decode(z, image_size)`` the
task-specific part, ``forward(x) = decode(encode(x), x.shape[-2:])``; ``shared_parameters()`` and
``task_parameters()`` partition the parameters; ``last_shared_layer`` is the module whose weight
GradNorm measures.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import build_backbone, build_resnet, check_backbone_args, init_cnn, scaled

NYUV2_DENSE_TASKS: Mapping[str, int] = MappingProxyType({"segmentation": 13, "depth": 1, "normal": 3})
DENSE_BACKBONES = ("resnet18", "resnet50")


def _pair(crop: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(crop, int):
        return crop, crop
    if len(crop) != 2:
        raise ValueError(f"crop must be an int or (h, w), got {crop!r}")
    return int(crop[0]), int(crop[1])


class MultiTaskNet(nn.Module):
    """Classification MTL net: backbone -> ``Linear(F, rep_dim)`` + ELU -> one fused linear head.

    Args:
        num_classes: classes per task ``C_k >= 2``; a binary task (``C_k == 2``) gets one logit.
        backbone: one of ``BACKBONES`` (see :func:`build_backbone`).
        in_channels: 1 or 3.
        crop: ``(h, w)`` (or one int) of the input images.
        width: backbone channel multiplier.
        rep_dim: size of the shared representation.

    Attributes:
        num_classes, num_outputs: per task ``C_k`` and its logit count (1 if ``C_k == 2`` else ``C_k``).
        backbone: ``[B, C, h, w] -> [B, F]``; projection: ``Linear(F, rep_dim)`` (= ``last_shared_layer``);
        head: ``Linear(rep_dim, sum(num_outputs))``, every task's head fused.
    """

    def __init__(
        self,
        num_classes: Sequence[int],
        *,
        backbone: str = "resnet18",
        in_channels: int = 3,
        crop: int | tuple[int, int] = (64, 64),
        width: float = 1.0,
        rep_dim: int = 256,
    ) -> None:
        super().__init__()
        self.num_classes = tuple(int(c) for c in num_classes)
        if not self.num_classes or min(self.num_classes) < 2:
            raise ValueError(f"num_classes must be a non-empty sequence of ints >= 2, got {tuple(num_classes)!r}")
        if rep_dim < 1:
            raise ValueError(f"rep_dim must be >= 1, got {rep_dim!r}")
        self.num_outputs = tuple(1 if c == 2 else c for c in self.num_classes)
        self.backbone, features = build_backbone(backbone, in_channels, _pair(crop), width)
        self.projection = nn.Linear(features, rep_dim)
        self.act = nn.ELU()
        self.head = nn.Linear(rep_dim, sum(self.num_outputs))

    @property
    def last_shared_layer(self) -> nn.Linear:
        """The shared projection ``Linear(F, rep_dim)``."""
        return self.projection

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, h, w]`` -> representation ``z [B, rep_dim]``."""
        return self.act(self.projection(self.backbone(x)))

    def decode(self, z: torch.Tensor, image_size: Sequence[int] | None = None) -> torch.Tensor:
        """``z [B, rep_dim]`` -> fused logits ``[B, sum(num_outputs)]`` (``image_size`` is ignored)."""
        return self.head(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, h, w]`` -> fused logits ``[B, sum(num_outputs)]``."""
        return self.decode(self.encode(x), x.shape[-2:])

    def split(self, logits: torch.Tensor) -> list[torch.Tensor]:
        """Fused logits ``[B, sum(num_outputs)]`` -> per task (views): ``[B]`` if binary, else ``[B, C_k]``."""
        parts = logits.split(self.num_outputs, dim=1)
        return [p[:, 0] if c == 2 else p for p, c in zip(parts, self.num_classes)]

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Backbone and projection parameters."""
        return itertools.chain(self.backbone.parameters(), self.projection.parameters())

    def task_parameters(self) -> Iterator[nn.Parameter]:
        """The fused head's parameters."""
        return self.head.parameters()


class DenseMultiTaskNet(nn.Module):
    """Dense-prediction MTL net (NYUv2): a dilated ResNet encoder at output stride 8 + one head per task.

    Encoder: torchvision ResNet stem (7x7 s2 + max-pool) through ``layer4``, no pooling. ResNet-50
    uses ``replace_stride_with_dilation=[False, True, True]``. torchvision's BasicBlock has no
    dilation, so ResNet-18 keeps output stride 8 by running ``layer3``/``layer4`` at stride 1
    without dilation (same parameters, smaller receptive field).
    Head per task: 3x3 conv -> ``scaled(256, width)``, BN, ReLU, 1x1 conv -> ``C_task``, then
    bilinear upsampling to the image size; the ``"normal"`` output is L2-normalised over channels.

    Args:
        tasks: task name -> output channels, in output order.
        backbone: ``"resnet50"`` or ``"resnet18"``.
        in_channels: 1 or 3.
        width: channel multiplier of the encoder and the heads.

    Attributes:
        task_names, num_outputs: the task names and their channel counts.
        encoder: ``[B, C, H, W] -> [B, F, ceil(H/8), ceil(W/8)]``; heads: ``ModuleDict`` per task.
    """

    def __init__(
        self,
        tasks: Mapping[str, int] = NYUV2_DENSE_TASKS,
        *,
        backbone: str = "resnet50",
        in_channels: int = 3,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        check_backbone_args(backbone, in_channels, width, known=DENSE_BACKBONES)
        if not tasks or min(tasks.values()) < 1:
            raise ValueError(f"tasks must map names to channel counts >= 1, got {dict(tasks)!r}")
        self.task_names = tuple(tasks)
        self.num_outputs = tuple(int(c) for c in tasks.values())
        dilate = (False, True, True) if backbone == "resnet50" else (False, False, False)
        net, features = build_resnet(
            backbone, in_channels, width, small_stem=False, replace_stride_with_dilation=dilate
        )
        if backbone == "resnet18":
            for layer in (net.layer3, net.layer4):
                _drop_stride(layer[0])
        self.encoder = nn.Sequential(
            net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4
        )
        self.feature_channels = features
        hidden = scaled(256, width)
        self.heads = nn.ModuleDict(
            {
                name: nn.Sequential(
                    nn.Conv2d(features, hidden, 3, padding=1, bias=False),
                    nn.BatchNorm2d(hidden),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(hidden, c, 1),
                )
                for name, c in zip(self.task_names, self.num_outputs)
            }
        )
        init_cnn(self.heads)

    @property
    def last_shared_layer(self) -> nn.Conv2d:
        """The last conv of ``layer4``."""
        return [m for m in self.encoder[-1][-1].modules() if isinstance(m, nn.Conv2d)][-1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, H, W]`` -> feature map ``[B, F, H/8, W/8]`` (rounded up)."""
        return self.encoder(x)

    def decode(self, feat: torch.Tensor, image_size: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Feature map ``[B, F, h, w]`` -> ``{task: [B, C_task, H, W]}``; ``(H, W)`` = ``image_size``
        (default ``(8h, 8w)``)."""
        size = tuple(int(s) for s in image_size) if image_size is not None else (8 * feat.shape[-2], 8 * feat.shape[-1])
        out = {}
        for name, head in self.heads.items():
            y = F.interpolate(head(feat), size=size, mode="bilinear", align_corners=False)
            out[name] = F.normalize(y, dim=1) if name == "normal" else y
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images ``[B, C, H, W]`` -> ``{task: [B, C_task, H, W]}``."""
        return self.decode(self.encode(x), x.shape[-2:])

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Encoder parameters."""
        return self.encoder.parameters()

    def task_parameters(self) -> Iterator[nn.Parameter]:
        """All heads' parameters."""
        return self.heads.parameters()


def _drop_stride(block: nn.Module) -> None:
    """Set a torchvision BasicBlock's (and its downsample's) stride to 1, in place."""
    block.conv1.stride = (1, 1)
    block.stride = 1
    if block.downsample is not None:
        block.downsample[0].stride = (1, 1)


def build_model(
    tasks: Sequence[int] | Mapping[str, int],
    *,
    dense: bool = False,
    backbone: str | None = None,
    in_channels: int = 3,
    crop: int | tuple[int, int] = (64, 64),
    width: float = 1.0,
    rep_dim: int = 256,
) -> MultiTaskNet | DenseMultiTaskNet:
    """:class:`DenseMultiTaskNet` (``tasks``: name -> channels; default backbone resnet50; ``crop``
    and ``rep_dim`` unused) if ``dense``, else :class:`MultiTaskNet` (``tasks``: classes per task;
    default backbone resnet18)."""
    if dense:
        if not isinstance(tasks, Mapping):
            raise ValueError("dense models need tasks as a mapping name -> output channels")
        return DenseMultiTaskNet(tasks, backbone=backbone or "resnet50", in_channels=in_channels, width=width)
    if isinstance(tasks, Mapping):
        tasks = tuple(tasks.values())
    return MultiTaskNet(
        tasks, backbone=backbone or "resnet18", in_channels=in_channels, crop=crop, width=width, rep_dim=rep_dim
    )
