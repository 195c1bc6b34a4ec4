"""The report as text: ``report.md`` (:func:`render_markdown`) and the terminal table
(:func:`summary_table`). Both tolerate gaps: a missing or undefined value prints as ``n/a``.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from .schema import to_json_safe


def _value(x: Any) -> float:
    """A number or NaN (for None, missing, non-numeric)."""
    if isinstance(x, numbers.Real) and not isinstance(x, bool):
        return float(x)
    return math.nan


def _fmt(x: Any, digits: int = 4, sign: bool = False) -> str:
    """``x`` with ``digits`` decimals (leading ``+`` when ``sign``), or ``n/a``."""
    v = _value(x)
    if math.isnan(v):
        return "n/a"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _victims(report: Mapping) -> list[Mapping]:
    """The report's per-seed victim entries (an empty list when absent)."""
    return [v for v in report.get("victims") or [] if isinstance(v, Mapping)]


def _score_rows(report: Mapping) -> list[tuple[str, float, float, float]]:
    """``(task, clean, protected, protected - clean)`` per task: the means over victim seeds."""
    clean = (report.get("clean") or {}).get("per_task") or {}
    prot = (report.get("protected") or {}).get("per_task") or {}
    rows = []
    for task in report.get("tasks") or list(clean):
        c, p = _value(clean.get(task)), _value(prot.get(task))
        rows.append((str(task), c, p, p - c))
    return rows


def _means(report: Mapping) -> tuple[float, float, float, float]:
    """``(clean mean, protected mean, drop, drop std)`` (NaN where undefined); the drop is recomputed
    when the field is absent."""
    c = _value((report.get("clean") or {}).get("mean"))
    p = _value((report.get("protected") or {}).get("mean"))
    drop = _value(report.get("drop")) if "drop" in report else c - p
    return c, p, drop, _value(report.get("drop_std"))


def _metric_name(report: Mapping) -> str:
    metric = report.get("metric")
    if isinstance(metric, Mapping):
        return "primary metric"
    return str(metric or "metric")


def _seed_count_text(report: Mapping) -> str:
    """``"3 victim seeds"`` / ``"1 victim seed"``."""
    n = len(_victims(report))
    return f"{n} victim seed{'' if n == 1 else 's'}"


def _drop_text(report: Mapping, digits: int = 4) -> str:
    """The mean drop ± its sample std with the seed count, e.g. ``0.1234 ± 0.0100 (mean ± std over 3
    victim seeds)``; with one seed ``0.1234 (1 victim seed, no std)``."""
    _, _, drop, std = _means(report)
    seeds = _seed_count_text(report)
    if math.isnan(std):
        return f"{_fmt(drop, digits)} ({seeds}, no std)"
    return f"{_fmt(drop, digits)} ± {_fmt(std, digits)} (mean ± std over {seeds})"


def summary_table(report: Mapping) -> str:
    """A plain-text table for the terminal: task, clean, protected, diff (protected - clean), each the
    mean over victim seeds, then the means and the drop (clean mean - protected mean) ± its std over
    seeds with the seed count."""
    rows = [(t, _fmt(c), _fmt(p), _fmt(d, sign=True)) for t, c, p, d in _score_rows(report)]
    c, p, _, _ = _means(report)
    mean_row = ("mean", _fmt(c), _fmt(p), _fmt(p - c, sign=True))
    header = ("task", "clean", "protected", "diff")
    table = [header, *rows, mean_row]
    widths = [max(len(r[i]) for r in table) for i in range(4)]

    def line(r: Sequence[str]) -> str:
        return "  ".join([r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, 4)])

    rule = "  ".join("-" * w for w in widths)
    lines = [line(header), rule, *(line(r) for r in rows), rule, line(mean_row)]
    lines.append(f"drop ({_metric_name(report)}, clean - protected): {_drop_text(report)}")
    return "\n".join(lines)


