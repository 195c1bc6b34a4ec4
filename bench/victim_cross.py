"""Which stage decides a difference between two runs: train victims of one run's data with
another run's precision.

    python bench/victim_cross.py --run RUN_DIR --seeds 1,2 --amp false --out cross.json

Opens ``RUN_DIR/protected`` (its export) and the clean training and test caches the export was made
from (``protected/manifest.json``'s ``clean_path``, the test cache next to it), and trains, per victim
seed, a clean and a protected victim with the run's own victim recipe (``RUN_DIR/config.yaml``) except
``train.amp`` (``--amp``). Writes per seed the clean and protected per-task test metric and the drop.
Two runs A and B that differ only in precision then give four combinations of (export, victim
precision); if the victims' precision decides the drop, the drop follows ``--amp``, if the export
decides it, the drop follows the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import yaml


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished run directory (with protected/ and config.yaml)")
    parser.add_argument("--seeds", default="1,2", help="comma-separated victim seeds (default 1,2)")
    parser.add_argument("--amp", choices=("true", "false", "auto"), required=True, help="the victims' train.amp")
    parser.add_argument("--kinds", default="clean,protected", help="which victims to train (default both)")
    parser.add_argument("--out", required=True, help="JSON path")
    parser.add_argument("--work", help="victim folders (default OUT's stem next to OUT)")
    args = parser.parse_args(argv)

    from mtlue_fast.config import RunConfig, build
    from mtlue_fast.data import open_cache
    from mtlue_fast.train import train

    run = Path(args.run)
    cfg = build(RunConfig, yaml.safe_load((run / "config.yaml").read_text()))
    protected = open_cache(run / "protected")
    clean_path = Path(protected.manifest["clean_path"])
    clean = open_cache(clean_path)
    # the test cache of the same source (a cache root may hold caches of other copies of the data)
    tests = [m.parent for m in sorted(clean_path.parent.glob(f"{cfg.dataset}-test-*/manifest.json"))
             if json.loads(m.read_text()).get("root") == clean.manifest.get("root")]
    if len(tests) != 1:
        parser.error(f"expected one test cache of {clean.manifest.get('root')} next to {clean_path}, found {len(tests)}")
    test = open_cache(tests[0])
    amp = {"true": True, "false": False, "auto": "auto"}[args.amp]
    work = Path(args.work) if args.work else Path(args.out).with_suffix("")
    crop = tuple(cfg.data.crop) if cfg.data.crop else None
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    victims = []
    for seed in (int(s) for s in args.seeds.split(",")):
        entry: dict = {"seed": seed}
        for kind in kinds:
            started = time.perf_counter()
            recipe = cfg.victim_train(seed).replace(amp=amp, progress=False)
            result = train(clean if kind == "clean" else protected, test, work / f"seed-{seed}" / kind, recipe, crop=crop)
            metrics = result.metrics
            key = "auc" if "mean_auc" in metrics else "accuracy"
            entry[kind] = {"mean": metrics[f"mean_{key}"], "per_task": dict(zip(result.task_names, metrics[key])),
                           "seconds": round(time.perf_counter() - started, 1)}
            print(f"seed {seed} {kind}: {entry[kind]['mean']:.4f}", file=sys.stderr, flush=True)
        if "clean" in entry and "protected" in entry:
            entry["drop"] = entry["clean"]["mean"] - entry["protected"]["mean"]
        victims.append(entry)
    drops = [v["drop"] for v in victims if "drop" in v]
    record = {"run": str(run), "amp": args.amp, "victims": victims,
              "drop_mean": statistics.fmean(drops) if drops else None}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"victim_cross: drops {drops}; wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
