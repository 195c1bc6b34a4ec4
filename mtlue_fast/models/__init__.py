"""Multi-task victim/surrogate networks (hard parameter sharing) on torchvision backbones."""

from .backbones import BACKBONES, build_backbone, uses_small_stem, vit_patch_size
from .multitask import DENSE_BACKBONES, NYUV2_DENSE_TASKS, DenseMultiTaskNet, MultiTaskNet, build_model
from .generator import DenseGenerator, DenseLabelPrior, MTLGenerator, encoder_stride, generator_feature_size

__all__ = [
    "BACKBONES",
    "DENSE_BACKBONES",
    "NYUV2_DENSE_TASKS",
    "DenseMultiTaskNet",
    "MultiTaskNet",
    "build_backbone",
    "build_model",
    "uses_small_stem",
    "vit_patch_size",
    "DenseGenerator", "DenseLabelPrior", "MTLGenerator", "encoder_stride", "generator_feature_size",
]
