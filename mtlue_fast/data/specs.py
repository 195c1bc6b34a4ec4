"""Per-dataset facts of docs/method.md section 2: tasks, channels, working (cache) resolution, victim crop.

A ``DatasetSpec`` is what the readers, the cache and the loaders agree on; nothing here reads files.
"""

from __future__ import annotations

from dataclasses import dataclass

CHESTXRAY_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)  # fmt: skip
UTKFACE_AGE_EDGES = (2, 9, 19, 29, 39, 49, 59, 69)  # upper bounds (inclusive) of the first 8 bins
UTKFACE_TASKS = ("age", "race", "gender")
UTKFACE_CLASSES = (len(UTKFACE_AGE_EDGES) + 1, 5, 2)
NYUV2_TASKS = ("segmentation", "depth", "normal")
NYUV2_SEG_CLASSES = 13


@dataclass(frozen=True)
class ResizeSpec:
    """How an original image becomes a cache entry.

    Attributes:
        channels: 1 (grayscale; RGBA/RGB converted to L) or 3 (RGB).
        size: ``(H, W)`` of the cache entry.
        center_crop: ``(h, w)`` cut from the centre of the original before resizing, or None.
    """

    channels: int
    size: tuple[int, int]
    center_crop: tuple[int, int] | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """Fixed facts about one dataset (docs/method.md table 2)."""

    name: str
    resize: ResizeSpec
    crop: tuple[int, int]  # victim's random crop (test: centre crop) at the cache resolution
    dense: bool = False  # NYUv2: labels are per-pixel maps


SPECS: dict[str, DatasetSpec] = {
    "celeba": DatasetSpec("celeba", ResizeSpec(3, (70, 70), center_crop=(140, 140)), crop=(64, 64)),
    "chestxray": DatasetSpec("chestxray", ResizeSpec(1, (256, 256)), crop=(224, 224)),
    "utkface": DatasetSpec("utkface", ResizeSpec(3, (140, 140)), crop=(128, 128)),
    "nyuv2": DatasetSpec("nyuv2", ResizeSpec(3, (288, 384)), crop=(288, 384), dense=True),
}
DATASETS = tuple(SPECS)
SPLITS = ("train", "test")


def get_spec(dataset: str) -> DatasetSpec:
    """The spec of ``dataset``; a ValueError lists the known names otherwise."""
    try:
        return SPECS[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}") from None


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
