"""The run's last stage: perturbation statistics, ``report.json`` / ``report.md`` / figures, a terminal table.

Everything here takes plain Python data (numbers, dicts, numpy arrays or memory maps) so that the
report can be rebuilt from a finished run's files. The report dict's field names are a contract with
other tools (see :func:`build_report`); ``report.json`` is strict JSON (NaN and infinities are written
as ``null``). Scores come per victim seed (``victims``: one clean and one protected victim per seed);
the top-level ``clean`` / ``protected`` / ``drop`` / ``drop_std`` are computed from them. Figures are
drawn with matplotlib (its Agg renderer, without pyplot's global state), imported on first use.

Units: images are uint8 pixel values (0..255); perturbation statistics are in those units;
``eps`` is on the [0, 1] scale (shown as ``k/255`` in the Markdown); timings are seconds and
throughputs images per second; scores are in the metric's own units (accuracy / ROC-AUC in [0, 1];
dense NYUv2 metrics as described by the ``metric`` dict).
"""

from __future__ import annotations

import json
import math
import numbers
import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .fileio import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

CLASSIFICATION_METRICS = ("accuracy", "auc")
METRIC_LABELS = {"accuracy": "accuracy", "auc": "ROC-AUC"}
STRING_FIELDS = ("dataset", "clean_cache", "base", "method", "backbone", "weighting", "victim")
SIDES = ("clean", "protected")  # computed from ``victims``; callers must not pass them
STATS_KEYS = ("per_task", "mean_abs_delta", "max_abs_delta", "samples")
CHUNK_BYTES = 32 << 20  # float64 working set of one chunk of deltas in perturbation_stats
DPI = 150  # figures are saved at this resolution
MIN_FIGURE_INCHES = 8.0  # metrics.png is at least 8 in (1200 px at DPI) wide
INCHES_PER_TASK = 0.35  # ... and this much wider per task
TILE_INCHES = 1.2  # one image of samples.png
COLORS = {"clean": "#427eba", "protected": "#e87926"}


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
    """The validated report dict, with the means over victim seeds and the drop computed.

    Required fields: ``dataset`` (str), ``synthetic`` (bool), ``data_root`` (str | None), ``tasks``
    (list of str), ``metric`` (``"accuracy"``, ``"auc"`` or a dict describing dense metrics),
    ``surrogate`` (``{"seed": int, "backbone": str, "weighting": str}``: the recipe the generator
    attacked), ``victims`` (non-empty list of ``{"seed": int, "clean": scores, "protected": scores}``
    with distinct seeds, scores being ``{"mean": float, "per_task": {task: float}}``; None and NaN mean
    undefined), ``clean_cache`` (str), ``eps`` (float in [0, 1]), ``base``, ``method``, ``backbone``,
    ``weighting``, ``victim`` (str; ``backbone`` / ``weighting`` / ``victim`` describe the victims'
    recipe), ``timings`` ({stage: seconds}), ``throughput`` ({stage: images/s}), ``versions`` (dict),
    ``git`` (str | None), ``perturbation_stats`` (from :func:`perturbation_stats`). Optional:
    ``stl`` (dict), ``defense`` (str or dict: the victim-side defence both victims of a seed trained
    under). Any other extra field is kept unchanged. Paths are turned into strings and numbers into
    Python floats.

    Computed: each victim's ``drop = clean.mean - protected.mean``; top-level ``clean`` and
    ``protected`` (the mean over victims of ``mean``, and per task the mean over victims, both ignoring
    undefined entries: None when all are undefined), ``drop`` (the mean of the victims' defined drops)
    and ``drop_std`` (their sample standard deviation, ddof=1; None with fewer than two). A given
    ``drop`` / ``drop_std`` is recomputed.

    Raises:
        ValueError: naming the first missing or ill-typed field, or a given ``clean`` / ``protected``
            (they are computed from ``victims``).
    """
    for name in SIDES:
        if name in fields:
            raise ValueError(
                f"report field {name!r} is computed from 'victims' (the mean over victim seeds); pass each "
                f"seed's clean and protected scores in 'victims' instead"
            )
    report = dict(fields)
    for name, check in _CHECKS.items():
        if name not in fields:
            raise ValueError(f"report field {name!r} is missing")
        report[name] = check(name, fields[name])
    report["victims"] = _check_victims("victims", fields["victims"], report["tasks"])
    if fields.get("stl") is not None:
        report["stl"] = _check_mapping("stl", fields["stl"])
    if fields.get("defense") is not None:
        report["defense"] = _check_defense("defense", fields["defense"])
    report.update(aggregate_victims(report["victims"], report["tasks"]))
    return report


def aggregate_victims(victims: Sequence[Mapping], tasks: Sequence[str]) -> dict:
    """``{"clean", "protected", "drop", "drop_std"}`` over checked victims (see :func:`build_report`).

    Args:
        victims: ``[{"seed", "clean", "protected", "drop"}]`` as :func:`build_report` checks them.
        tasks: the report's task order; a task appears in ``per_task`` when any victim has it.
    """
    out: dict[str, Any] = {side: _mean_scores([v[side] for v in victims], tasks) for side in SIDES}
    drops = _defined([v["drop"] for v in victims])
    out["drop"] = float(np.mean(drops)) if drops else None
    out["drop_std"] = float(np.std(drops, ddof=1)) if len(drops) >= 2 else None
    return out


def _defined(values: Sequence[Any]) -> list[float]:
    """The finite numbers among ``values`` (None, NaN and infinities are undefined)."""
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def _mean_defined(values: Sequence[Any]) -> float | None:
    """Mean of the defined entries of ``values``; None when there are none."""
    defined = _defined(values)
    return float(np.mean(defined)) if defined else None


