"""Backbones of the victim/surrogate networks: torchvision architectures mapping images to one vector.

Every backbone maps float images ``[B, C, h, w]`` (values in [0, 1], no normalisation) to a
globally pooled feature ``[B, F]``. The first layer is adapted to the channel count (1 or 3) and
to the crop; ``width`` scales channel counts for cheap variants (1.0 is torchvision's
architecture exactly, built by its plain constructor with ``weights=None``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mtlue_fast.compat import import_torchvision

try:
    tv = import_torchvision()
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("mtlue_fast.models needs torchvision: pip install 'mtlue_fast[vision]'") from exc

ResNet = tv.models.resnet.ResNet
BasicBlock = tv.models.resnet.BasicBlock
Bottleneck = tv.models.resnet.Bottleneck

BACKBONES = ("resnet18", "resnet50", "vgg16_bn", "densenet121", "vit_b_16")
SMALL_STEM_BELOW = 48  # crops smaller than this (min side) get the 3x3 stride-1 stem
_RESNET_BLOCKS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}


def check_backbone_args(name: str, in_channels: int, width: float, known: Sequence[str] = BACKBONES) -> None:
    """Raise ValueError naming the argument when ``name``, ``in_channels`` or ``width`` is invalid."""
    if name not in known:
        raise ValueError(f"backbone must be one of {', '.join(known)}, got {name!r}")
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")


def scaled(channels: int, width: float, minimum: int = 1) -> int:
    """``channels * width`` rounded, at least ``minimum``."""
    return max(minimum, round(channels * width))


def uses_small_stem(crop: tuple[int, int]) -> bool:
    """The stem rule for ResNets and DenseNet.

    Crops with ``min(crop) >= 48`` keep torchvision's stem (7x7 stride-2 conv + 3x3 stride-2
    max-pool: the first block sees ``h/4 x w/4``; CelebA's 64 costs ~0.3 GFLOP per image at width 1,
    docs/method.md section 8). Smaller crops get a 3x3 stride-1 conv and no max-pool, keeping the full resolution of
    tiny images. The bound is 48, not 64, so that reduced caches (e.g. the 64x64 synthetic
    ChestX-ray with its 56 crop) keep the cheap stem: at 56 the full-resolution stem trained 7x
    slower on 2 CPU cores and no better.
    """
    return min(crop) < SMALL_STEM_BELOW


def make_stem(in_channels: int, out_channels: int, small: bool) -> tuple[nn.Conv2d, nn.Module]:
    """The first conv (no bias) and the pooling after it: ``(3x3 s1, Identity)`` if ``small`` else
    ``(7x7 s2, MaxPool 3x3 s2)``. ``[B, in_channels, h, w] -> [B, out_channels, h', w']``."""
    if small:
        return nn.Conv2d(in_channels, out_channels, 3, stride=1, padding=1, bias=False), nn.Identity()
    conv = nn.Conv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False)
    return conv, StemMaxPool(kernel_size=3, stride=2, padding=1)


class StemMaxPool(nn.MaxPool2d):
    """``nn.MaxPool2d`` that pools a bf16 CPU tensor in the channels-last layout and hands it back in
    the layout it came in: PyTorch's CPU max-pool over a channels-first bf16 tensor is several times
    slower (forward and backward) than over a channels-last one, and was the stem's most expensive op
    of a channels-first bf16 network on 2 cores; in fp32 the two layout changes cost what the pool
    saves (bench/bench_stem.py), so fp32 pools as it comes. A maximum is exact and both layouts'
    kernels pick the same first maximum of each window, so values and gradients are bit for bit
    those of ``nn.MaxPool2d`` (tests/test_models.py). ``[B, C, H, W] -> [B, C, H', W']``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.bfloat16 or x.dim() != 4 or not x.is_contiguous()
                or x.is_contiguous(memory_format=torch.channels_last)):
            return super().forward(x)
        x_nhwc = x.contiguous(memory_format=torch.channels_last)
        if x_nhwc.requires_grad:  # the gradient goes back channels-first: the ReLU's backward before this
            x_nhwc.register_hook(_channels_first)  # would take a slow mixed-layout path otherwise
        return super().forward(x_nhwc).contiguous()


