"""ChestX-ray14 as distributed: ``images*/**.png`` (searched recursively), ``Data_Entry_2017.csv``
or ``Data_Entry_2017_v2020.csv``, ``train_val_list.txt``, ``test_list.txt`` (docs/method.md section 2.5).
Images are matched to the lists by name; ``.jpg`` files are found too (a protected copy published as JPEG).

``Finding Labels`` is pipe-separated, ``No Finding`` meaning all 14 are 0. The 2017 CSV header ends
with an empty column; the 2020 revision has 11 columns; both are read by column name.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from ..records import DatasetFormatError, Records, SkipLog
from ..specs import CHESTXRAY_FINDINGS
from ._io import find_files, match_listed, read_lines, require_file, require_root

LIST_OF_SPLIT = {"train": "train_val_list.txt", "test": "test_list.txt"}
CSV_NAMES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
FINDING_INDEX = {name: k for k, name in enumerate(CHESTXRAY_FINDINGS)}
#: The release's PNGs; ``.jpg``: a protected copy published as JPEG (its lists name them so).
IMAGE_SUFFIXES = (".png", ".jpg")


def _read_entries(csv_path: Path, log: SkipLog) -> dict[str, np.ndarray]:
    with open(csv_path, encoding="utf-8", errors="replace", newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        try:
            name_col, label_col = header.index("Image Index"), header.index("Finding Labels")
        except ValueError:
            raise DatasetFormatError(
                f"chestxray: {csv_path} must have the columns 'Image Index' and 'Finding Labels', got {header[:4]}"
            ) from None
        entries: dict[str, np.ndarray] = {}
        for row in reader:
            if len(row) <= max(name_col, label_col) or not row[name_col].strip():
                log.skip("malformed_csv_rows", ",".join(row)[:40])
                continue
            name, findings = row[name_col].strip(), row[label_col].strip()
            vector = np.zeros(len(CHESTXRAY_FINDINGS), dtype=np.int64)
            if findings != "No Finding":
                parts = findings.split("|")
                if not findings or any(p not in FINDING_INDEX for p in parts):
                    log.skip("malformed_csv_rows", f"{name} ({findings})")
                    continue
                vector[[FINDING_INDEX[p] for p in parts]] = 1
            entries[name] = vector
        return entries


def read(root: str | Path, split: str, strict: bool = False) -> Records:
    base = require_root("chestxray", root)
    csv_path = require_file("chestxray", base, *CSV_NAMES)
    list_path = require_file("chestxray", base, LIST_OF_SPLIT[split])
    log = SkipLog("chestxray", strict)
    entries = _read_entries(csv_path, log)
    images = find_files(base, IMAGE_SUFFIXES)
    names = [line.strip() for line in read_lines(list_path)]
    paths, labels = match_listed(names, entries, images, len(CHESTXRAY_FINDINGS), log)
    return Records(
        dataset="chestxray",
        split=split,
        root=str(base),
        paths=paths,
        labels=labels,
        task_names=list(CHESTXRAY_FINDINGS),
        num_classes=[2] * len(CHESTXRAY_FINDINGS),
        skipped=log,
    )