def _mean_scores(scores: Sequence[Mapping], tasks: Sequence[str]) -> dict:
    """``{"mean", "per_task"}``: the mean over ``scores`` of each field, ignoring undefined entries."""
    per_task = {
        task: _mean_defined([s["per_task"].get(task) for s in scores])
        for task in tasks
        if any(task in s["per_task"] for s in scores)
    }
    return {"mean": _mean_defined([s["mean"] for s in scores]), "per_task": per_task}


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


def _check_int(name: str, value: Any) -> int:
    """An integer (numpy integers accepted; bools and floats rejected) as int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"report field {name!r} must be an integer, got {type(value).__name__}")
    return int(value)


def _check_number(name: str, value: Any) -> float:
    """A real number as float; None becomes NaN (undefined). Bools and strings are rejected."""
    if value is None:
        return math.nan
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"report field {name!r} must be a number, got {type(value).__name__}")
    return float(value)


def _check_list(name: str, value: Any) -> list:
    """A non-empty list or tuple (not a string or mapping) as a list."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"report field {name!r} must be a non-empty list")
    return list(value)


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


def _check_defense(name: str, value: Any) -> str | dict:
    """A defence name or a dict describing it."""
    return value if isinstance(value, str) else _check_mapping(name, value)


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


def _require(name: str, mapping: Mapping, keys: Sequence[str]) -> None:
    """ValueError naming ``name`` and the first of ``keys`` missing from ``mapping``."""
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise ValueError(f"report field {name!r} lacks {', '.join(repr(k) for k in missing)}")


def _check_surrogate(name: str, value: Any) -> dict:
    """``{"seed": int, "backbone": str, "weighting": str}`` (extra keys kept)."""
    surrogate = _check_mapping(name, value)
    _require(name, surrogate, ("seed", "backbone", "weighting"))
    surrogate["seed"] = _check_int(f"{name}.seed", surrogate["seed"])
    for key in ("backbone", "weighting"):
        surrogate[key] = _check_str(f"{name}.{key}", surrogate[key])
    return surrogate


def _check_victims(name: str, value: Any, tasks: list[str]) -> list[dict]:
    """The victims list: each checked by :func:`_check_victim`, seeds distinct."""
    victims = [_check_victim(f"{name}[{i}]", v, tasks) for i, v in enumerate(_check_list(name, value))]
    seeds = [v["seed"] for v in victims]
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"report field {name!r} repeats victim seeds {repeated}")
    return victims


def _check_victim(name: str, value: Any, tasks: list[str]) -> dict:
    """``{"seed": int, "clean": scores, "protected": scores}`` plus ``drop = clean.mean - protected.mean``
    (NaN when either is undefined); extra keys kept."""
    victim = _check_mapping(name, value)
    _require(name, victim, ("seed", *SIDES))
    victim["seed"] = _check_int(f"{name}.seed", victim["seed"])
    for side in SIDES:
        victim[side] = _check_scores(f"{name}.{side}", victim[side], tasks)
    victim["drop"] = victim["clean"]["mean"] - victim["protected"]["mean"]
    return victim


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
    "surrogate": _check_surrogate,
    "victims": _check_list,  # fully checked against the tasks after the loop
    "clean_cache": _check_str,
    "eps": _check_eps,
    **{name: _check_str for name in ("base", "method", "backbone", "weighting", "victim")},
    "timings": _check_number_map,
    "throughput": _check_number_map,
    "versions": _check_mapping,
    "git": _check_opt_str,
    "perturbation_stats": _check_stats,
}


def cpu_model() -> str:
    """The CPU model as ``lscpu`` names it (falls back to /proc/cpuinfo), e.g. ``AMD EPYC``."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        found = re.search(r"^Model name:\s*(.+)$", text, re.MULTILINE)
        if found:
            return found.group(1).strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # no /proc (macOS, some containers)
        pass
    return "unknown"


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


def _write_figure(path: Path, figure: Figure) -> None:
    """Save ``figure`` as a PNG at :data:`DPI` (atomically)."""
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI)


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


def _md_recipes(report: Mapping) -> list[str]:
    """The surrogate's recipe (what the generator attacked) next to the victims' (what measures it),
    and the defence sentence."""
    surrogate = report.get("surrogate") if isinstance(report.get("surrogate"), Mapping) else {}
    seeds = ", ".join(str(v.get("seed", "?")) for v in _victims(report)) or "n/a"
    rows = [
        ("surrogate (attacked by the generator)", str(surrogate.get("seed", "n/a")), str(surrogate.get("backbone", "n/a")),
         str(surrogate.get("weighting", "n/a"))),
        (f"victims, {report.get('victim', '?')} (measure the protection)", seeds, str(report.get("backbone", "?")),
         str(report.get("weighting", "?"))),
    ]  # fmt: skip
    lines = ["## Surrogate and victims", ""]
    lines += _md_table(("model", "seed(s)", "backbone", "weighting"), rows, (False, True, False, False)) + [""]
    if surrogate and any(surrogate.get(k) != report.get(k) for k in ("backbone", "weighting")):
        lines += ["The victims' recipe differs from the surrogate's: the drop measures transfer.", ""]
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
    lines = _md_header(report) + _md_recipes(report) + _md_results(report)
    lines += _md_extra("Single-task victims (stl)", report.get("stl"))
    if isinstance(report.get("defense"), Mapping):
        lines += _md_extra("Defense", report.get("defense"))
    lines += _md_stats(report) + _md_timings(report) + _md_versions(report)
    if report.get("synthetic"):
        lines += ["_Reminder: synthetic data; not a result on the real dataset._", ""]
    return "\n".join(lines).rstrip() + "\n"


# =========================================================================== figures


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