def _channels_first(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous()


def init_cnn(module: nn.Module) -> None:
    """docs/method.md init: every Conv2d Kaiming-normal (fan_out, relu) with bias 0; BatchNorm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ScaledResNet(ResNet):
    """torchvision's ResNet with every stage's ``planes`` (and the stem's 64) multiplied by ``width``.

    Blocks are torchvision's BasicBlock/Bottleneck, built by torchvision's ``_make_layer``; forward
    is torchvision's. Stage outputs: ``scaled(64|128|256|512, width) * block.expansion`` channels.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        width: float,
        replace_stride_with_dilation: Sequence[bool] = (False, False, False),
    ) -> None:
        nn.Module.__init__(self)  # ResNet.__init__ hard-codes 64 stem channels
        self._norm_layer = nn.BatchNorm2d
        self.groups, self.base_width, self.dilation = 1, 64, 1
        self.inplanes = scaled(64, width)
        self.conv1, self.maxpool = make_stem(3, self.inplanes, small=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, scaled(64, width), layers[0])
        dil = list(replace_stride_with_dilation)
        self.layer2 = self._make_layer(block, scaled(128, width), layers[1], stride=2, dilate=dil[0])
        self.layer3 = self._make_layer(block, scaled(256, width), layers[2], stride=2, dilate=dil[1])
        self.layer4 = self._make_layer(block, scaled(512, width), layers[3], stride=2, dilate=dil[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(self.inplanes, 1000)


def build_resnet(
    name: str,
    in_channels: int,
    width: float = 1.0,
    *,
    small_stem: bool,
    replace_stride_with_dilation: Sequence[bool] = (False, False, False),
) -> tuple[ResNet, int]:
    """A torchvision ResNet (``fc`` = Identity, so ``[B, C, h, w] -> [B, F]``) and F.

    Width 1.0 uses ``tv.models.<name>(weights=None)``; other widths :class:`ScaledResNet`. The stem
    is replaced by :func:`make_stem` for ``in_channels``; weights get :func:`init_cnn`.
    """
    block, layers = _RESNET_BLOCKS[name]
    if width == 1.0:
        net = getattr(tv.models, name)(weights=None, replace_stride_with_dilation=list(replace_stride_with_dilation))
    else:
        net = ScaledResNet(block, layers, width, replace_stride_with_dilation)
    net.conv1, net.maxpool = make_stem(in_channels, net.conv1.out_channels, small_stem)
    features = net.fc.in_features
    net.fc = nn.Identity()
    init_cnn(net)
    return net, features


class PooledFeatures(nn.Module):
    """``features`` (a conv stack) -> optional ReLU -> global average pool: ``[B, C, h, w] -> [B, F]``."""

    def __init__(self, features: nn.Module, relu: bool = False) -> None:
        super().__init__()
        self.features = features
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d((1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.features(x))).flatten(1)


def _vgg16_bn(in_channels: int, crop: tuple[int, int], width: float) -> tuple[nn.Module, int]:
    if min(crop) < 32:
        raise ValueError(f"vgg16_bn halves the resolution 5 times: crop must be >= 32, got {crop}")
    cfg = [v if v == "M" else scaled(v, width) for v in tv.models.vgg.cfgs["D"]]
    features = tv.models.vgg.make_layers(cfg, batch_norm=True)
    if in_channels != 3:
        first = features[0]
        features[0] = nn.Conv2d(in_channels, first.out_channels, 3, padding=1)
    net = PooledFeatures(features)
    init_cnn(net)
    return net, scaled(512, width)


def _densenet121(in_channels: int, crop: tuple[int, int], width: float) -> tuple[nn.Module, int]:
    dense = tv.models.DenseNet(
        growth_rate=scaled(32, width, minimum=4),
        block_config=(6, 12, 24, 16),
        num_init_features=scaled(64, width, minimum=4),
    )
    f = dense.features
    f.conv0, f.pool0 = make_stem(in_channels, f.conv0.out_channels, uses_small_stem(crop))
    net = PooledFeatures(f, relu=True)  # torchvision's forward: features -> ReLU -> pool
    init_cnn(net)
    return net, dense.classifier.in_features


def vit_patch_size(crop: tuple[int, int]) -> int:
    """ViT patch size for a crop: 16 if ``min(crop) >= 192``, 8 if ``>= 96``, else 4."""
    side = min(crop)
    return 16 if side >= 192 else 8 if side >= 96 else 4


def _vit_b_16(in_channels: int, crop: tuple[int, int], width: float) -> tuple[nn.Module, int]:
    if crop[0] != crop[1]:
        raise ValueError(f"vit_b_16 needs a square crop, got {crop}")
    patch = vit_patch_size(crop)
    if crop[0] % patch:
        raise ValueError(f"vit_b_16: crop {crop[0]} is not a multiple of the patch size {patch}")
    heads = scaled(12, width)
    hidden = 64 * heads
    vit = tv.models.VisionTransformer(
        image_size=crop[0], patch_size=patch, num_layers=12, num_heads=heads, hidden_dim=hidden, mlp_dim=4 * hidden
    )
    if in_channels != 3:  # torchvision's patchify init: trunc-normal std sqrt(1 / fan_in), bias 0
        vit.conv_proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch)
        nn.init.trunc_normal_(vit.conv_proj.weight, std=(1.0 / (in_channels * patch * patch)) ** 0.5)
        nn.init.zeros_(vit.conv_proj.bias)
    vit.heads = nn.Identity()  # forward returns the class token's output [B, hidden]
    return vit, hidden


def build_backbone(name: str, in_channels: int, crop: tuple[int, int], width: float = 1.0) -> tuple[nn.Module, int]:
    """A backbone mapping ``[B, in_channels, crop[0], crop[1]]`` images in [0, 1] to ``[B, F]``, and F.

    Args:
        name: one of :data:`BACKBONES`.
        in_channels: 1 or 3.
        crop: ``(h, w)`` of the training crop (sets the stem, or the ViT patch/position embeddings).
        width: channel multiplier (ViT: heads ``round(12 * width)``, 64 dims each).

    F: ResNet-18 ``512 * width``, ResNet-50 ``2048 * width``, VGG-16-BN ``512 * width``,
    DenseNet-121 its final feature count (1024 at width 1), ViT ``64 * heads``.
    """
    check_backbone_args(name, in_channels, width)
    crop = (int(crop[0]), int(crop[1]))
    if name in _RESNET_BLOCKS:
        return build_resnet(name, in_channels, width, small_stem=uses_small_stem(crop))
    builders = {"vgg16_bn": _vgg16_bn, "densenet121": _densenet121, "vit_b_16": _vit_b_16}
    return builders[name](in_channels, crop, width)
