"""Efficacy of the synthetic defaults: the drop over independent victim seeds, per dataset.

    python bench/efficacy.py                          # chestxray, celeba, utkface; 3 victim seeds each
    python bench/efficacy.py --datasets chestxray --victim-seeds 3 --set train.amp=false --set generate.amp=false
    python bench/efficacy.py --summarize runs/celeba-mtlue-tap-0123456789 --dataset celeba   # an existing run

Runs ``python -m mtlue_fast.run --dataset D`` (the built-in synthetic sample, the shipped defaults,
one victim pair: the plain default command, timed from a fresh cache root so the synthetic sample and
caches are written too), then the same with ``--victim-seeds N --resume``, which keeps the surrogate,
generator, export and first pair and trains the other pairs; reads ``report.json`` and writes one JSON
with the drop per victim seed, its mean and sample standard deviation, the clean and protected means,
the stage times and the wall time, the CPU model (``lscpu``) and the versions, to
``bench/results/efficacy-<cpu-slug>-<date>.json`` (or ``--out``). Efficacy is measured by the run
command, not by pytest-benchmark (which is for speed). Nothing else should run on the machine while
it does, or the times mean little.

Every stage is recorded too, so that two runs can be compared stage by stage (``stages``):

- ``surrogate``: the clean surrogate's per-task test metric (``surrogate/result.json``);
- ``generator``: passes, why it stopped, and per pass the stop error, losses and seconds
  (``generator/history.jsonl``);
- ``perturbation``: the export's statistics (``report.json``): mean and max ``|delta|`` overall and
  per task ``intra_class_std`` / ``mean_abs_delta`` in pixel units;
- ``per_task``: for classification datasets, per task the test split's majority rate (``chance``
  for AUC is 0.5), the surrogate's metric, and the clean and protected victims' metric per victim seed;
- ``decomposition``: per victim seed, the drop split into what falls to the chance level
  (``mean(clean - max(protected, chance))``, "erased") and what falls below it
  (``mean(max(protected, chance) - protected)``, "inverted"), with the tasks a clean victim does
  not learn (clean within ``LEARNED_MARGIN`` of chance) and those a protected victim inverts
  (protected below chance by more than ``LEARNED_MARGIN``).

``--summarize RUN_DIR`` writes the same record for a finished run (or one stopped after its
surrogate: then only the surrogate's per-task metric and the majority rates), without training.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mtlue_fast.config import VICTIM_RECIPE

RESULTS = Path(__file__).resolve().parent / "results"
DATASETS = ("chestxray", "celeba", "utkface")
#: A task's metric within this of chance counts as not learned (clean) or as inverted when below it (protected).
LEARNED_MARGIN = 0.01


def run_dataset(dataset: str, seeds: int, assignments: list[str], work: Path, reuse: bool = False) -> dict:
    """``python -m mtlue_fast.run`` of ``dataset`` with one victim pair (timed), then ``seeds`` pairs;
    the drops and times from ``report.json``, and every stage's record (:func:`stage_records`).
    ``reuse``: the first run gets ``--resume`` too, keeping what a run already in ``work`` has that
    still matches (then ``one_seed_wall_seconds`` is not what a new user pays)."""
    out = work / dataset
    command = [sys.executable, "-m", "mtlue_fast.run", "--dataset", dataset, "--out", str(out), "--quiet",
               *[a for item in assignments for a in ("--set", item)]]
    env = {**os.environ, "MTLUE_CACHE": str(work / "cache")}  # a fresh cache root: what a new user pays
    started = time.perf_counter()
    done = subprocess.run([*command, *(["--resume"] if reuse else [])], capture_output=True, text=True, env=env)
    one_seed_wall = time.perf_counter() - started
    if done.returncode == 0 and seeds > 1:
        done = subprocess.run([*command, "--victim-seeds", str(seeds), "--resume"], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"command": command, "failed": done.stderr[-2000:], "wall_seconds": wall}
    entry = {"command": " ".join(command[1:]), "one_seed_wall_seconds": round(one_seed_wall, 1),
             "wall_seconds": round(wall, 1), "reused_earlier_stages": reuse}
    entry.update(summarize_run(out, dataset, work / "cache"))
    return entry


def summarize_run(out: Path, dataset: str, cache_root: Path) -> dict:
    """The record of the run in ``out``: the drops (when it has a report) and :func:`stage_records`."""
    report = _read_json(out / "report.json")
    entry: dict = {}
    if report is not None:
        drops = [v["drop"] for v in report["victims"]]
        entry.update({
            "metric": report["metric"], "victim_seeds": [v["seed"] for v in report["victims"]],
            "surrogate": report["surrogate"],
            "victims": {k: report.get(k) for k in ("victim", *VICTIM_RECIPE, "defense")},
            "clean_mean": report["clean"]["mean"],
            "protected_mean": report["protected"]["mean"], "drops": drops, "drop_mean": statistics.fmean(drops),
            "drop_std": statistics.stdev(drops) if len(drops) > 1 else None, "drop_min": min(drops),
            "per_victim": report["victims"], "stage_seconds": report["timings"],
        })  # fmt: skip
    entry["stages"] = stage_records(out, dataset, cache_root, report)
    return entry


def stage_records(out: Path, dataset: str, cache_root: Path, report: dict | None) -> dict:
    """What each stage of the run in ``out`` produced (see the module docstring); missing parts are None."""
    surrogate = _read_json(out / "surrogate" / "result.json")
    surrogate_per_task = None
    if surrogate is not None:
        metrics, names = surrogate["metrics"], surrogate["task_names"]
        key = "auc" if "mean_auc" in metrics else "accuracy"
        if isinstance(metrics.get(key), list):
            surrogate_per_task = {"metric": key, "mean": metrics.get(f"mean_{key}"),
                                  "per_task": dict(zip(names, metrics[key]))}
    generator = _read_json(out / "generator" / "result.json")
    history = _read_jsonl(out / "generator" / "history.jsonl")
    generator_record = None
    if history:
        generator_record = {
            "passes": len(history), "stopped": (generator or {}).get("stopped"),
            "stop_error": [h.get("stop_error") for h in history],
            "history": [{k: h.get(k) for k in ("pass", "stop_error", "loss", "intra", "inter", "seconds")} for h in history],
        }  # fmt: skip
    perturbation = report.get("perturbation_stats") if report else None
    majority, test_cache = test_majority(cache_root, dataset)
    records = {"surrogate": surrogate_per_task, "generator": generator_record, "perturbation": perturbation,
               "test_cache": str(test_cache) if test_cache else None}
    records["per_task"], records["decomposition"] = per_task_table(report, surrogate_per_task, majority)
    return records


def test_majority(cache_root: Path, dataset: str) -> tuple[dict | None, Path | None]:
    """Per task the rate of its most frequent class on the test split (labels < 0 are missing), from
    the newest complete ``<dataset>-test-*`` cache under ``cache_root``; ``(None, None)`` when there is
    none or the labels are dense maps."""
    entries = sorted((p.parent for p in Path(cache_root).glob(f"{dataset}-test-*/manifest.json")),
                     key=lambda p: (p / "manifest.json").stat().st_mtime)
    if not entries:
        return None, None
    entry = entries[-1]
    manifest = _read_json(entry / "manifest.json") or {}
    labels_path = entry / "labels.npy"
    if not labels_path.exists() or "task_names" not in manifest:
        return None, entry
    labels = np.load(labels_path)
    if labels.ndim != 2:
        return None, entry
    rates = {}
    for k, name in enumerate(manifest["task_names"]):
        column = labels[:, k]
        column = column[column >= 0]
        rates[name] = float(np.bincount(column).max() / column.size) if column.size else None
    return rates, entry


def per_task_table(report: dict | None, surrogate: dict | None, majority: dict | None) -> tuple[dict | None, list | None]:
    """``({task: {"majority", "chance", "surrogate", "clean": [per seed], "protected": [per seed]}},
    [per seed decomposition])`` for classification runs; ``(None, None)`` for dense ones."""
    names = list(report["tasks"]) if report else list((surrogate or {}).get("per_task") or (majority or {}))
    if not names or (report and isinstance(report.get("metric"), dict)):
        return None, None
    metric = report["metric"] if report else (surrogate or {}).get("metric", "accuracy")
    victims = report["victims"] if report else []
    table = {}
    for name in names:
        rate = (majority or {}).get(name)
        table[name] = {
            "majority": rate, "chance": 0.5 if metric == "auc" else rate,
            "surrogate": ((surrogate or {}).get("per_task") or {}).get(name),
            "clean": [v["clean"]["per_task"].get(name) for v in victims],
            "protected": [v["protected"]["per_task"].get(name) for v in victims],
        }  # fmt: skip
    decomposition = []
    for i, victim in enumerate(victims):
        erased, inverted, not_learned, inverted_tasks = [], [], [], []
        for name, row in table.items():
            clean, protected, chance = row["clean"][i], row["protected"][i], row["chance"]
            if None in (clean, protected, chance):
                continue
            erased.append(clean - max(protected, chance))
            inverted.append(max(protected, chance) - protected)
            if clean <= chance + LEARNED_MARGIN:
                not_learned.append(name)
            if protected < chance - LEARNED_MARGIN:
                inverted_tasks.append(name)
        decomposition.append({
            "seed": victim["seed"], "erased": statistics.fmean(erased) if erased else None,
            "inverted": statistics.fmean(inverted) if inverted else None,
            "not_learned_by_clean": not_learned, "inverted_tasks": inverted_tasks,
        })  # fmt: skip
    return table, decomposition


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def _describe(entry: dict) -> str:
    parts = []
    if "drops" in entry:
        parts.append(f"drop {entry['drop_mean']:.3f} (per seed {', '.join(f'{d:.3f}' for d in entry['drops'])}), "
                     f"clean {entry['clean_mean']:.3f}")
    if "one_seed_wall_seconds" in entry:
        parts.append(f"one seed {entry['one_seed_wall_seconds']:.0f} s, all {entry['wall_seconds']:.0f} s")
    stages = entry.get("stages") or {}
    for d in stages.get("decomposition") or []:
        parts.append(f"seed {d['seed']}: erased {d['erased']:.3f} + inverted {d['inverted']:.3f}, "
                     f"{len(d['not_learned_by_clean'])} tasks not learned, {len(d['inverted_tasks'])} inverted")
    table = stages.get("per_task") or {}
    if stages.get("surrogate") and table:
        rows = [r for r in table.values() if r["surrogate"] is not None and r["chance"] is not None]
        below = sum(r["surrogate"] <= r["chance"] + LEARNED_MARGIN for r in rows)
        parts.append(f"surrogate {stages['surrogate']['mean']:.3f}, {below}/{len(rows)} tasks at chance")
    if stages.get("generator"):
        parts.append("stop error per pass " + ", ".join(f"{e:.3f}" for e in stages["generator"]["stop_error"]))
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated (default: all three)")
    parser.add_argument("--victim-seeds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to every run")
    parser.add_argument("--out", help="JSON path (default bench/results/efficacy-<cpu>-<date>.json)")
    parser.add_argument("--work", help="run folders (default: a temporary folder, removed)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the stages of a run already in --work that still match (the times are then not a new user's)")
    parser.add_argument("--summarize", metavar="RUN_DIR", help="record an existing run instead of running one")
    parser.add_argument("--dataset", help="with --summarize: the run's dataset (default: from its report or config)")
    parser.add_argument("--cache-root", help="with --summarize: where its test cache is (default $MTLUE_CACHE or ~/.cache/mtlue_fast)")
    args = parser.parse_args(argv)
    import torch

    from mtlue_fast.machine import cpu_bf16_flags, cpu_model, versions

    model = cpu_model()
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
    out = Path(args.out) if args.out else RESULTS / f"efficacy-{slug}-{time.strftime('%Y-%m-%d')}.json"
    results = {}
    if args.summarize:
        run_dir = Path(args.summarize)
        dataset = args.dataset or _run_dataset(run_dir)
        if dataset is None:
            parser.error(f"--summarize {run_dir}: no report.json or config.yaml naming its dataset; pass --dataset")
        from mtlue_fast.data import default_cache_root

        cache_root = Path(args.cache_root) if args.cache_root else default_cache_root()
        results[dataset] = {"run": str(run_dir), **summarize_run(run_dir, dataset, cache_root)}
        print(f"efficacy: {dataset}: {_describe(results[dataset])}", file=sys.stderr)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(args.work) if args.work else Path(tmp)
            for dataset in [d.strip() for d in args.datasets.split(",") if d.strip()]:
                print(f"efficacy: {dataset} with {args.victim_seeds} victim seeds ...", file=sys.stderr, flush=True)
                results[dataset] = run_dataset(dataset, args.victim_seeds, args.set, work, args.reuse)
                entry = results[dataset]
                if "failed" in entry:
                    print(f"  failed: {entry['failed']}", file=sys.stderr)
                else:
                    print(f"  {_describe(entry)}", file=sys.stderr, flush=True)
    record = {
        "benchmark": "efficacy of the synthetic defaults (python -m mtlue_fast.run, independent victims)",
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": model, "cpu_bf16_flags": cpu_bf16_flags(),
        "cores": torch.get_num_threads(), "settings": args.set, "versions": versions(), "results": results,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"efficacy: wrote {out}", file=sys.stderr)
    return 1 if any("failed" in r for r in results.values()) else 0


def _run_dataset(run_dir: Path) -> str | None:
    report = _read_json(run_dir / "report.json")
    if report and report.get("dataset"):
        return report["dataset"]
    config = run_dir / "config.yaml"
    if config.exists():
        match = re.search(r"^dataset:\s*(\S+)", config.read_text(), re.MULTILINE)
        return match.group(1) if match else None
    return None


if __name__ == "__main__":
    sys.exit(main())
