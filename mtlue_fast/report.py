"""The run's last stage: perturbation statistics, ``report.json`` / ``report.md`` / figures, a terminal table.

Everything here takes plain Python data (numbers, dicts, numpy arrays or memory maps) so that the
report can be rebuilt from a finished run's files. The report dict's field names are a contract with
other tools (see :func:`build_report`); ``report.json`` is strict JSON (NaN and infinities are written
as ``null``). Figures are drawn with Pillow only.

Units: images are uint8 pixel values (0..255); perturbation statistics are in those units;
``eps`` is on the [0, 1] scale (shown as ``k/255`` in the Markdown); timings are seconds and
throughputs images per second.
"""

from __future__ import annotations

import json
import math
import numbers
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .fileio import atomic_path

CLASSIFICATION_METRICS = ("accuracy", "auc")
STRING_FIELDS = ("dataset", "clean_cache", "base", "method", "backbone", "weighting", "victim")
OPTIONAL_FIELDS = ("stl", "defense")
STATS_KEYS = ("per_task", "mean_abs_delta", "max_abs_delta", "samples")
CHUNK_BYTES = 32 << 20  # float64 working set of one chunk of deltas in perturbation_stats
AMPLIFY = 10  # perturbation row of samples.png: delta * AMPLIFY + 128
_RESAMPLING = getattr(Image, "Resampling", Image)  # Pillow < 9.1 has the constants on Image
CLEAN_COLOR = (66, 126, 186)
PROTECTED_COLOR = (232, 121, 38)


# =========================================================================== perturbation statistics


def perturbation_stats(
    clean_images: Any,
    protected_images: Any,
    labels: Any,
    task_names: Sequence[str],
    num_classes: int | Sequence[int],
    *,
    max_samples: int = 20000,
    seed: int = 0,
    chunk_rows: int | None = None,
) -> dict:
    """Statistics of ``delta = protected - clean`` (int16, pixel units 0..255) over a random subset.

    Args:
        clean_images, protected_images: uint8 ``[N, C, H, W]`` arrays (numpy memory maps are fine:
            only ``chunk_rows`` rows are read at a time).
        labels: int64 ``[N, K]`` class indices (a value outside ``[0, num_classes)``, e.g. -1, marks
            a missing label and leaves the sample out of that task), or a dict of dense label maps
            (NYUv2): then the per-task entries are ``None`` and only the overall figures are computed.
        task_names: the K task names.
        num_classes: classes per task (one int for all tasks, or K ints).
        max_samples: at most this many rows, drawn without replacement with ``seed``.
        chunk_rows: rows per chunk (None: about 32 MiB of float64 deltas).

    Returns:
        ``{"per_task": {name: {"intra_class_std", "mean_abs_delta"} | None}, "mean_abs_delta",
        "max_abs_delta", "samples"}``. ``intra_class_std`` (pixel units): for each class of the task
        with at least 2 samples, the per-pixel population standard deviation of delta over that
        class's samples, averaged over pixels; then averaged over those classes (NaN if none). Low
        means class-consistent perturbations (a shortcut). ``mean_abs_delta`` (pixel units): mean
        ``|delta|`` over all elements of the task's labelled samples (overall: of all samples).
        Sums are float64 (exact for integer deltas); memory is O(chunk + classes * C * H * W).
    """
    n = _check_images(clean_images, protected_images)
    names = [str(t) for t in task_names]
    dense = isinstance(labels, Mapping)
    label_array = None if dense else _check_labels(labels, n, len(names))
    classes = _classes_per_task(num_classes, len(names))
    rows = sample_rows(n, max_samples, seed)
    pixels = int(np.prod(clean_images.shape[1:]))
    step = chunk_rows or max(1, CHUNK_BYTES // (8 * max(pixels, 1)))
    acc = _StatsAccumulator(classes if not dense else [], pixels)
    for start in range(0, len(rows), step):
        idx = rows[start : start + step]
        delta = _chunk_delta(clean_images, protected_images, idx)
        acc.add(delta, None if dense else np.asarray(label_array[idx], dtype=np.int64))
    per_task = {name: None for name in names} if dense else acc.per_task(names)
    return {
        "per_task": per_task,
        "mean_abs_delta": acc.mean_abs(),
        "max_abs_delta": acc.max_abs,
        "samples": int(len(rows)),
    }


def sample_rows(n: int, max_samples: int, seed: int) -> np.ndarray:
    """Sorted row indices: all ``n`` rows, or a seeded subset of ``max_samples`` without replacement."""
    if max_samples < 1:
        raise ValueError(f"max_samples must be >= 1, got {max_samples}")
    if n <= max_samples:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=max_samples, replace=False)).astype(np.int64)


