"""UTKFace as distributed: a folder (searched recursively) of
``age_gender_race_datetime.jpg[.chip.jpg]`` files (docs/method.md section 2.5); a published
protected copy's ``.png`` names (``...jpg.chip.png``, ``....png``) are read too.

Tasks, in order: age bin (<=2, 3-9, 10-19, ..., 60-69, >=70), race (0..4), gender (0..1). Names
whose age, gender or race field is missing or out of range are skipped and counted (the release has
a few). A malformed time stamp alone does not hide the labels, so such files are kept. The split is
a seeded 80/20 permutation of the parseable files in name order, where a name is ordered as if
its last extension were ``.jpg``: a published copy whose files changed extension (the training
images written as PNG, the test images copied) splits exactly as the original did.
"""

from __future__ import annotations

import bisect
import re
from pathlib import Path

import numpy as np

from ..records import Records, SkipLog
from ..specs import UTKFACE_AGE_EDGES, UTKFACE_CLASSES, UTKFACE_TASKS
from ._io import find_files, require_root

NAME = re.compile(r"^(\d{1,3})_(\d)_(\d)_(\d+)(?:\.jpg\.chip)?\.(?:jpg|png)$")
SUFFIXES = (".jpg", ".png")
TRAIN_FRACTION = 0.8


def age_bin(age: int) -> int:
    """0 for <=2, 1 for 3-9, 2 for 10-19, ..., 7 for 60-69, 8 for >=70."""
    return bisect.bisect_left(UTKFACE_AGE_EDGES, age)


def parse_name(name: str) -> tuple[int, int, int] | None:
    """(age bin, race, gender) from a file name, or None when it does not parse."""
    match = NAME.match(name)
    if not match:
        return None
    age, gender, race = int(match[1]), int(match[2]), int(match[3])
    if gender > 1 or race > 4:
        return None
    return age_bin(age), race, gender


def _split_key(name: str) -> str:
    """The name with a last ``.png`` read as ``.jpg``: the order of the split's permutation."""
    return name[: -len(".png")] + ".jpg" if name.endswith(".png") else name


def read(root: str | Path, split: str, strict: bool = False, split_seed: int = 0) -> Records:
    base = require_root("utkface", root)
    log = SkipLog("utkface", strict)
    parsed: list[tuple[str, tuple[int, int, int]]] = []
    seen: set[str] = set()
    for name, path in sorted(find_files(base, SUFFIXES).items(), key=lambda item: (_split_key(item[0]), item[0])):
        labels = parse_name(name)
        if labels is None:
            log.skip("unparseable_names", name)
        elif _split_key(name) in seen:  # x.jpg.chip.jpg and x.jpg.chip.png: one image twice
            log.skip("duplicate_images", name)
        else:
            seen.add(_split_key(name))
            parsed.append((str(path), labels))
    order = np.random.default_rng(split_seed).permutation(len(parsed))
    cut = int(round(TRAIN_FRACTION * len(parsed)))
    chosen = sorted(order[:cut] if split == "train" else order[cut:])
    return Records(
        dataset="utkface",
        split=split,
        root=str(base),
        paths=[parsed[i][0] for i in chosen],
        labels=np.array([parsed[i][1] for i in chosen], dtype=np.int64).reshape(-1, len(UTKFACE_TASKS)),
        task_names=list(UTKFACE_TASKS),
        num_classes=list(UTKFACE_CLASSES),
        skipped=log,
    )
