"""Small helpers shared by the readers: required files, text lines, recursive file search."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..records import DatasetFormatError, SkipLog


def require_root(dataset: str, root: str | Path) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetFormatError(f"{dataset}: dataset root {path} does not exist or is not a folder")
    return path.resolve()


def require_file(dataset: str, root: Path, *names: str) -> Path:
    """The first of ``names`` that exists under ``root``; an error naming all of them otherwise."""
    for name in names:
        if (root / name).is_file():
            return root / name
    expected = " or ".join(names)
    raise DatasetFormatError(f"{dataset}: expected {expected} in {root}, not found")


def read_lines(path: Path) -> list[str]:
    """Lines without their CR/LF endings; blank lines dropped. Handles CRLF files."""
    with open(path, encoding="utf-8", errors="replace", newline="") as fh:
        return [line.rstrip("\r\n") for line in fh if line.strip()]


def find_files(root: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """Every file under ``root`` (recursively) whose name ends with one of ``suffixes``, by name.

    When a name occurs twice the first in sorted walk order wins.
    """
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith(suffixes):
                found.setdefault(name, Path(dirpath) / name)
    return found


def match_listed(
    names: list[str], labels: dict[str, np.ndarray], files: dict[str, Path], num_tasks: int, log: SkipLog
) -> tuple[list[str], np.ndarray]:
    """Paths and stacked int64 labels ``[N, num_tasks]`` of the listed ``names`` that have both a
    label row and a file; the others are skipped as images without labels or missing images."""
    paths, rows = [], []
    for name in names:
        if name not in labels:
            log.skip("images_without_labels", name)
        elif name not in files:
            log.skip("missing_images", name)
        else:
            paths.append(str(files[name]))
            rows.append(labels[name])
    return paths, np.stack(rows) if rows else np.zeros((0, num_tasks), np.int64)
