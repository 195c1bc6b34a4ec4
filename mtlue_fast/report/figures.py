"""The report's figures, drawn with matplotlib's Agg renderer (no pyplot, no global state; imported on
first use): ``metrics.png`` (:func:`metrics_figure`: clean vs protected per task, means over victim
seeds with their std) and ``samples.png`` (:func:`samples_figure`: clean, protected and amplified
``|delta|`` images).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .stats import SIDES, _check_images, _defined
from .text import _defense_name, _eps_text, _fmt, _means, _metric_name, _seed_count_text, _value, _victims

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

METRIC_LABELS = {"accuracy": "accuracy", "auc": "ROC-AUC"}
DPI = 150  # figures are saved at this resolution
MIN_FIGURE_INCHES = 8.0  # metrics.png is at least 8 in (1200 px at DPI) wide
INCHES_PER_TASK = 0.35  # ... and this much wider per task
TILE_INCHES = 1.2  # one image of samples.png
COLORS = {"clean": "#427eba", "protected": "#e87926"}


def _new_figure(width: float, height: float) -> Figure:
    """An empty figure of ``width`` x ``height`` inches rendered by Agg (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _abbreviate(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else name[: limit - 2] + ".."


def _task_list(report: Mapping) -> list[str]:
    """The report's tasks, else those of the clean scores."""
    return [str(t) for t in report.get("tasks") or ((report.get("clean") or {}).get("per_task") or {})]


def _seed_values(report: Mapping, side: str, task: str | None) -> list[float]:
    """The defined values over victim seeds of one side's ``per_task[task]`` (``task`` None: ``mean``);
    without ``victims``, the top-level value alone."""
    victims = _victims(report)
    entries = [v.get(side) or {} for v in victims] if victims else [report.get(side) or {}]
    if task is None:
        return _defined([_value(e.get("mean")) for e in entries])
    return _defined([_value((e.get("per_task") or {}).get(task)) for e in entries])


def _seed_stats(report: Mapping, side: str, tasks: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per task: the mean over seeds and the sample std (ddof=1; NaN with fewer than 2 seeds), ``[T]`` each."""
    means, stds = [], []
    for task in tasks:
        values = _seed_values(report, side, task)
        means.append(np.mean(values) if values else math.nan)
        stds.append(np.std(values, ddof=1) if len(values) >= 2 else math.nan)
    return np.asarray(means, dtype=np.float64), np.asarray(stds, dtype=np.float64)


def _figure_title(report: Mapping) -> str:
    """Two lines: (SYNTHETIC,) dataset, method/base and eps; the victims' and the surrogate's recipes."""
    synthetic = "SYNTHETIC DATA - " if report.get("synthetic") else ""
    surrogate = report.get("surrogate") if isinstance(report.get("surrogate"), Mapping) else {}
    seeds = ", ".join(str(v.get("seed", "?")) for v in _victims(report)) or "?"
    defense = _defense_name(report.get("defense"))
    first = (f"{synthetic}{report.get('dataset', '?')}: {report.get('method', '?')} (base {report.get('base', '?')}), "
             f"eps {_eps_text(report.get('eps')).split(' ')[0]}")
    second = (f"victims: {report.get('victim', '?')} {report.get('backbone', '?')} / {report.get('weighting', '?')}, "
              f"seeds {seeds}{f', defence {defense}' if defense else ''}; surrogate: "
              f"{surrogate.get('backbone', '?')} / {surrogate.get('weighting', '?')}, seed {surrogate.get('seed', '?')}")
    return f"{first}\n{second}"


def _axis_label(report: Mapping) -> str:
    """The y label of the classification figure, e.g. ``ROC-AUC on clean test data (mean over 3 seeds)``."""
    name = METRIC_LABELS.get(str(report.get("metric")), _metric_name(report))
    n = len(_victims(report))
    return f"{name} on clean test data" + (f"\n(mean over {n} victim seeds, bars: std)" if n > 1 else "")


def _drop_label(report: Mapping, what: str = "mean drop") -> str:
    """``mean drop (clean - protected): 0.123 ± 0.010 over 3 seeds`` (3 decimals)."""
    _, _, drop, std = _means(report)
    n = len(_victims(report))
    spread = f" ± {_fmt(std, 3)} (std over {n} seeds)" if not math.isnan(std) else f" ({_seed_count_text(report)})"
    return f"{what} (clean - protected): {_fmt(drop, 3)}{spread}"


def metrics_figure(report: Mapping) -> Figure:
    """Clean vs protected per task, each bar the mean over victim seeds with its std as error bar.

    Classification reports: one axis of grouped bars, ``INCHES_PER_TASK`` per task and at least
    ``MIN_FIGURE_INCHES`` wide (1200 px at :data:`DPI`), task names rotated when there are many or
    they are long, dashed lines at the clean and protected means. Dense reports (``metric`` a dict):
    one small axis per task in its own units. The title names dataset, method/base, eps, both recipes
    and SYNTHETIC when synthetic; the mean drop ± std is printed above the bars. NaN draws no bar.
    """
    if isinstance(report.get("metric"), Mapping):
        return _dense_metrics_figure(report)
    return _classification_figure(report)


def _classification_figure(report: Mapping) -> Figure:
    """Grouped bars (clean, protected) per task on a [0, 1] axis; see :func:`metrics_figure`."""
    tasks = _task_list(report)
    n = max(len(tasks), 1)
    labels = [_abbreviate(t) for t in tasks]
    rotate = n > 8 or max((len(s) for s in labels), default=0) > 12
    label_inches = 0.07 * max((len(s) for s in labels), default=0) if rotate else 0.3
    figure = _new_figure(max(MIN_FIGURE_INCHES, INCHES_PER_TASK * n + 1.6), 4.4 + label_inches)
    ax = figure.add_subplot()
    x = np.arange(len(tasks))
    for offset, side in ((-0.2, "clean"), (0.2, "protected")):
        mean, std = _seed_stats(report, side, tasks)
        _bars(ax, x + offset, mean, std, side, capsize=2.0 if n <= 20 else 1.0)
    c, p, _, _ = _means(report)
    for side, level in (("clean", c), ("protected", p)):
        if math.isfinite(level):
            ax.axhline(level, color=COLORS[side], linestyle="--", linewidth=1.0, label=f"{side} mean {level:.3f}")
    _task_ticks(ax, x, labels, rotate)
    ax.set_xlim(-0.6, max(len(tasks), 1) - 0.4)
    ax.set_ylim(0.0, 1.05)  # scores in [0, 1]; room for error bars near 1
    ax.set_yticks(np.linspace(0.0, 1.0, 6))
    ax.set_ylabel(_axis_label(report))
    ax.grid(axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=4, frameon=False, fontsize=8)
    ax.set_title(_drop_label(report), loc="right", fontsize=9, pad=20)
    _suptitle(figure, report)
    return figure


def _task_ticks(ax: Axes, x: np.ndarray, labels: Sequence[str], rotate: bool) -> None:
    """Task names under the groups: flat when few and short, slanted up to 16, vertical beyond."""
    if not rotate:
        ax.set_xticks(x, labels, fontsize=9)
    elif len(labels) <= 16:
        ax.set_xticks(x, labels, rotation=45, ha="right", rotation_mode="anchor", fontsize=9)
    else:
        ax.set_xticks(x, labels, rotation=90, fontsize=8)


def _bars(ax: Axes, x: np.ndarray, mean: np.ndarray, std: np.ndarray, side: str, capsize: float) -> None:
    """One side's bars at ``x`` with std error bars where defined (NaN heights draw nothing)."""
    yerr = np.where(np.isfinite(std), std, 0.0) if np.isfinite(std).any() else None
    ax.bar(x, np.nan_to_num(mean, nan=0.0), 0.4, color=COLORS[side], label=f"{side} victims",
           yerr=yerr, capsize=capsize, error_kw={"elinewidth": 0.8, "ecolor": "#333333"})  # fmt: skip
    for xi in x[~np.isfinite(mean)]:
        ax.text(xi, 0.0, "n/a", rotation=90, ha="center", va="bottom", fontsize=6, color="#777777")


def _dense_metrics_figure(report: Mapping) -> Figure:
    """One small axis per task (its own units): clean and protected bars with std error bars."""
    tasks = _task_list(report)
    units = report.get("metric") or {}
    figure = _new_figure(max(MIN_FIGURE_INCHES, 2.8 * len(tasks)), 4.4)
    axes = figure.subplots(1, max(len(tasks), 1), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        for i, side in enumerate(SIDES):
            mean, std = _seed_stats(report, side, [task])
            _bars(ax, np.asarray([i]), mean, std, side, capsize=4.0)
        ax.set_xticks([0, 1], ["clean", "protected"], fontsize=8)
        ax.set_title(task, fontsize=10)
        ax.set_ylabel(str(units.get(task, task)), fontsize=8)
        ax.grid(axis="y", color="#dddddd", linewidth=0.6)
        ax.set_axisbelow(True)
    figure.supxlabel(_drop_label(report, "mean drop in the primary metric"), fontsize=9)
    _suptitle(figure, report)
    return figure


def _suptitle(figure: Figure, report: Mapping) -> None:
    figure.suptitle(_figure_title(report), fontsize=10, color="#b00000" if report.get("synthetic") else "black")


def samples_figure(clean: Any, protected: Any, *, channels: Sequence[int] | None = None,
                   count: int = 8) -> Figure:
    """A grid of up to ``count`` evenly spaced training images (columns, titled with their row index):
    rows clean, protected, and ``|protected - clean|`` amplified so that its largest value over the
    shown images is white (grayscale, or RGB per channel). ``TILE_INCHES`` per image."""
    n = _check_images(clean, protected)
    idx = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64))
    chans = _display_channels(clean.shape[1], channels)
    c = np.asarray(clean[idx])[:, chans]
    p = np.asarray(protected[idx])[:, chans]
    magnitude = np.abs(p.astype(np.int16) - c.astype(np.int16))
    peak = int(magnitude.max(initial=0))
    gain = 255.0 / peak if peak else 1.0
    amplified = np.clip(np.round(magnitude * gain), 0, 255).astype(np.uint8)
    delta_label = f"|delta| x{gain:.1f}\n(max {peak} = white)" if peak else "|delta|\n(all zero)"
    rows = [("clean", c), ("protected", p), (delta_label, amplified)]
    return _image_grid(rows, [f"#{i}" for i in idx])


def _display_channels(num: int, channels: Sequence[int] | None) -> list[int]:
    """Channel indices to show: 1 (grayscale) or 3 (RGB)."""
    if channels is None:
        return [0] if num < 3 else [0, 1, 2]
    chans = [int(ch) for ch in channels]
    if len(chans) not in (1, 3) or not all(0 <= ch < num for ch in chans):
        raise ValueError(f"channels must be 1 or 3 indices below {num}, got {channels!r}")
    return chans


def _image_grid(rows: Sequence[tuple[str, np.ndarray]], columns: Sequence[str]) -> Figure:
    """Rows of uint8 ``[B, 1 or 3, H, W]`` images with their labels on the left and ``columns`` on top."""
    height, width = rows[0][1].shape[2:]
    tile_h = TILE_INCHES * min(max(height / width, 0.25), 4.0)
    figure = _new_figure(1.1 + TILE_INCHES * len(columns), 0.3 + tile_h * len(rows))
    axes = figure.subplots(len(rows), len(columns), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for j, ax in enumerate(axes[r]):
            image = images[j]
            if image.shape[0] == 1:
                ax.imshow(image[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            else:
                ax.imshow(image.transpose(1, 2, 0), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(columns[j], fontsize=8)
            if j == 0:
                ax.set_ylabel(label, fontsize=8)
    return figure
