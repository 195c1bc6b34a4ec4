"""A robustness sweep's outputs: ``sweep.md`` (:func:`sweep_markdown`), the terminal tables
(:func:`sweep_text`), ``figures/sweep.png`` (:func:`sweep_figure`), all written by :func:`write_sweep`.

The input is ``sweep.json``'s content, as :mod:`mtlue_fast.sweep` builds it: ``dataset``,
``synthetic``, ``metric``, ``tasks``, ``method``, ``base``, ``eps``, ``mode`` (``product`` or
``one-axis``), ``run_recipe`` (the run's own ``{axis: value}``), ``axes`` (``{axis: [values]}``),
``seeds`` (the victim seeds of every cell), ``cells`` (entries of
:func:`~mtlue_fast.report.schema.summarize_cell`: ``name``, ``fields``, ``victims``, ``clean``,
``protected``, ``drop``, ``drop_std``, plus ``trained`` and ``seconds``), ``tables``
(``[{"axis", "cells": [names]}]``), ``left_out`` (``[{"axis", "value", "why"}]``: values of
``--axes paper`` that cannot train on the data) and ``seconds``. Scores are in the metric's units; drop = clean
mean - protected mean, its std over a cell's victim seeds (ddof=1; none with one seed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..fileio import atomic_path
from .figures import DPI, _new_figure
from .schema import to_json_safe
from .stats import _defined
from .text import _eps_text, _fmt, _md_table, _metric_text, _value, cell_rows

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TITLES = {"backbone": "Victim backbone", "weighting": "Task weighting", "victim": "MTL or STL victims",
          "defense": "Victim-side defence"}  # fmt: skip


def _cells_by_name(data: Mapping) -> dict[str, Mapping]:
    return {str(c.get("name")): c for c in data.get("cells") or [] if isinstance(c, Mapping)}


def _drop_text(drop: Any, std: Any, digits: int = 4) -> str:
    """``0.1234 ± 0.0100``, or the drop alone when the std is undefined."""
    return _fmt(drop, digits) if math.isnan(_value(std)) else f"{_fmt(drop, digits)} ± {_fmt(std, digits)}"


def axis_rows(data: Mapping, table: Mapping) -> tuple[list[str], list[list[str]]]:
    """One axis' table: header and rows ``[value, clean, protected, drop ± std]``.

    ``one-axis`` mode: one row per cell of the table (the run's own value marked ``(run)``), the std
    over the cell's victim seeds. ``product`` mode: one row per value of the axis, each the mean over
    the cells with that value (the other axes vary), the std over those cells.
    """
    axis = str(table.get("axis"))
    by_name = _cells_by_name(data)
    cells = [by_name[n] for n in table.get("cells") or [] if n in by_name]
    run_value = (data.get("run_recipe") or {}).get(axis)
    if data.get("mode") != "product":
        rows = []
        for cell in cells:
            value = str((cell.get("fields") or {}).get(axis, "?"))
            rows.append([value + (" (run)" if value == run_value else ""), _fmt((cell.get("clean") or {}).get("mean")),
                         _fmt((cell.get("protected") or {}).get("mean")), _drop_text(cell.get("drop"), cell.get("drop_std"))])
        return [axis, "clean", "protected", "drop ± std (over seeds)"], rows
    rows = []
    for value in (data.get("axes") or {}).get(axis) or []:
        group = [c for c in cells if (c.get("fields") or {}).get(axis) == value]
        clean = _defined([_value((c.get("clean") or {}).get("mean")) for c in group])
        prot = _defined([_value((c.get("protected") or {}).get("mean")) for c in group])
        drops = _defined([_value(c.get("drop")) for c in group])
        std = float(np.std(drops, ddof=1)) if len(drops) >= 2 else math.nan
        rows.append([f"{value} ({len(group)} cells)", _fmt(np.mean(clean) if clean else math.nan),
                     _fmt(np.mean(prot) if prot else math.nan), _drop_text(np.mean(drops) if drops else math.nan, std)])
    return [axis, "clean (mean)", "protected (mean)", "drop ± std (over cells)"], rows


def sweep_markdown(data: Mapping) -> str:
    """The readable ``sweep.md``: settings, one table per axis, every cell, timings."""
    dataset = data.get("dataset", "?")
    lines = [f"# MTL-UE robustness sweep: {dataset}", ""]
    if data.get("synthetic"):
        lines += ["> **WARNING: SYNTHETIC DATA.** These numbers come from the built-in synthetic stand-in for "
                  f"{dataset}, not from the real dataset. They check the pipeline; they are NOT results.", ""]
    run = data.get("run_recipe") or {}
    seeds = ", ".join(str(s) for s in data.get("seeds") or []) or "n/a"
    mode = ("one axis at a time, the others at the run's settings" if data.get("mode") != "product"
            else "every combination of the listed values")  # fmt: skip
    lines += [
        f"Protected export: {data.get('method', '?')} (base {data.get('base', '?')}), eps {_eps_text(data.get('eps'))}. "
        f"Metric: {_metric_text(data.get('metric'))}. Victim seeds per cell: {seeds}. Cells: {mode}.",
        "",
        "The run's own victim recipe: " + ", ".join(f"{k} `{v}`" for k, v in run.items()) + ".",
        "",
        "Each cell trains, per victim seed, one victim on the clean and one on the protected data under the "
        "cell's recipe; drop = clean mean - protected mean.",
        "",
    ]
    for table in data.get("tables") or []:
        axis = str(table.get("axis"))
        header, rows = axis_rows(data, table)
        suffix = " (means over the other axes)" if data.get("mode") == "product" else ""
        lines += [f"## {TITLES.get(axis, axis)}{suffix}", ""]
        lines += _md_table(header, rows, (False, True, True, True)) + [""]
    cells = [c for c in data.get("cells") or [] if isinstance(c, Mapping)]
    header, rows = cell_rows(cells)
    for cell, row in zip(cells, rows):
        seconds = cell.get("seconds")
        row.append(f"{_fmt(seconds, 0)} s" if cell.get("trained") else "earlier")
    lines += ["## Every cell", ""]
    lines += _md_table([*header, "trained"], rows, [False] * (len(header) - 4) + [True] * 5) + [""]
    left_out = [e for e in data.get("left_out") or [] if isinstance(e, Mapping)]
    if left_out:
        lines += ["Left out (they cannot train on this data): " + "; ".join(
            f"{e.get('axis', '?')} `{e.get('value', '?')}` ({e.get('why', '?')})" for e in left_out) + ".", ""]
    trained = sum(bool(c.get("trained")) for c in cells)
    lines += [f"{len(cells)} cells: {trained} trained by this sweep, {len(cells) - trained} finished earlier; "
              f"{_fmt(data.get('seconds'), 0)} s in all.", ""]
    return "\n".join(lines).rstrip() + "\n"


def sweep_text(data: Mapping) -> str:
    """The per-axis tables as plain text for the terminal."""
    blocks = []
    for table in data.get("tables") or []:
        header, rows = axis_rows(data, table)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        line = lambda r: "  ".join([r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, len(r))])  # noqa: E731
        blocks.append("\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]))
    return "\n\n".join(blocks)


def sweep_figure(data: Mapping) -> Figure:
    """A heatmap of the drop: one row per cell (labelled by its recipe), one column; each square is
    annotated with the drop ± its std over seeds. Undefined drops are grey."""
    cells = [c for c in data.get("cells") or [] if isinstance(c, Mapping)]
    labels = [" / ".join(str(v) for v in (c.get("fields") or {}).values()) for c in cells]
    drops = np.asarray([_value(c.get("drop")) for c in cells] or [math.nan], dtype=np.float64)
    figure = _new_figure(max(4.5, 2.2 + 0.07 * max((len(s) for s in labels), default=10)), 1.4 + 0.32 * max(len(cells), 1))
    ax = figure.add_subplot()
    finite = drops[np.isfinite(drops)]
    low = min(0.0, float(finite.min())) if finite.size else 0.0
    high = max(float(finite.max()), low + 1e-6) if finite.size else 1.0
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="#cccccc")
    image = ax.imshow(np.ma.masked_invalid(drops[:, None]), cmap=cmap, vmin=low, vmax=high, aspect="auto")
    for i, cell in enumerate(cells):
        level = (drops[i] - low) / (high - low) if math.isfinite(drops[i]) else 0.0
        ax.text(0, i, _drop_text(cell.get("drop"), cell.get("drop_std"), 3), ha="center", va="center", fontsize=8,
                color="black" if level > 0.6 else "white")
    ax.set_yticks(np.arange(len(cells)), labels, fontsize=8)
    ax.set_xticks([0], ["drop (clean - protected)"], fontsize=9)
    figure.colorbar(image, ax=ax, fraction=0.08, pad=0.04).set_label("drop", fontsize=8)
    synthetic = "SYNTHETIC DATA - " if data.get("synthetic") else ""
    keys = " / ".join(str(k) for k in (cells[0].get("fields") or {})) if cells else "recipe"
    seeds = [str(s) for s in data.get("seeds") or []]
    spread = f"± std over victim seeds {', '.join(seeds)}" if len(seeds) > 1 else f"victim seed {''.join(seeds) or '?'}"
    figure.suptitle(f"{synthetic}{data.get('dataset', '?')}: drop per victim recipe\n({keys}; {spread})", fontsize=9,
                    color="#b00000" if data.get("synthetic") else "black")  # fmt: skip
    return figure


def write_sweep(out_dir: str | Path, data: Mapping) -> dict:
    """Write ``sweep.json`` (strict JSON), ``sweep.md`` and ``figures/sweep.png`` under ``out_dir``,
    each atomically; returns the JSON-safe data as written."""
    out = Path(out_dir)
    safe = to_json_safe(dict(data))
    with atomic_path(out / "sweep.json") as tmp:
        tmp.write_text(json.dumps(safe, indent=1, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")
    with atomic_path(out / "sweep.md") as tmp:
        tmp.write_text(sweep_markdown(safe), encoding="utf-8")
    with atomic_path(out / "figures" / "sweep.png") as tmp:
        sweep_figure(safe).savefig(tmp, format="png", dpi=DPI)
    return safe
