"""Writing a finished report to a run folder: ``report.json`` (strict JSON), ``report.md`` and the
PNG figures under ``figures/``, each file atomically.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..fileio import atomic_path
from .figures import DPI, metrics_figure, samples_figure
from .schema import to_json_safe
from .text import render_markdown

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def write_report(
    out_dir: str | Path,
    report: Mapping,
    *,
    clean_images: Any = None,
    protected_images: Any = None,
    channels: Sequence[int] | None = None,
    num_samples: int = 8,
) -> dict:
    """Write ``report.json``, ``report.md``, ``figures/metrics.png`` (and ``figures/samples.png``
    when both image arrays are given) under ``out_dir``, each atomically; PNGs at :data:`DPI`.

    Args:
        report: the dict of :func:`build_report` (written as given; renderers tolerate gaps).
        clean_images, protected_images: uint8 ``[N, C, H, W]`` arrays for the sample grid (memory maps
            are fine: only the shown rows are read).
        channels: image channels to show (1 index: grayscale, 3: RGB); None: channel 0 for 1- or
            2-channel images, else the first three.
        num_samples: columns of the sample grid (evenly spaced rows of the arrays).

    Returns:
        The report as written: JSON-safe (NaN/inf -> None, numpy scalars -> Python, tuples -> lists),
        equal to ``json.loads`` of ``report.json``.
    """
    if (clean_images is None) != (protected_images is None):
        raise ValueError("give both clean_images and protected_images, or neither")
    out = Path(out_dir)
    data = to_json_safe(dict(report))
    _write_text(out / "report.json", json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n")
    _write_text(out / "report.md", render_markdown(data))
    _write_figure(out / "figures" / "metrics.png", metrics_figure(data))
    if clean_images is not None:
        figure = samples_figure(clean_images, protected_images, channels=channels, count=num_samples)
        _write_figure(out / "figures" / "samples.png", figure)
    return data


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _write_figure(path: Path, figure: Figure) -> None:
    """Save ``figure`` as a PNG at :data:`DPI` (atomically)."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)
