"""Training and data benchmarks: images/s per variant and the ratios between them.

Input: pytest-benchmark JSON of ``bench/bench_victim.py``, ``bench/bench_generator.py`` or
``bench/bench_data.py``, whose benchmarks carry ``extra_info`` ``images`` (per timed call),
``variant`` (or ``decoder`` / ``device``), ``kind`` (victim, weighting, generator; data when absent)
and, for the decoders, ``role`` (``gpu``, ``cpu-pipeline``, ``reference``). The targets are judged
from these rows by :mod:`.targets`.
"""

from __future__ import annotations

from collections import defaultdict

from .record import slug

#: The variant each group's ratios are taken against, first found wins.
BASELINES = ("straightforward", "pass per checkpoint", "dali-cpu", "pil")


def _groups(bench: dict) -> tuple[dict[str, dict[str, dict]], dict[str, str]]:
    groups: dict[str, dict[str, dict]] = defaultdict(dict)
    kinds: dict[str, str] = {}
    for b in bench.get("benchmarks", []):
        extra, median = b["extra_info"], b["stats"]["median"]
        variant = str(extra.get("variant") or extra.get("decoder") or extra.get("device") or b["name"])
        row = {"images_per_second": extra["images"] / median, "median_s": median}
        if "round_medians" in b:  # several --rounds: images/s of each round
            row["round_images_per_second"] = [extra["images"] / m for m in b["round_medians"]]
        for key in ("resident", "role", "graph"):
            if key in extra:
                row[key] = extra[key]
        groups[b["group"]][variant] = row
        kinds[b["group"]] = extra.get("kind", "data")
    return groups, kinds


def summarize_throughput(bench: dict) -> dict:
    """``{"groups": {group: {variant: row}}}``; rows hold images/s, the median seconds per call and
    ``vs_<baseline>`` (or, for the weighting strategies, ``step_time_vs_ew``)."""
    groups, kinds = _groups(bench)
    for group, rows in groups.items():
        if kinds[group] == "weighting":
            if "ew" in rows:
                for r in rows.values():
                    r["step_time_vs_ew"] = r["median_s"] / rows["ew"]["median_s"]
            continue
        base = next((b for b in BASELINES if b in rows), None)
        if base is None:
            continue
        for r in rows.values():
            r[f"vs_{slug(base)}"] = r["images_per_second"] / rows[base]["images_per_second"]
    return {"groups": {g: dict(r) for g, r in groups.items()}}
