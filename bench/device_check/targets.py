"""The GPU targets, judged from a check's record: one table, the one docs/results.md gives.

Each target reads what a part measured (``record["parts"][part]["results"]``) and gives one row:
``{"name", "what", "value", "threshold", "at_most", "unit", "met", "detail"}``. ``met`` is True or
False on a GPU, None off a GPU or where the part did not measure it (``value`` None then too).
The paper-scale rows take :mod:`bench/paper_scale.py`'s own verdict, which is None unless the job
ran at the paper's settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .bandwidth import image_shape

#: perturb_apply: (impl, smallest batch, fraction of copy bandwidth). ``kernels``: the registered
#: forward and backward ops called back to back; ``compiled``: the whole op call, autograd included.
PERTURB_KERNELS = ("kernels", 2048, 0.75)
PERTURB_CALL = ("compiled", 512, 0.50)
#: bench/paper_scale.py's targets, which it judges itself (at the paper's settings only):
#: name -> threshold; the job's time is met at most, the rates at least.
PAPER_SCALE = {"full_job_seconds": 360.0, "victim_images_per_second": 150_000.0, "generator_images_per_second": 25_000.0}
#: The gradient-weighting strategies whose step time is held against equal weighting's.
WEIGHTING_WITH_TARGET = ("pcgrad", "mgda", "fairgrad", "aligned_mtl")


@dataclass(frozen=True)
class Target:
    name: str
    what: str
    threshold: float
    at_most: bool  # True: met when value <= threshold
    unit: str
    measure: Callable[[dict], tuple[float | None, str, bool | None]]
    """record's parts -> (value, detail, the verdict the part gave itself, None where it gave none)."""
    part_judges: bool = False  # take the part's own verdict (paper_scale.py judges only the paper's settings)


def _results(parts: dict, name: str) -> dict:
    return (parts.get(name) or {}).get("results") or {}


def _paper_scale(key: str):
    def measure(parts: dict):
        r = _results(parts, "paper-scale")
        value = (r.get("summary") or {}).get(key)
        own = (r.get("targets") or {}).get(key, {})
        scale = (r.get("summary") or {}).get("scale")
        changed = r.get("paper_settings_changed") or []
        detail = f"paper_scale.py ({scale}" + (f"; {len(changed)} paper settings changed)" if changed else ")") if scale else ""
        return value, detail, own.get("met")

    return measure


def _fastest(bench: str, group_prefix: str):
    """The fastest variant's images/s in the part's ``bench`` summary, among the groups named ``group_prefix...``."""

    def measure(parts: dict):
        best, detail = None, ""
        for group, rows in ((_results(parts, "bench").get(bench) or {}).get("groups") or {}).items():
            if rows and group.startswith(group_prefix):
                variant, row = max(rows.items(), key=lambda kv: kv[1]["images_per_second"])
                if best is None or row["images_per_second"] > best:
                    best, detail = row["images_per_second"], f"{variant}, {group}"
        return best, detail, None

    return measure


def _perturb(impl: str, min_batch: int, raw: str):
    def measure(parts: dict):
        rows = [r for r in (_results(parts, "bench").get("ops") or {}).get("rows", [])
                if r.get("op") == "perturb_apply" and r.get("impl") == impl and r.get("raw") == raw
                and r.get("passes") == "forward+backward" and r.get("fraction_of_copy") is not None
                and (image_shape(r.get("size")) or (0,))[0] >= min_batch]  # fmt: skip
        if not rows:
            return None, "", None
        weakest = min(rows, key=lambda r: r["fraction_of_copy"])
        return weakest["fraction_of_copy"], f"weakest of {len(rows)}: {weakest['size']}", None

    return measure


def _weighting(parts: dict):
    for rows in ((_results(parts, "bench").get("victim") or {}).get("groups") or {}).values():
        ratios = {v: r["step_time_vs_ew"] for v, r in rows.items() if v in WEIGHTING_WITH_TARGET and "step_time_vs_ew" in r}
        if ratios:
            worst = max(ratios, key=ratios.get)
            return ratios[worst], f"slowest: {worst} ({', '.join(sorted(ratios))} measured)", None
    return None, "", None


