"""NYUv2 in the common preprocessed layout ``{train,val}/{image,label,depth,normal}/<i>.npy``
(docs/method.md section 2.5): image HxWx3 float, label HxW with -1 = ignore, depth HxWx1, normal HxWx3, 288x384.
``val`` is the 654-image test split.

Records hold the image paths; ``labels`` is an object array ``[N, 3]`` of the label, depth and
normal map paths. :func:`label_from_nyu13_png` maps the original 13-class PNG maps (0 = unlabeled,
1..13) to this convention (-1, 0..12).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..records import DatasetFormatError, Records, SkipLog
from ..specs import NYUV2_SEG_CLASSES, NYUV2_TASKS
from ._io import require_root

FOLDER_OF_SPLIT = {"train": "train", "test": "val"}
MAP_FOLDERS = ("label", "depth", "normal")


def label_from_nyu13_png(values: np.ndarray) -> np.ndarray:
    """Original 13-class map (uint8, 0 = unlabeled, 1..13) -> int64 map with -1 = ignore, 0..12."""
    if values.size and int(values.max()) > NYUV2_SEG_CLASSES:
        raise ValueError(f"nyuv2: 13-class label map holds {int(values.max())}, expected 0..13")
    return values.astype(np.int64) - 1


def _index(path: Path) -> int | None:
    return int(path.stem) if path.suffix == ".npy" and path.stem.isdigit() else None


def read(root: str | Path, split: str, strict: bool = False) -> Records:
    base = require_root("nyuv2", root)
    split_dir = base / FOLDER_OF_SPLIT[split]
    image_dir = split_dir / "image"
    if not image_dir.is_dir():
        raise DatasetFormatError(f"nyuv2: expected {image_dir} (layout {{train,val}}/{{image,label,depth,normal}}/<i>.npy)")
    log = SkipLog("nyuv2", strict)
    images = sorted((i, p) for p in image_dir.iterdir() if (i := _index(p)) is not None)
    paths, maps = [], []
    for i, path in images:
        companions = [split_dir / folder / f"{i}.npy" for folder in MAP_FOLDERS]
        missing = [c for c in companions if not c.is_file()]
        if missing:
            log.skip("images_without_labels", str(missing[0].relative_to(base)))
            continue
        paths.append(str(path))
        maps.append([str(c) for c in companions])
    return Records(
        dataset="nyuv2",
        split=split,
        root=str(base),
        paths=paths,
        labels=np.array(maps, dtype=object).reshape(-1, len(MAP_FOLDERS)),
        task_names=list(NYUV2_TASKS),
        num_classes=[NYUV2_SEG_CLASSES, 1, 3],
        skipped=log,
    )