def _check_images(clean: Any, protected: Any) -> int:
    """Number of rows; raises ValueError unless both are ``[N, C, H, W]`` of the same shape."""
    if tuple(clean.shape) != tuple(protected.shape) or len(clean.shape) != 4:
        raise ValueError(
            f"clean and protected images must both be [N, C, H, W] of one shape, got "
            f"{tuple(clean.shape)} and {tuple(protected.shape)}"
        )
    if clean.shape[0] == 0:
        raise ValueError("no images")
    return int(clean.shape[0])


def _check_labels(labels: Any, n: int, k: int) -> Any:
    """``labels`` itself after checking it is ``[n, k]``."""
    shape = tuple(labels.shape)
    if shape != (n, k):
        raise ValueError(f"labels must be [N, K] = [{n}, {k}], got {shape}")
    return labels


def _classes_per_task(num_classes: int | Sequence[int], k: int) -> list[int]:
    """``num_classes`` expanded to one positive int per task."""
    if isinstance(num_classes, numbers.Integral):
        counts = [int(num_classes)] * k
    else:
        counts = [int(c) for c in num_classes]
    if len(counts) != k or min(counts, default=1) < 1:
        raise ValueError(f"num_classes must be a positive int or {k} positive ints, got {num_classes!r}")
    return counts


def _chunk_delta(clean: Any, protected: Any, idx: np.ndarray) -> np.ndarray:
    """``protected - clean`` of rows ``idx`` as int16 ``[B, C*H*W]``."""
    c = np.asarray(clean[idx]).astype(np.int16, copy=False)
    p = np.asarray(protected[idx]).astype(np.int16, copy=False)
    return (p - c).reshape(len(idx), -1)


