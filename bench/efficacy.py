"""Efficacy of the synthetic defaults: the drop over independent victim seeds, per dataset.

    python bench/efficacy.py                          # chestxray, celeba, utkface; 3 victim seeds each
    python bench/efficacy.py --datasets chestxray --victim-seeds 3 --set train.amp=false --set generate.amp=false

Runs ``python -m mtlue_fast.run --dataset D`` (the built-in synthetic sample, the shipped defaults,
one victim pair: the plain default command, timed from a fresh cache root so the synthetic sample and
caches are written too), then the same with ``--victim-seeds N --resume``, which keeps the surrogate,
generator, export and first pair and trains the other pairs; reads ``report.json`` and writes one JSON
with the drop per victim seed, its mean and sample standard deviation, the clean and protected means,
the stage times and the wall time, the CPU model (``lscpu``) and the versions, to
``bench/results/efficacy-<cpu-slug>-<date>.json`` (or ``--out``). Efficacy is measured by the run
command, not by pytest-benchmark (which is for speed). Nothing else should run on the machine while
it does, or the times mean little.
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

RESULTS = Path(__file__).resolve().parent / "results"
DATASETS = ("chestxray", "celeba", "utkface")


def run_dataset(dataset: str, seeds: int, assignments: list[str], work: Path) -> dict:
    """``python -m mtlue_fast.run`` of ``dataset`` with one victim pair (timed), then ``seeds`` pairs;
    the drops and times from ``report.json``."""
    out = work / dataset
    command = [sys.executable, "-m", "mtlue_fast.run", "--dataset", dataset, "--out", str(out), "--quiet",
               *[a for item in assignments for a in ("--set", item)]]
    env = {**os.environ, "MTLUE_CACHE": str(work / "cache")}  # a fresh cache root: what a new user pays
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    one_seed_wall = time.perf_counter() - started
    if done.returncode == 0 and seeds > 1:
        done = subprocess.run([*command, "--victim-seeds", str(seeds), "--resume"], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        return {"command": command, "failed": done.stderr[-2000:], "wall_seconds": wall}
    report = json.loads((out / "report.json").read_text())
    drops = [v["drop"] for v in report["victims"]]
    return {
        "command": " ".join(command[1:]), "one_seed_wall_seconds": round(one_seed_wall, 1),
        "wall_seconds": round(wall, 1), "metric": report["metric"],
        "victim_seeds": [v["seed"] for v in report["victims"]], "surrogate": report["surrogate"],
        "clean_mean": report["clean"]["mean"], "protected_mean": report["protected"]["mean"],
        "drops": drops, "drop_mean": statistics.fmean(drops),
        "drop_std": statistics.stdev(drops) if len(drops) > 1 else None, "drop_min": min(drops),
        "per_victim": report["victims"], "stage_seconds": report["timings"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated (default: all three)")
    parser.add_argument("--victim-seeds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to every run")
    parser.add_argument("--out", help="JSON path (default bench/results/efficacy-<cpu>-<date>.json)")
    parser.add_argument("--work", help="run folders (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    import torch

    from mtlue_fast.machine import cpu_bf16_flags, cpu_model, versions

    model = cpu_model()
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
    out = Path(args.out) if args.out else RESULTS / f"efficacy-{slug}-{time.strftime('%Y-%m-%d')}.json"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        for dataset in [d.strip() for d in args.datasets.split(",") if d.strip()]:
            print(f"efficacy: {dataset} with {args.victim_seeds} victim seeds ...", file=sys.stderr, flush=True)
            results[dataset] = run_dataset(dataset, args.victim_seeds, args.set, work)
            entry = results[dataset]
            if "failed" in entry:
                print(f"  failed: {entry['failed']}", file=sys.stderr)
            else:
                print(f"  drop {entry['drop_mean']:.3f} (per seed {', '.join(f'{d:.3f}' for d in entry['drops'])}), "
                      f"clean {entry['clean_mean']:.3f}; one seed {entry['one_seed_wall_seconds']:.0f} s, "
                      f"all {entry['wall_seconds']:.0f} s", file=sys.stderr, flush=True)
    record = {
        "benchmark": "efficacy of the synthetic defaults (python -m mtlue_fast.run, independent victims)",
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": model, "cpu_bf16_flags": cpu_bf16_flags(),
        "cores": torch.get_num_threads(), "settings": args.set, "versions": versions(), "results": results,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"efficacy: wrote {out}", file=sys.stderr)
    return 1 if any("failed" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
