"""Training and data benchmarks: images/s per variant and the ratios the README's targets use.

Input: pytest-benchmark JSON of ``bench/bench_victim.py``, ``bench/bench_generator.py`` or
``bench/bench_data.py``, whose benchmarks carry ``extra_info`` ``images`` (per timed call),
``variant`` (or ``decoder`` / ``device``) and ``kind`` (victim, weighting, generator; data when
absent). Targets are judged at GPU sizes only (``met`` is None otherwise).
"""

from __future__ import annotations

from collections import defaultdict

from .record import slug

#: name -> threshold (ratios: at least; ``weighting_step_vs_ew_max``: at most).
TARGETS = {
    "victim_fast_vs_straightforward": 3.0,
    "victim_fast_images_per_second": 25_000.0,
    "weighting_step_vs_ew_max": 2.0,
    "generator_fast_vs_straightforward": 2.0,
    "sep_shared_vs_per_checkpoint": 5.0,
    "dali_gpu_vs_dali_cpu": 3.0,
}
WEIGHTING_WITH_TARGET = ("pcgrad", "aligned_mtl", "fairgrad")
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
        if "resident" in extra:
            row["resident"] = extra["resident"]
        groups[b["group"]][variant] = row
        kinds[b["group"]] = extra.get("kind", "data")
    return groups, kinds


def summarize_throughput(bench: dict, gpu: bool) -> dict:
    """``{"groups": {group: {variant: row}}, "targets": {name: {"value", "threshold", "met"}}}``;
    rows hold images/s, the median seconds per call and ``vs_<baseline>`` (or, for the weighting
    strategies, ``step_time_vs_ew``)."""
    groups, kinds = _groups(bench)
    targets: dict[str, dict] = {}

    def judge(name: str, value: float, ok: bool) -> None:
        targets[name] = {"value": value, "threshold": TARGETS[name], "met": ok if gpu else None}

    for group, rows in groups.items():
        rate = {v: r["images_per_second"] for v, r in rows.items()}
        kind = kinds[group]
        if kind == "weighting" and "ew" in rows:
            for r in rows.values():
                r["step_time_vs_ew"] = r["median_s"] / rows["ew"]["median_s"]
            worst = max((rows[v]["step_time_vs_ew"] for v in WEIGHTING_WITH_TARGET if v in rows), default=None)
            if worst is not None:
                judge("weighting_step_vs_ew_max", worst, worst <= TARGETS["weighting_step_vs_ew_max"])
            continue
        base = next((b for b in BASELINES if b in rate), None)
        if base is None:
            continue
        for v, r in rows.items():
            r[f"vs_{slug(base)}"] = rate[v] / rate[base]
        if kind == "victim" and "fast" in rate:
            ratio = rate["fast"] / rate[base]
            judge("victim_fast_vs_straightforward", ratio, ratio >= TARGETS["victim_fast_vs_straightforward"])
            judge("victim_fast_images_per_second", rate["fast"], rate["fast"] >= TARGETS["victim_fast_images_per_second"])
        elif kind == "generator" and base == "straightforward" and "fast" in rate:
            ratio = rate["fast"] / rate[base]
            judge("generator_fast_vs_straightforward", ratio, ratio >= TARGETS["generator_fast_vs_straightforward"])
        elif kind == "generator" and base == "pass per checkpoint" and "shared pass" in rate:
            ratio = rate["shared pass"] / rate[base]
            judge("sep_shared_vs_per_checkpoint", ratio, ratio >= TARGETS["sep_shared_vs_per_checkpoint"])
        elif kind == "data" and "dali-gpu" in rate and "dali-cpu" in rate:
            ratio = rate["dali-gpu"] / rate["dali-cpu"]
            judge("dali_gpu_vs_dali_cpu", ratio, ratio >= TARGETS["dali_gpu_vs_dali_cpu"])
    return {"groups": {g: dict(r) for g, r in groups.items()}, "targets": targets}
