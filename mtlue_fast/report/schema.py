"""The report dict's contract: :func:`build_report` checks every field of ``report.json`` (naming the
first missing or ill-typed one) and adds the means over victim seeds; :func:`to_json_safe` makes a
strict-JSON copy (NaN and infinities as ``null``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .stats import SIDES, aggregate_victims

CLASSIFICATION_METRICS = ("accuracy", "auc")
STRING_FIELDS = ("dataset", "clean_cache", "base", "method", "backbone", "weighting", "victim")
STATS_KEYS = ("per_task", "mean_abs_delta", "max_abs_delta", "samples")


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
    under), ``cells`` (list: every finished victim recipe of the run, each checked and summarised by
    :func:`summarize_cell`), ``width`` / ``epochs`` (the victims' channel multiplier and training
    epochs; the surrogate's are extra keys of ``surrogate``). Any other extra field is kept
    unchanged. Paths are turned into strings and numbers into Python floats.

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
    if fields.get("cells") is not None:
        cells = fields["cells"]
        if isinstance(cells, (str, bytes, Mapping)) or not isinstance(cells, Sequence):
            raise ValueError("report field 'cells' must be a list")
        report["cells"] = [summarize_cell(c, report["tasks"], f"cells[{i}]") for i, c in enumerate(cells)]
    report.update(aggregate_victims(report["victims"], report["tasks"]))
    return report


def summarize_cell(cell: Mapping, tasks: Sequence[str], name: str = "cell") -> dict:
    """One victim recipe's entry (of ``report.json``'s ``cells`` or ``sweep.json``): ``cell`` has
    ``name`` (str), ``digest`` (str), ``fields`` (``{"backbone", "weighting", "victim", "defense", ...}``)
    and ``victims`` (as the report's top-level ``victims``); other keys are kept. Adds ``seeds`` and,
    as :func:`build_report` does for the run, each victim's ``drop`` and the cell's ``clean`` /
    ``protected`` (means over seeds, per task too), ``drop`` and ``drop_std``.

    Raises:
        ValueError: naming the first missing or ill-typed field (prefixed with ``name``).
    """
    entry = _check_mapping(name, cell)
    _require(name, entry, ("name", "digest", "fields", "victims"))
    for key in ("name", "digest"):
        entry[key] = _check_str(f"{name}.{key}", entry[key])
    entry["fields"] = _check_mapping(f"{name}.fields", entry["fields"])
    entry["victims"] = _check_victims(f"{name}.victims", entry["victims"], list(tasks))
    entry["seeds"] = [v["seed"] for v in entry["victims"]]
    entry.update(aggregate_victims(entry["victims"], list(tasks)))
    return entry


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
