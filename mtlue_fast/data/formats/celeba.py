"""CelebA as distributed: ``img_align_celeba/*.jpg``, ``list_attr_celeba.txt``,
``list_eval_partition.txt`` (docs/method.md section 2.5).

The attribute file's first line is a count that is never trusted; the second the 40 names; then
``name v1..v40`` with -1/1 separated by one or two spaces, often with CRLF endings. Partition 0 is
train, 2 test (1, validation, is unused). Images are matched to the lists by name, so a published
protected copy (PNG names in its lists) reads like the release.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..records import DatasetFormatError, Records, SkipLog
from ._io import match_listed, read_lines, require_file, require_root

PARTITION_OF_SPLIT = {"train": "0", "test": "2"}
IMAGE_DIR = "img_align_celeba"


def read(root: str | Path, split: str, strict: bool = False) -> Records:
    base = require_root("celeba", root)
    attr_file = require_file("celeba", base, "list_attr_celeba.txt")
    partition_file = require_file("celeba", base, "list_eval_partition.txt")
    image_dir = base / IMAGE_DIR
    if not image_dir.is_dir():
        raise DatasetFormatError(f"celeba: expected the image folder {image_dir}, not found")
    log = SkipLog("celeba", strict)

    lines = read_lines(attr_file)
    if len(lines) < 2:
        raise DatasetFormatError(f"celeba: {attr_file} must start with a count line and the attribute names")
    names = lines[1].split()
    attributes: dict[str, np.ndarray] = {}
    for line in lines[2:]:
        fields = line.split()
        values = fields[1:]
        if len(values) != len(names) or any(v not in ("1", "-1") for v in values):
            log.skip("malformed_attribute_rows", fields[0] if fields else line[:40])
            continue
        attributes[fields[0]] = (np.array(values, dtype=np.int64) > 0).astype(np.int64)

    wanted = PARTITION_OF_SPLIT[split]
    in_split: list[str] = []
    for line in read_lines(partition_file):
        fields = line.split()
        if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
            log.skip("malformed_partition_rows", line[:40])
        elif fields[1] == wanted:
            in_split.append(fields[0])

    on_disk = {p.name: p for p in image_dir.iterdir() if p.is_file()}
    paths, labels = match_listed(sorted(in_split), attributes, on_disk, len(names), log)
    listed = set(attributes) | set(in_split)
    for name in sorted(on_disk.keys() - listed):
        if name.endswith((".jpg", ".png")):  # .png: a published protected copy
            log.skip("unlisted_images", name)
    return Records(
        dataset="celeba",
        split=split,
        root=str(base),
        paths=paths,
        labels=labels,
        task_names=names,
        num_classes=[2] * len(names),
        skipped=log,
    )