def _ratio(bench: str, faster: tuple[str, ...], slower: tuple[str, ...]):
    """The best of ``faster`` over the best of ``slower`` (variants, or data roles), first group that has both."""

    def measure(parts: dict):
        for group, rows in ((_results(parts, "bench").get(bench) or {}).get("groups") or {}).items():
            def best(names):
                found = [(r["images_per_second"], v) for v, r in rows.items() if v in names or r.get("role") in names]
                return max(found) if found else None

            top, base = best(faster), best(slower)
            if top and base:
                return top[0] / base[0], f"{top[1]} / {base[1]}, {group}", None
        return None, "", None

    return measure


def _tests(module: str | None):
    def measure(parts: dict):
        r = _results(parts, "tests")
        counts = (r.get("modules") or {}).get(module) if module else r.get("counts")
        if not counts or not counts.get("passed") and not counts.get("failed") and not counts.get("error"):
            return None, "", None
        bad = counts.get("failed", 0) + counts.get("error", 0)
        return float(bad), f"{counts.get('passed', 0)} passed, {counts.get('skipped', 0)} skipped", None

    return measure


TARGETS: tuple[Target, ...] = (
    Target("full_job_seconds", "the paper's CelebA job, one GPU", PAPER_SCALE["full_job_seconds"], True, "s",
           _paper_scale("full_job_seconds"), True),
    Target("victim_images_per_second", "victim training in the job (ResNet-18 w1.0, b512, 64x64)",
           PAPER_SCALE["victim_images_per_second"], False, "images/s", _paper_scale("victim_images_per_second"), True),
    Target("generator_images_per_second", "generator training in the job (TAP, w1.0, b512)",
           PAPER_SCALE["generator_images_per_second"], False, "images/s", _paper_scale("generator_images_per_second"), True),
    Target("victim_bench_images_per_second", "victim training, fastest step variant (bench_victim.py)",
           PAPER_SCALE["victim_images_per_second"], False, "images/s", _fastest("victim", "victim training")),
    Target("generator_bench_images_per_second", "generator training, fastest step variant (bench_generator.py)",
           PAPER_SCALE["generator_images_per_second"], False, "images/s", _fastest("generator", "generator training")),
    *(Target(f"perturb_apply_{impl}_{raw}", f"perturb_apply {'kernels back to back' if impl == 'kernels' else 'whole op call'}, "
             f"fwd+bwd, batch >= {batch}, {raw} raw", share, False, "of copy", _perturb(impl, batch, raw))
      for impl, batch, share in (PERTURB_KERNELS, PERTURB_CALL) for raw in ("float32", "bfloat16")),
    Target("weighting_step_vs_ew", "gradient weighting step / ew step (slowest strategy)", 1.3, True, "x", _weighting),
    Target("sep_shared_vs_per_checkpoint", "SEP shared pass vs a pass per checkpoint (15)", 5.0, False, "x",
           _ratio("generator", ("shared pass",), ("pass per checkpoint",))),
    Target("gpu_decode_vs_cpu_pipeline", "CelebA cache decoding, best GPU decoder / CPU pipeline", 3.0, False, "x",
           _ratio("data", ("gpu",), ("cpu-pipeline",))),
    Target("sync_free_failures", "per-step paths under set_sync_debug_mode('error'): failed tests", 0.0, True, "tests",
           _tests("tests/test_sync_free.py")),
    Target("cuda_test_failures", "CUDA tests (parity, messages, loader, graphs): failed tests", 0.0, True, "tests", _tests(None)),
)  # fmt: skip


def judge(record: dict) -> list[dict]:
    """One row per target of :data:`TARGETS` from the record's parts (see the module docstring)."""
    parts, gpu = record.get("parts") or {}, (record.get("device") or {}).get("type") == "cuda"
    rows = []
    for t in TARGETS:
        value, detail, own = t.measure(parts)
        met = None
        if value is not None and gpu:
            met = own if t.part_judges else (value <= t.threshold if t.at_most else value >= t.threshold)
        rows.append({"name": t.name, "what": t.what, "value": value, "threshold": t.threshold, "at_most": t.at_most,
                     "unit": t.unit, "met": met, "detail": detail})  # fmt: skip
    return rows