class _StatsAccumulator:
    """Per-(task, class) float64 sums and sums of squares of delta, and |delta| totals."""

    def __init__(self, classes: list[int], pixels: int) -> None:
        self.classes = classes
        self.offsets = np.concatenate([[0], np.cumsum(classes)]).astype(np.int64)
        groups = int(self.offsets[-1])
        self.pixels = pixels
        self.sums = np.zeros((groups, pixels))
        self.squares = np.zeros((groups, pixels))
        self.counts = np.zeros(groups, dtype=np.int64)
        self.task_abs = np.zeros(len(classes))
        self.task_rows = np.zeros(len(classes), dtype=np.int64)
        self.total_abs = 0.0
        self.total_rows = 0
        self.max_abs = 0

    def add(self, delta: np.ndarray, labels: np.ndarray | None) -> None:
        """Accumulate int16 ``delta [B, D]`` with class indices ``labels [B, K]`` (None: overall only)."""
        row_abs = np.abs(delta).sum(axis=1, dtype=np.int64).astype(np.float64)
        self.total_abs += float(row_abs.sum())
        self.total_rows += len(delta)
        self.max_abs = max(self.max_abs, int(np.abs(delta).max(initial=0)))
        if labels is None or not self.classes:
            return
        onehot, valid = self._onehot(labels)
        d = delta.astype(np.float64)
        self.sums += onehot @ d
        self.squares += onehot @ (d * d)
        self.counts += onehot.sum(axis=1).astype(np.int64)
        self.task_abs += valid @ row_abs
        self.task_rows += valid.sum(axis=1).astype(np.int64)

    def _onehot(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[groups, B]`` one-hot of (task, class) and ``[K, B]`` validity, both float64."""
        classes = np.asarray(self.classes)
        valid = (labels >= 0) & (labels < classes[None, :])  # [B, K]
        onehot = np.zeros((int(self.offsets[-1]), len(labels)))
        b, k = np.nonzero(valid)
        onehot[self.offsets[k] + labels[b, k], b] = 1.0
        return onehot, valid.T.astype(np.float64)

    def per_task(self, names: list[str]) -> dict:
        """``{name: {"intra_class_std", "mean_abs_delta"}}`` (pixel units; NaN where undefined)."""
        out = {}
        for k, name in enumerate(names):
            lo, hi = int(self.offsets[k]), int(self.offsets[k + 1])
            stds = [self._class_std(g) for g in range(lo, hi) if self.counts[g] >= 2]
            rows = self.task_rows[k]
            out[name] = {
                "intra_class_std": float(np.mean(stds)) if stds else math.nan,
                "mean_abs_delta": float(self.task_abs[k] / (rows * self.pixels)) if rows else math.nan,
            }
        return out

    def _class_std(self, group: int) -> float:
        """Pixel-averaged population std of one (task, class) group; exact 0 for identical deltas."""
        n = float(self.counts[group])
        s, q = self.sums[group], self.squares[group]
        var = np.maximum(n * q - s * s, 0.0) / (n * n)  # integer-valued numerator: exact in float64
        return float(np.sqrt(var).mean())

    def mean_abs(self) -> float:
        """Mean |delta| over every element seen (pixel units)."""
        return self.total_abs / (self.total_rows * self.pixels) if self.total_rows else math.nan


# =========================================================================== the report dict


def build_report(**fields: Any) -> dict:
    """The validated report dict, with ``drop = clean.mean - protected.mean`` computed.

    Required fields: ``dataset`` (str), ``synthetic`` (bool), ``data_root`` (str | None), ``tasks``
    (list of str), ``metric`` (``"accuracy"``, ``"auc"`` or a dict describing dense metrics),
    ``clean`` / ``protected`` (``{"mean": float, "per_task": {task: float}}``; None and NaN mean
    undefined), ``clean_cache`` (str), ``eps`` (float in [0, 1]), ``base``, ``method``, ``backbone``,
    ``weighting``, ``victim`` (str), ``timings`` ({stage: seconds}), ``throughput`` ({stage:
    images/s}), ``versions`` (dict), ``git`` (str | None), ``perturbation_stats`` (from
    :func:`perturbation_stats`). Optional: ``stl``, ``defense`` (dicts). A given ``drop`` is
    recomputed; any other extra field is kept unchanged. Paths are turned into strings and numbers
    into Python floats.

    Raises:
        ValueError: naming the first missing or ill-typed field.
    """
    report = dict(fields)
    for name, check in _CHECKS.items():
        if name not in fields:
            raise ValueError(f"report field {name!r} is missing")
        report[name] = check(name, fields[name])
    tasks = report["tasks"]
    for name in ("clean", "protected"):
        report[name] = _check_scores(name, fields[name], tasks)
    for name in OPTIONAL_FIELDS:
        if fields.get(name) is not None:
            report[name] = _check_mapping(name, fields[name])
    report["drop"] = report["clean"]["mean"] - report["protected"]["mean"]
    return report


def _check_str(name: str, value: Any) -> str:
    """``value`` as str (a Path is accepted); ValueError naming ``name`` otherwise."""
    if isinstance(value, Path):
        return str(value)
    if not isinstance(value, str):
        raise ValueError(f"report field {name!r} must be a string, got {type(value).__name__}")
    return value


def _check_opt_str(name: str, value: Any) -> str | None:
    """None or a string (Path accepted)."""
    return None if value is None else _check_str(name, value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"report field {name!r} must be a bool, got {type(value).__name__}")
    return bool(value)


def _check_number(name: str, value: Any) -> float:
    """A real number as float; None becomes NaN (undefined). Bools and strings are rejected."""
    if value is None:
        return math.nan
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"report field {name!r} must be a number, got {type(value).__name__}")
    return float(value)


def _check_tasks(name: str, value: Any) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"report field {name!r} must be a non-empty list of task names")
    tasks = [_check_str(f"{name}[{i}]", t) for i, t in enumerate(value)]
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"report field {name!r} has repeated task names")
    return tasks


def _check_metric(name: str, value: Any) -> str | dict:
    if isinstance(value, Mapping):
        return dict(value)
    if value not in CLASSIFICATION_METRICS:
        raise ValueError(f"report field {name!r} must be 'accuracy', 'auc' or a dict, got {value!r}")
    return value


def _check_eps(name: str, value: Any) -> float:
    eps = _check_number(name, value)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"report field {name!r} must be on the [0, 1] scale (e.g. 8/255), got {eps}")
    return eps


def _check_mapping(name: str, value: Any) -> dict:
    if not isinstance(value, Mapping):
        raise ValueError(f"report field {name!r} must be a dict, got {type(value).__name__}")
    return dict(value)


def _check_number_map(name: str, value: Any) -> dict[str, float]:
    """``{str: number}`` with float values."""
    mapping = _check_mapping(name, value)
    return {str(k): _check_number(f"{name}.{k}", v) for k, v in mapping.items()}


def _check_stats(name: str, value: Any) -> dict:
    stats = _check_mapping(name, value)
    missing = [k for k in STATS_KEYS if k not in stats]
    if missing:
        raise ValueError(f"report field {name!r} lacks {', '.join(missing)} (see perturbation_stats)")
    return stats


def _check_scores(name: str, value: Any, tasks: list[str]) -> dict:
    """``{"mean": float, "per_task": {task: float}}`` whose tasks all appear in ``tasks``."""
    scores = _check_mapping(name, value)
    if "mean" not in scores or "per_task" not in scores:
        raise ValueError(f"report field {name!r} must have 'mean' and 'per_task'")
    per_task = _check_number_map(f"{name}.per_task", scores["per_task"])
    unknown = [t for t in per_task if t not in tasks]
    if unknown:
        raise ValueError(f"report field '{name}.per_task' names unknown tasks {unknown}")
    return {**scores, "mean": _check_number(f"{name}.mean", scores["mean"]), "per_task": per_task}


_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "dataset": _check_str,
    "synthetic": _check_bool,
    "data_root": _check_opt_str,
    "tasks": _check_tasks,
    "metric": _check_metric,
    "clean": _check_mapping,  # fully checked against the tasks after the loop
    "protected": _check_mapping,
    "clean_cache": _check_str,
    "eps": _check_eps,
    **{name: _check_str for name in ("base", "method", "backbone", "weighting", "victim")},
    "timings": _check_number_map,
    "throughput": _check_number_map,
    "versions": _check_mapping,
    "git": _check_opt_str,
    "perturbation_stats": _check_stats,
}


def versions() -> dict:
    """Software versions: ``mtlue_fast``, ``python``, ``torch``, ``torchvision``, ``cuda`` (torch's
    CUDA or None), ``dali`` (None when not installed), ``gpu`` (device 0's name or None) and
    ``ops_library`` (where the compiled ops came from, or None). Never raises."""
    from . import __version__

    try:
        from .info import collect

        info = collect()
    except Exception:  # noqa: BLE001 - the report must not fail on a broken backend probe
        info = {}
    out = {"mtlue_fast": __version__, **_torch_versions()}
    out["python"] = info.get("python") or _python_version()
    out["torchvision"] = info.get("torchvision")
    dali = info.get("dali")
    out["dali"] = None if dali in (None, "not installed") else dali
    out["ops_library"] = (info.get("library") or {}).get("source")
    return out


def _torch_versions() -> dict:
    """torch / CUDA / GPU name straight from torch (None where unavailable)."""
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        return {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": gpu}
    except Exception:  # noqa: BLE001
        return {"torch": None, "cuda": None, "gpu": None}


def _python_version() -> str:
    import platform

    return platform.python_version()


def git_revision() -> str | None:
    """``git rev-parse HEAD`` of the checkout holding this package, or None (not a work tree, no git,
    any error). Never raises."""
    here = Path(__file__).resolve().parent
    try:
        done = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--is-inside-work-tree", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except Exception:  # noqa: BLE001 - git missing, timeout, ...
        return None
    lines = done.stdout.split()
    if done.returncode != 0 or len(lines) != 2 or lines[0] != "true":
        return None
    rev = lines[1]
    return rev if all(c in "0123456789abcdef" for c in rev) and len(rev) >= 40 else None


# =========================================================================== writing


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
    when both image arrays are given) under ``out_dir``, each atomically.

    Args:
        report: the dict of :func:`build_report` (written as given; renderers tolerate gaps).
        clean_images, protected_images: uint8 ``[N, C, H, W]`` arrays for the sample grid.
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
    _write_png(out / "figures" / "metrics.png", metrics_figure(data))
    if clean_images is not None:
        figure = samples_figure(clean_images, protected_images, channels=channels, count=num_samples)
        _write_png(out / "figures" / "samples.png", figure)
    return data


def to_json_safe(value: Any) -> Any:
    """A strict-JSON-able copy: NaN/inf -> None, numpy scalars/arrays -> Python, Path -> str,
    tuples -> lists, dict keys -> str; anything else unknown -> ``str(value)``."""
    if isinstance(value, Mapping):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return str(value)


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _write_png(path: Path, image: Image.Image) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


# =========================================================================== text


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


def _score_rows(report: Mapping) -> list[tuple[str, float, float, float]]:
    """``(task, clean, protected, protected - clean)`` per task of the report."""
    clean = (report.get("clean") or {}).get("per_task") or {}
    prot = (report.get("protected") or {}).get("per_task") or {}
    rows = []
    for task in report.get("tasks") or list(clean):
        c, p = _value(clean.get(task)), _value(prot.get(task))
        rows.append((str(task), c, p, p - c))
    return rows


def _means(report: Mapping) -> tuple[float, float, float]:
    """``(clean mean, protected mean, drop)``; the drop is recomputed when absent."""
    c = _value((report.get("clean") or {}).get("mean"))
    p = _value((report.get("protected") or {}).get("mean"))
    drop = _value(report.get("drop")) if report.get("drop") is not None else c - p
    return c, p, drop


def _metric_name(report: Mapping) -> str:
    metric = report.get("metric")
    if isinstance(metric, Mapping):
        return "primary metric"
    return str(metric or "metric")


def summary_table(report: Mapping) -> str:
    """A plain-text table for the terminal: task, clean, protected, diff (protected - clean), then the
    means and the drop (clean mean - protected mean)."""
    rows = [(t, _fmt(c), _fmt(p), _fmt(d, sign=True)) for t, c, p, d in _score_rows(report)]
    c, p, drop = _means(report)
    mean_row = ("mean", _fmt(c), _fmt(p), _fmt(p - c, sign=True))
    header = ("task", "clean", "protected", "diff")
    table = [header, *rows, mean_row]
    widths = [max(len(r[i]) for r in table) for i in range(4)]

    def line(r: Sequence[str]) -> str:
        return "  ".join([r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, 4)])

    rule = "  ".join("-" * w for w in widths)
    lines = [line(header), rule, *(line(r) for r in rows), rule, line(mean_row)]
    lines.append(f"drop ({_metric_name(report)}, clean - protected): {_fmt(drop)}")
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
        ("backbone", report.get("backbone", "?")),
        ("weighting", report.get("weighting", "?")),
        ("victim", report.get("victim", "?")),
        ("eps", _eps_text(report.get("eps"))),
        ("metric", _metric_text(report.get("metric"))),
        ("clean cache", report.get("clean_cache") or "n/a"),
        ("git", report.get("git") or "n/a"),
    ]
    return lines + ["## Settings", ""] + _md_table(("setting", "value"), settings, (False, False)) + [""]


def _metric_text(metric: Any) -> str:
    if isinstance(metric, Mapping):
        return "; ".join(f"{k}: {v}" for k, v in metric.items())
    return str(metric or "?")


def _md_results(report: Mapping) -> list[str]:
    """Per-task clean / protected / diff table, the means and the drop."""
    rows = [(f"`{t}`", _fmt(c), _fmt(p), _fmt(d, sign=True)) for t, c, p, d in _score_rows(report)]
    c, p, drop = _means(report)
    rows.append(("**mean**", _fmt(c), _fmt(p), _fmt(p - c, sign=True)))
    lines = ["## Results", "", f"Metric: {_metric_text(report.get('metric'))}. diff = protected - clean.", ""]
    lines += _md_table(("task", "clean", "protected", "diff"), rows, (False, True, True, True))
    lines += ["", f"**Drop** (clean mean - protected mean): **{_fmt(drop)}**", ""]
    return lines


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
    """An optional entry (``stl``, ``defense``): a per-task table when it has ``per_task``, and its
    remaining scalar fields; nested values as compact JSON."""
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
    lines = _md_header(report) + _md_results(report)
    lines += _md_extra("Single-task victims (stl)", report.get("stl"))
    lines += _md_extra("Defense", report.get("defense"))
    lines += _md_stats(report) + _md_timings(report) + _md_versions(report)
    if report.get("synthetic"):
        lines += ["_Reminder: synthetic data; not a result on the real dataset._", ""]
    return "\n".join(lines).rstrip() + "\n"


# =========================================================================== figures


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    """Width and height in pixels of ``text``."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _abbreviate(name: str, limit: int = 20) -> str:
    return name if len(name) <= limit else name[: limit - 2] + ".."


def _axis_max(report: Mapping, values: Sequence[float]) -> float:
    """Top of the y axis: 1 for accuracy/AUC, else a rounded-up maximum of the values."""
    if report.get("metric") in CLASSIFICATION_METRICS:
        return 1.0
    finite = [v for v in values if math.isfinite(v)]
    top = max(finite + [1e-12])
    scale = 10 ** math.floor(math.log10(top))
    return math.ceil(top / scale * 1.0001) * scale  # e.g. 0.73 -> 0.8, 37 -> 40


def _label_image(text: str, font: Any, rotate: bool) -> Image.Image:
    """An ``L`` mask with ``text`` (white on black), rotated 90 degrees counter-clockwise if asked."""
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
    img = Image.new("L", (max(1, right - left + 2), max(1, bottom - top + 2)), 0)
    ImageDraw.Draw(img).text((1 - left, 1 - top), text, fill=255, font=font)
    return img.rotate(90, expand=True) if rotate else img


def metrics_figure(report: Mapping) -> Image.Image:
    """Grouped bars per task, clean vs protected (RGB image; pixel sizes grow with the task count).

    Task names are abbreviated to 20 characters and written vertically when there are more than 6
    tasks or a name is wider than its group. NaN values draw no bar.
    """
    rows = _score_rows(report)
    font = _font()
    n = max(1, len(rows))
    bar = 24 if n <= 8 else 10
    group = 2 * bar + (16 if n <= 8 else 6)
    labels = [_abbreviate(r[0]) for r in rows]
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    rotate = n > 6 or any(_text_size(probe, s, font)[0] > group for s in labels)
    masks = [_label_image(s, font, rotate) for s in labels]
    label_h = max([m.height for m in masks] + [10])
    left, top, right = 56, 44, 16
    plot_w, plot_h = max(n * group, 320), 260
    img = Image.new("RGB", (left + plot_w + right, top + plot_h + label_h + 14), "white")
    draw = ImageDraw.Draw(img)
    ymax = _axis_max(report, [v for r in rows for v in r[1:3]])
    _draw_axes(draw, font, (left, top, plot_w, plot_h), ymax)
    for i, (task, c, p, _) in enumerate(rows):
        x0 = left + i * group + (group - 2 * bar) // 2
        _draw_bar(draw, (x0, top, plot_h), c, ymax, bar, CLEAN_COLOR)
        _draw_bar(draw, (x0 + bar, top, plot_h), p, ymax, bar, PROTECTED_COLOR)
        mask = masks[i]
        lx = left + i * group + (group - mask.width) // 2
        img.paste((0, 0, 0), (lx, top + plot_h + 6), mask)
    _draw_title(draw, font, report, img.width)
    return img


def _draw_axes(draw: ImageDraw.ImageDraw, font: Any, box: tuple[int, int, int, int], ymax: float) -> None:
    """Y axis with 5 gridlines labelled 0..ymax, and the x axis line."""
    left, top, w, h = box
    for j in range(6):
        value = ymax * j / 5
        y = top + h - round(h * j / 5)
        draw.line([(left, y), (left + w, y)], fill=(225, 225, 225) if j else (0, 0, 0))
        text = f"{value:.2f}" if ymax <= 10 else f"{value:.0f}"
        tw, th = _text_size(draw, text, font)
        draw.text((left - tw - 6, y - th // 2 - 1), text, fill=(0, 0, 0), font=font)
    draw.line([(left, top), (left, top + h)], fill=(0, 0, 0))


def _draw_bar(draw: ImageDraw.ImageDraw, where: tuple[int, int, int], value: float, ymax: float,
              width: int, color: tuple[int, int, int]) -> None:
    """One bar at x ``where[0]`` of a plot whose top is ``where[1]`` and height ``where[2]`` pixels."""
    if not math.isfinite(value):
        return
    x0, top, h = where
    frac = min(max(value / ymax, 0.0), 1.0) if ymax > 0 else 0.0
    y = top + h - round(h * frac)
    if y < top + h:
        draw.rectangle([(x0, y), (x0 + width - 2, top + h - 1)], fill=color)


def _draw_title(draw: ImageDraw.ImageDraw, font: Any, report: Mapping, width: int) -> None:
    """Title line (dataset, metric, means, drop) and the colour legend."""
    c, p, drop = _means(report)
    synth = " [SYNTHETIC]" if report.get("synthetic") else ""
    title = (f"{report.get('dataset', '?')}{synth} - {_metric_name(report)}: clean {_fmt(c, 3)}, "
             f"protected {_fmt(p, 3)}, drop {_fmt(drop, 3)}")
    draw.text((8, 6), title, fill=(0, 0, 0), font=font)
    x = 8
    for name, color in (("clean", CLEAN_COLOR), ("protected", PROTECTED_COLOR)):
        draw.rectangle([(x, 26), (x + 10, 36)], fill=color)
        draw.text((x + 14, 25), name, fill=(0, 0, 0), font=font)
        x += 24 + _text_size(draw, name, font)[0]


def samples_figure(clean: Any, protected: Any, *, channels: Sequence[int] | None = None,
                   count: int = 8) -> Image.Image:
    """A grid of up to ``count`` evenly spaced samples: rows clean, ``delta * 10 + 128`` (clipped to
    0..255) and protected; grayscale or RGB tiles scaled to 48..160 pixels on the longer side."""
    n = _check_images(clean, protected)
    idx = np.unique(np.linspace(0, n - 1, min(count, n)).round().astype(np.int64))
    c = np.asarray(clean[idx]).astype(np.int16)
    p = np.asarray(protected[idx]).astype(np.int16)
    chans = _display_channels(c.shape[1], channels)
    amplified = np.clip((p - c) * AMPLIFY + 128, 0, 255)
    grid_rows = [("clean", c), (f"delta x{AMPLIFY} + 128", amplified), ("protected", p)]
    tiles = [[_tile(x[i], chans) for i in range(len(idx))] for _, x in grid_rows]
    return _grid(tiles, [name for name, _ in grid_rows], [f"#{i}" for i in idx])


def _display_channels(num: int, channels: Sequence[int] | None) -> list[int]:
    """Channel indices to show: 1 (grayscale) or 3 (RGB)."""
    if channels is None:
        return [0] if num < 3 else [0, 1, 2]
    chans = [int(ch) for ch in channels]
    if len(chans) not in (1, 3) or not all(0 <= ch < num for ch in chans):
        raise ValueError(f"channels must be 1 or 3 indices below {num}, got {channels!r}")
    return chans


def _tile(image: np.ndarray, chans: list[int]) -> Image.Image:
    """One ``[C, H, W]`` image (values 0..255) as an RGB tile, 48..160 pixels on its longer side."""
    x = np.clip(image[chans], 0, 255).astype(np.uint8)
    tile = Image.fromarray(x[0], "L") if len(chans) == 1 else Image.fromarray(x.transpose(1, 2, 0), "RGB")
    longest = max(tile.size)
    if longest < 48:
        f = math.ceil(48 / longest)
        tile = tile.resize((tile.width * f, tile.height * f), _RESAMPLING.NEAREST)
    elif longest > 160:
        size = (max(1, round(tile.width * 160 / longest)), max(1, round(tile.height * 160 / longest)))
        tile = tile.resize(size, _RESAMPLING.BILINEAR)
    return tile.convert("RGB")


def _grid(tiles: list[list[Image.Image]], row_names: list[str], col_names: list[str]) -> Image.Image:
    """Tiles in rows with names on the left and column names on top."""
    font = _font()
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    label_w = 12 + max(_text_size(probe, s, font)[0] for s in row_names)
    tw, th = tiles[0][0].size
    pad, head = 4, 18
    cols = len(tiles[0])
    img = Image.new("RGB", (label_w + cols * (tw + pad) + pad, head + len(tiles) * (th + pad) + pad), "white")
    draw = ImageDraw.Draw(img)
    for j, name in enumerate(col_names):
        draw.text((label_w + pad + j * (tw + pad), 3), name, fill=(0, 0, 0), font=font)
    for i, (name, row) in enumerate(zip(row_names, tiles)):
        y = head + pad + i * (th + pad)
        draw.text((6, y + th // 2 - 6), name, fill=(0, 0, 0), font=font)
        for j, tile in enumerate(row):
            img.paste(tile, (label_w + pad + j * (tw + pad), y))
    return img