def _eps_text(eps: Any) -> str:
    """``eps`` on the [0, 1] scale as ``k/255 (0.0314)``."""
    v = _value(eps)
    if math.isnan(v):
        return "n/a"
    k = v * 255
    k_text = f"{k:.0f}" if abs(k - round(k)) < 1e-6 else f"{k:.2f}"
    return f"{k_text}/255 ({v:.4f})"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    """Markdown table lines (cells with ``|`` escaped); ``right`` aligns columns to the right."""
    esc = [[str(c).replace("|", "\\|") for c in r] for r in [header, *rows]]
    lines = ["| " + " | ".join(esc[0]) + " |"]
    lines.append("|" + "|".join("---:" if r else ":---" for r in right) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return lines


def _defense_name(defense: Any) -> str | None:
    """The defence's name: the string itself, a dict's ``name`` (else compact JSON), None if unset."""
    if defense is None or defense == "none":
        return None
    if isinstance(defense, Mapping):
        return str(defense.get("name") or json.dumps(to_json_safe(defense), sort_keys=True))
    return str(defense)


def _md_header(report: Mapping) -> list[str]:
    """Title, the synthetic warning and the settings table."""
    dataset = report.get("dataset", "?")
    lines = [f"# MTL-UE report: {dataset}", ""]
    if report.get("synthetic"):
        lines += [
            "> **WARNING: SYNTHETIC DATA.** These numbers come from the built-in synthetic stand-in for "
            f"{dataset}, not from the real dataset. They check the pipeline; they are NOT results.",
            "",
        ]
    settings = [
        ("dataset", dataset),
        ("synthetic", "YES (synthetic stand-in data)" if report.get("synthetic") else "no"),
        ("data root", report.get("data_root") or "n/a"),
        ("method", report.get("method", "?")),
        ("base", report.get("base", "?")),
        ("eps", _eps_text(report.get("eps"))),
        ("metric", _metric_text(report.get("metric"))),
        ("victim defence", _defense_name(report.get("defense")) or "none"),
        ("clean cache", report.get("clean_cache") or "n/a"),
        ("git", report.get("git") or "n/a"),
    ]
    return lines + ["## Settings", ""] + _md_table(("setting", "value"), settings, (False, False)) + [""]


def _metric_text(metric: Any) -> str:
    if isinstance(metric, Mapping):
        return "; ".join(f"{k}: {v}" for k, v in metric.items())
    return str(metric or "?")


#: What the recipe table shows of each model; width and epochs only in reports that record them.
RECIPE_COLUMNS = ("backbone", "weighting", "width", "epochs")


def _md_recipes(report: Mapping) -> list[str]:
    """The surrogate's recipe (what the generator attacked) next to the victims' (what measures it),
    and the defence sentence."""
    surrogate = report.get("surrogate") if isinstance(report.get("surrogate"), Mapping) else {}
    seeds = ", ".join(str(v.get("seed", "?")) for v in _victims(report)) or "n/a"
    columns = [c for c in RECIPE_COLUMNS if c in surrogate or c in report]
    rows = [
        ("surrogate (attacked by the generator)", str(surrogate.get("seed", "n/a")),
         *(str(surrogate.get(c, "n/a")) for c in columns)),
        (f"victims, {report.get('victim', '?')} (measure the protection)", seeds, *(str(report.get(c, "?")) for c in columns)),
    ]  # fmt: skip
    lines = ["## Surrogate and victims", ""]
    lines += _md_table(("model", "seed(s)", *columns), rows, (False, True, *(c in ("width", "epochs") for c in columns))) + [""]
    differ = [c for c in columns if c in surrogate and c in report and surrogate[c] != report[c]]
    if differ:
        lines += [f"The victims' recipe differs from the surrogate's ({', '.join(differ)}): the drop measures transfer.", ""]
    if report.get("clean_victim"):
        lines += [f"Clean victims: {report['clean_victim']}.", ""]
    defense = _defense_name(report.get("defense"))
    if defense:
        lines += [
            f"Both victims of each seed (clean and protected) trained under the defence `{defense}`, so the drop "
            "is what the protection still costs a defended victim.",
            "",
        ]
    return lines


def _md_results(report: Mapping) -> list[str]:
    """The per-seed table, the drop's mean ± std, and the per-task table of means over seeds."""
    metric = _metric_text(report.get("metric"))
    lines = ["## Results", "", f"Metric: {metric}. Each victim seed trains one victim on the clean and one on "
             "the protected data; drop = clean mean - protected mean.", "", "### Per victim seed", ""]
    seed_rows = [(str(v.get("seed", "?")), _fmt((v.get("clean") or {}).get("mean")),
                  _fmt((v.get("protected") or {}).get("mean")), _fmt(v.get("drop"))) for v in _victims(report)]
    lines += _md_table(("seed", "clean mean", "protected mean", "drop"), seed_rows, (True, True, True, True))
    lines += ["", f"**Drop** (clean mean - protected mean): **{_drop_text(report)}**", ""]
    rows = [(f"`{t}`", _fmt(c), _fmt(p), _fmt(d, sign=True)) for t, c, p, d in _score_rows(report)]
    c, p, _, _ = _means(report)
    rows.append(("**mean**", _fmt(c), _fmt(p), _fmt(p - c, sign=True)))
    lines += [f"### Per task (mean over {_seed_count_text(report)})", "", "diff = protected - clean.", ""]
    lines += _md_table(("task", "clean", "protected", "diff"), rows, (False, True, True, True))
    return lines + [""]


RECIPE_ORDER = ("backbone", "weighting", "victim", "defense")  # recipe columns first, in this order


def cell_rows(cells: Sequence[Mapping], digits: int = 4) -> tuple[list[str], list[list[str]]]:
    """A table of victim recipes (entries of ``cells``): the header (the recipe fields, then seeds,
    clean, protected, drop ± std) and one row per cell; missing values print as ``n/a``."""
    fields = [f for f in RECIPE_ORDER if any(f in (c.get("fields") or {}) for c in cells)]
    for cell in cells:
        fields += [str(k) for k in (cell.get("fields") or {}) if str(k) not in fields]
    rows = []
    for cell in cells:
        values = cell.get("fields") or {}
        drop, std = _value(cell.get("drop")), _value(cell.get("drop_std"))
        spread = f"{_fmt(drop, digits)} ± {_fmt(std, digits)}" if not math.isnan(std) else _fmt(drop, digits)
        seeds = cell.get("seeds") or [v.get("seed") for v in cell.get("victims") or [] if isinstance(v, Mapping)]
        rows.append([str(values.get(f, "n/a")) for f in fields] + [
            ", ".join(str(s) for s in seeds) or "n/a", _fmt((cell.get("clean") or {}).get("mean"), digits),
            _fmt((cell.get("protected") or {}).get("mean"), digits), spread,
        ])  # fmt: skip
    return fields + ["seeds", "clean", "protected", "drop ± std"], rows


def _md_cells(report: Mapping) -> list[str]:
    """The run's finished victim recipes side by side (only when there is more than one)."""
    cells = [c for c in report.get("cells") or [] if isinstance(c, Mapping)]
    if len(cells) < 2:
        return []
    header, rows = cell_rows(cells)
    for cell, row in zip(cells, rows):
        if cell.get("current"):
            row[0] = f"**{row[0]}** (this run)"
    lines = ["## Victim recipes", "", f"Every victim recipe trained on this protected export ({len(cells)}); "
             "drop = clean mean - protected mean, ± its std over the cell's victim seeds.", ""]
    return lines + _md_table(header, rows, [False] * (len(header) - 4) + [True] * 4) + [""]


def _md_timings(report: Mapping) -> list[str]:
    """Seconds and images/s per stage."""
    timings = report.get("timings") or {}
    throughput = report.get("throughput") or {}
    stages = list(timings) + [s for s in throughput if s not in timings]
    if not stages:
        return []
    rows = [(s, _fmt(timings.get(s), 1), _fmt(throughput.get(s), 1)) for s in stages]
    total = sum(v for v in (_value(x) for x in timings.values()) if not math.isnan(v))
    rows.append(("**total**", f"{total:.1f}", ""))
    return ["## Timings", ""] + _md_table(("stage", "seconds", "images/s"), rows, (False, True, True)) + [""]


def _md_stats(report: Mapping) -> list[str]:
    """The perturbation statistics table (pixel units, 0..255)."""
    stats = report.get("perturbation_stats")
    if not isinstance(stats, Mapping):
        return []
    lines = ["## Perturbation statistics", "", "delta = protected - clean in pixel units (0..255). "
             "Intra-class std: per-pixel std of delta within a class, averaged (low = class-consistent "
             "shortcut).", ""]
    per_task = stats.get("per_task") or {}
    rows = [(f"`{t}`", _fmt((v or {}).get("intra_class_std"), 3), _fmt((v or {}).get("mean_abs_delta"), 3))
            for t, v in per_task.items() if isinstance(v, Mapping)]
    if rows:
        lines += _md_table(("task", "intra-class std", "mean abs delta"), rows, (False, True, True)) + [""]
    lines += [
        f"Overall mean |delta|: {_fmt(stats.get('mean_abs_delta'), 3)}; max |delta|: "
        f"{stats.get('max_abs_delta', 'n/a')}; samples: {stats.get('samples', 'n/a')}.",
        "",
    ]
    return lines


def _md_extra(title: str, entry: Any) -> list[str]:
    """An optional entry (``stl``, a ``defense`` dict): a per-task table when it has ``per_task``, and
    its remaining scalar fields; nested values as compact JSON."""
    if entry is None:
        return []
    lines = [f"## {title}", ""]
    if not isinstance(entry, Mapping):
        return lines + [f"`{json.dumps(to_json_safe(entry))}`", ""]
    per_task = entry.get("per_task")
    if isinstance(per_task, Mapping):
        rows = [(f"`{t}`", _cell(v)) for t, v in per_task.items()]
        lines += _md_table(("task", "value"), rows, (False, True)) + [""]
    rows = [(str(k), _cell(v)) for k, v in entry.items() if k != "per_task"]
    if rows:
        lines += _md_table(("field", "value"), rows, (False, False)) + [""]
    return lines


def _cell(value: Any) -> str:
    """A table cell: numbers with 4 decimals, strings as is, the rest compact JSON."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return _fmt(value) if isinstance(value, float) else str(value)
    if isinstance(value, str):
        return value
    return f"`{json.dumps(to_json_safe(value), sort_keys=True)}`"


def _md_versions(report: Mapping) -> list[str]:
    entries = report.get("versions") or {}
    if not entries:
        return []
    rows = [(str(k), _cell(v) if v is not None else "none") for k, v in entries.items()]
    return ["## Versions", ""] + _md_table(("package", "version"), rows, (False, False)) + [""]


def render_markdown(report: Mapping) -> str:
    """The readable ``report.md`` text of a report dict."""
    lines = _md_header(report) + _md_recipes(report) + _md_results(report) + _md_cells(report)
    lines += _md_extra("Single-task victims (stl)", report.get("stl"))
    if isinstance(report.get("defense"), Mapping):
        lines += _md_extra("Defense", report.get("defense"))
    lines += _md_stats(report) + _md_timings(report) + _md_versions(report)
    if report.get("synthetic"):
        lines += ["_Reminder: synthetic data; not a result on the real dataset._", ""]
    return "\n".join(lines).rstrip() + "\n"
