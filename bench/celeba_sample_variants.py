"""Which attributes of the synthetic CelebA sample a clean model learns, on variants of the sample.

    python bench/celeba_sample_variants.py                                   # every variant, seeds 1-4
    python bench/celeba_sample_variants.py --variants shipped,rare_last --seeds 1,2 --jobs 2

Each variant changes how the sample paints its attribute marks (constants and functions of
``mtlue_fast.data.synthetic.celeba``, patched in a worker process only), writes the sample once
(8,000 training / 2,000 test images, sample seed 0) and trains, for every seed, the clean model of
the synthetic CelebA default (``python -m mtlue_fast.run --stages surrogate --seed S``: ResNet-18
x0.25, batch 128, 20 epochs unless the variant says otherwise: some change the epochs, the width or
other training settings): the same training as a clean victim
of that seed. It records per attribute the test accuracy and the test split's majority rate, and
counts an attribute as learned when its accuracy is above the majority rate by more than
``LEARNED_MARGIN`` (as ``bench/efficacy.py`` does). No protection is trained: this measures the
sample, not the method.

``--jobs 2`` runs two trainings side by side, each with one thread (``OMP_NUM_THREADS=1``); results
then match a one-thread run, not the default thread count. Writes
``bench/results/celeba-sample-variants-<cpu>-<date>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LEARNED_MARGIN = 0.01
N_TRAIN, N_TEST = 8000, 2000


def _swap(a: str, b: str) -> dict[str, str]:
    """``places`` setting: marks ``a`` and ``b`` trade places."""
    return {a: b, b: a}


#: Paints (upper, lower; indices into ``_CELEBA_PAINTS``) of ``distinct_paints``.
_DISTINCT_PAINTS = {"Brown_Hair": (2, 0), "Bangs": (4, 2), "Blond_Hair": (0, 6), "Sideburns": (2, 5)}
_DISTINCT_PAINTS_3 = {name: paints for name, paints in _DISTINCT_PAINTS.items() if name != "Blond_Hair"}
_DISTINCT_PAINTS_4 = {**_DISTINCT_PAINTS_3, "Wearing_Hat": (6, 5)}
_DISTINCT_PAINTS_5 = {**_DISTINCT_PAINTS_3, "Wearing_Hat": (6, 0)}

#: name -> (what it changes, settings read by _apply). Variants with ``shipped`` change the shipped
#: sample (version 6: version 3's marks, Bald painted green over white, ``bald_green_white``); the
#: others change sample version 3 (Bald a spot of the large size, red over near black, on the hair
#: line), which version 5 painted again.
#: Sizes multiply a mark's radius; "rare" means a minority rate below 0.25 (the sample's own rule for
#: large marks).
VARIANTS: dict[str, tuple[str, dict]] = {
    "shipped": ("the sample as shipped (version 6: version 3's marks, Bald painted green over white)",
                {"shipped": True}),
    "v3": ("sample version 3: Bald a spot of the large radius", {}),
    "bald_large": ("Bald's mark 1.4x larger", {"bald_scale": 1.4}),
    "bald_floor": ("Bald's faintest case at 0.8 of its opacity instead of 0.5", {"bald_floor": 0.8}),
    "rare_large": ("rare marks larger, (0.25 / minority) ** 0.25 up to 1.5x; their faintest case "
                   "0.15 * (0.5 / minority) ** 0.75 up to 0.6", {"rare_radius_power": 0.25, "floor_power": 0.75}),
    "rare_large_bald_white": ("rare_large, and Bald painted white over black, a pair no other mark uses",
                              {"rare_radius_power": 0.25, "floor_power": 0.75, "bald_paint": (6, 5)}),
    "rare_last": ("marks painted from the most common to the rarest, so that no common mark covers a rare one",
                  {"rare_last": True}),
    "rare_last_bald_white_2x": ("rare_last, and Bald 2x larger, white over black",
                                {"rare_last": True, "bald_scale": 2.0, "bald_paint": (6, 5)}),
    "v3_30_epochs": ("sample version 3, trained for 30 epochs instead of 20", {"epochs": 30}),
    "width_half": ("sample version 5 (version 3's marks), a clean model of width 0.5 (about 4x the default's compute)", {"width": 0.5}),
    "width_half_10_epochs": ("sample version 5 (version 3's marks), a clean model of width 0.5 trained for 10 epochs (about 2x the "
                             "default's compute)", {"width": 0.5, "epochs": 10}),
    "width_full": ("sample version 5 (version 3's marks), a clean model of width 1.0 (the real-data default's backbone)",
                   {"width": 1.0}),
    "lr_2x": ("sample version 5 (version 3's marks), the clean model trained at twice the learning rate (0.002)",
              {"set": {"train.lr": 0.002}}),
    "lr_4x": ("sample version 5 (version 3's marks), the clean model trained at four times the learning rate (0.004)",
              {"set": {"train.lr": 0.004}}),
    "batch_64": ("sample version 5 (version 3's marks), batches of 64 instead of 128 (twice the steps)", {"set": {"train.batch_size": 64}}),
    "no_weight_decay": ("sample version 5 (version 3's marks), the clean model trained without weight decay (0 instead of 1e-4: "
                        "Adam scales the decay of a rare attribute's head as much as its small loss gradient)",
                        {"set": {"train.weight_decay": 0.0}}),
    "late_decay": ("sample version 5 (version 3's marks), the learning rate decayed at 80% and 90% of the epochs instead of 60% and 80%",
                   {"set": {"train.milestones": "[0.8,0.9]"}}),
    "bald_3x": ("Bald's mark 3x larger: a band over the top of the face (version 4)", {"bald_scale": 3.0}),
    "bald_3x_last": ("Bald's mark 3x larger and painted last, over every other mark",
                     {"bald_scale": 3.0, "bald_last": True}),
    "rare_large_bald_3x": ("rare_large, and Bald's mark 3x its version-3 size (rare_large's 1.5x, then 2x)",
                           {"rare_radius_power": 0.25, "floor_power": 0.75, "bald_scale": 2.0}),
    "bald_3x_bangs_2x": ("Bald's mark 3x larger, Bangs' 2x", {"bald_scale": 3.0, "scales": {"Bangs": 2.0}}),
    "bald_centre": ("Bald's mark moved to the middle of the face (row 3, column 4 of the grid, on skin), "
                    "High_Cheekbones to Bald's place on the hair line", {"places": _swap("Bald", "High_Cheekbones")}),
    "bald_chin": ("Bald's mark moved to the chin (the last row of the grid, third of six places, on skin), its place "
                  "on the hair line left empty; the last row's other marks spread over six places instead of five",
                  {"move": ("Bald", 5, 2)}),
    "bald_blurry_swap": ("Bald's mark moved to Blurry's place on the chin, Blurry's (whose blur marks it too) to "
                         "Bald's on the hair line", {"places": _swap("Bald", "Blurry")}),
    "bald_lipstick_swap": ("Bald's mark moved to Wearing_Lipstick's place (row 4, column 4 of the grid, the middle of "
                           "the face), Wearing_Lipstick's (white over red) to Bald's on the hair line",
                           {"places": _swap("Bald", "Wearing_Lipstick")}),
    "bald_nose_swap": ("Bald's mark moved to Pointy_Nose's place (row 3, column 3, on the face), Pointy_Nose's "
                       "(magenta over yellow) to Bald's on the hair line", {"places": _swap("Bald", "Pointy_Nose")}),
    "bald_centre_blurry_hairline": ("Bald's mark moved to High_Cheekbones' place (as bald_centre), High_Cheekbones' "
                                    "to Blurry's on the chin, Blurry's (whose blur marks it too) to Bald's on the hair line",
                                    {"places": {"Bald": "High_Cheekbones", "High_Cheekbones": "Blurry", "Blurry": "Bald"}}),
    "bald_forehead_swap": ("Bald's mark moved to Arched_Eyebrows' place (row 2, column 4: the middle of the forehead, "
                           "on skin above the eyes), Arched_Eyebrows' to Bald's on the hair line",
                           {"places": _swap("Bald", "Arched_Eyebrows")}),
    "bald_brow_swap": ("Bald's mark moved to Bushy_Eyebrows' place (row 2, column 5: the forehead, right of the middle), "
                       "Bushy_Eyebrows' to Bald's on the hair line", {"places": _swap("Bald", "Bushy_Eyebrows")}),
    "bald_forehead_blurry_hairline": ("Bald's mark moved to Arched_Eyebrows' place (as bald_forehead_swap), "
                                      "Arched_Eyebrows' to Blurry's on the chin, Blurry's to Bald's on the hair line",
                                      {"places": {"Bald": "Arched_Eyebrows", "Arched_Eyebrows": "Blurry",
                                                  "Blurry": "Bald"}}),
    "bald_bangs_swap": ("Bald's mark moved to Bangs' place (row 1, column 4: the middle of the hair line), Bangs' to "
                        "Bald's (the hair line, left of the middle)", {"places": _swap("Bald", "Bangs")}),
    "bald_hat_swap": ("Bald's mark moved to Wearing_Hat's place (the last row, third of five: the middle of the chin), "
                      "Wearing_Hat's to Bald's on the hair line", {"places": _swap("Bald", "Wearing_Hat")}),
    "bald_white_green": ("Bald painted white over green (no near-black half to vanish on dark hair; a pair no other "
                         "wide bar uses), at its own place and size", {"bald_paint": (6, 2)}),
    "bald_green_white": ("Bald painted green over white, at its own place and size", {"bald_paint": (2, 6)}),
    "shipped_rare_large": ("the shipped sample (version 6) with rare marks larger, as rare_large, except Bald (its "
                           "size kept)", {"shipped": True, "rare_radius_power": 0.25, "floor_power": 0.75,
                                          "scales": {"Bald": 1 / 1.5}}),
    "shipped_rare_floor": ("the shipped sample (version 6) with the rare marks' faintest case raised as in rare_large "
                           "(0.15 * (0.5 / minority) ** 0.75 up to 0.6), their sizes kept", {"shipped": True, "floor_power": 0.75}),
    "shipped_rare_last": ("the shipped sample (version 6) with its marks painted from the most common to the rarest "
                          "(as rare_last), so that no common mark covers a rare one", {"shipped": True, "rare_last": True}),
    "shipped_rare_last_floor": ("shipped_rare_last, and the rare marks' faintest case raised as in shipped_rare_floor",
                                {"shipped": True, "rare_last": True, "floor_power": 0.75}),
    "distinct_paints": ("the shipped sample (version 6) with the rare marks the clean models miss on some seeds "
                        "painted so that no half shares its paint and shape with a common attribute's mark (minority "
                        "rate 0.21 or more; version 6: Bangs' red-topped tall bar is Attractive's, its white-bottomed "
                        "one Male's): Brown_Hair green over red, Bangs magenta over green, Blond_Hair red over white, "
                        "Sideburns green over near black", {"shipped": True, "paints": _DISTINCT_PAINTS}),
    "distinct_paints_3": ("distinct_paints with Blond_Hair's version-6 paints kept (yellow over near black): red over "
                          "white, a disc on the hair line, was learned on 2 of 6 seeds", {"shipped": True, "paints": _DISTINCT_PAINTS_3}),
    "distinct_paints_4": ("distinct_paints_3, and Wearing_Hat white over near black (version 6: near black over "
                          "magenta, whose halves Straight_Hair's and Black_Hair's tall bars share)",
                          {"shipped": True, "paints": _DISTINCT_PAINTS_4}),
    "distinct_paints_5": ("distinct_paints_3, and Wearing_Hat white over red (white over near black, distinct_paints_4, "
                          "was learned on no seed)", {"shipped": True, "paints": _DISTINCT_PAINTS_5}),
    "shipped_width_half": ("the shipped sample, a clean model of width 0.5 (about 2.5x the default's time)",
                           {"shipped": True, "width": 0.5}),
    "shipped_width_5_16": ("the shipped sample, a clean model of width 0.3125 (20 channels in the stem instead of 16)",
                           {"shipped": True, "width": 0.3125}),
    "shipped_width_half_10_epochs": ("the shipped sample, a clean model of width 0.5 trained for 10 epochs instead of 20 "
                                     "(about 1.25x the default's time; on version 5 it missed Bald, which version 6 "
                                     "made learnable at width 0.25)", {"shipped": True, "width": 0.5, "epochs": 10}),
    "shipped_width_half_12_epochs": ("the shipped sample, a clean model of width 0.5 trained for 12 epochs instead of 20 "
                                     "(about 1.5x the default's time)", {"shipped": True, "width": 0.5, "epochs": 12}),
    "shipped_prior_bias": ("the shipped sample, the clean model's output biases started at each attribute's log-odds "
                           "in the sample, log(p / (1 - p)), instead of PyTorch's default draw (a common start for rare "
                           "classes: the heads need not first learn the prevalence)", {"shipped": True, "prior_bias": True}),
    "hair_large": ("marks of what covers much of a real face larger: Bald 3x; Bangs, Wearing_Hat 2x; "
                   "Black_Hair, Blond_Hair, Brown_Hair, Gray_Hair 1.5x",
                   {"bald_scale": 3.0, "scales": {"Bangs": 2.0, "Wearing_Hat": 2.0, "Black_Hair": 1.5,
                                                  "Blond_Hair": 1.5, "Brown_Hair": 1.5, "Gray_Hair": 1.5}}),
}


def _minority(celeba, name: str) -> float:
    p = celeba.CELEBA_PREVALENCE[name]
    return min(p, 1.0 - p)


def _apply(settings: dict) -> None:
    """Patch ``mtlue_fast.data.synthetic.celeba`` in this process as ``settings`` say."""
    from mtlue_fast.data.synthetic import celeba

    if not settings.get("shipped"):  # version 3's paints (every mark by the sample's rule), but bald_paint
        celeba._CELEBA_PAINT_OVERRIDES = {"Bald": settings["bald_paint"]} if "bald_paint" in settings else {}
    if "paints" in settings:
        celeba._CELEBA_PAINT_OVERRIDES = {**celeba._CELEBA_PAINT_OVERRIDES, **settings["paints"]}
    patterns, floor = celeba._celeba_patterns, celeba._celeba_floor

    def patched_patterns():
        out = patterns()
        for k, name in enumerate(celeba.CELEBA_ATTRIBUTES):
            scale, minority = 1.0, _minority(celeba, name)
            if "rare_radius_power" in settings and minority < 0.25:
                scale *= min(1.5, (0.25 / minority) ** settings["rare_radius_power"])
            scale *= settings.get("scales", {}).get(name, 1.0)
            if name == "Bald":
                scale *= settings.get("bald_scale", 1.0)
            out[k] = dataclasses.replace(out[k], r=out[k].r * scale)
        return out

    def patched_floor(name: str) -> float:
        if name == "Bald" and "bald_floor" in settings:
            return settings["bald_floor"]
        if "floor_power" in settings:
            return min(0.6, 0.15 * (0.5 / _minority(celeba, name)) ** settings["floor_power"])
        return floor(name)

    if "places" in settings:  # name -> whose place it takes
        places = settings["places"]
        inverse = {old: new for new, old in places.items()}
        celeba._CELEBA_GRID = tuple(tuple(inverse.get(n, n) for n in row) for row in celeba._CELEBA_GRID)
    if "move" in settings:  # an empty place (None) keeps every other mark of the old row where it was
        name, row, col = settings["move"]
        grid = [[None if n == name else n for n in names] for names in celeba._CELEBA_GRID]
        grid[row].insert(col, name)
        celeba._CELEBA_GRID = tuple(tuple(names) for names in grid)
    celeba._celeba_patterns, celeba._celeba_floor = patched_patterns, patched_floor
    if settings.get("rare_last"):
        order = sorted(range(len(celeba.CELEBA_ATTRIBUTES)), key=lambda k: -_minority(celeba, celeba.CELEBA_ATTRIBUTES[k]))
        celeba._celeba_paint_order = lambda: list(order)
    if settings.get("bald_last"):
        bald = celeba.CELEBA_ATTRIBUTES.index("Bald")
        order = [k for k in celeba._celeba_paint_order() if k != bald] + [bald]
        celeba._celeba_paint_order = lambda: list(order)


def write_sample(variant: str, work: Path) -> Path:
    """The variant's sample under ``work/VARIANT/data``, written once."""
    _apply(VARIANTS[variant][1])
    from mtlue_fast.data import synthetic

    root = work / variant / f"data-v{synthetic.VERSION}"
    if not root.exists():
        synthetic.write("celeba", root, N_TRAIN, N_TEST, 0)
    return root


def _majority_rates(root: Path) -> dict[str, float]:
    """Per attribute, the test split's majority rate (the share of its more frequent value)."""
    lines = (root / "list_attr_celeba.txt").read_text().splitlines()
    names = lines[1].split()
    test = {line.split()[0] for line in (root / "list_eval_partition.txt").read_text().splitlines() if line.split()[1] == "2"}
    rows = [line.split()[1:] for line in lines[2:] if line.split() and line.split()[0] in test]
    rates = {}
    for k, name in enumerate(names):
        positive = sum(row[k] == "1" for row in rows) / len(rows)
        rates[name] = max(positive, 1.0 - positive)
    return rates


def _start_heads_at_the_prior() -> None:
    """Patch ``MultiTaskNet`` in this process: a net with one logit per CelebA attribute starts its
    head's bias at the attributes' log-odds (the sample's prevalences); its weights are drawn as before."""
    import math

    import torch

    from mtlue_fast.data.synthetic import celeba
    from mtlue_fast.models import multitask

    log_odds = torch.tensor([math.log(p / (1 - p)) for p in (celeba.CELEBA_PREVALENCE[n] for n in celeba.CELEBA_ATTRIBUTES)])
    init = multitask.MultiTaskNet.__init__

    def init_at_the_prior(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        if self.num_outputs == (1,) * len(log_odds):
            with torch.no_grad():
                self.head.bias.copy_(log_odds)

    multitask.MultiTaskNet.__init__ = init_at_the_prior


def worker(variant: str, seed: int, work: Path) -> dict:
    """Train the clean model of ``seed`` on the variant's sample; its per-attribute record."""
    from mtlue_fast import run

    _, settings = VARIANTS[variant]
    root = write_sample(variant, work)
    if settings.get("prior_bias"):
        _start_heads_at_the_prior()
    out = work / variant / f"seed-{seed}"
    epochs, width = settings.get("epochs", 20), settings.get("width", 0.25)
    started = time.perf_counter()
    run.main(["--dataset", "celeba", "--data-root", str(root), "--out", str(out), "--stages", "surrogate",
              "--seed", str(seed), "--quiet", "--force", "--set", f"train.width={width}", "--set", f"train.epochs={epochs}",
              "--set", "train.batch_size=128",
              *[a for key, value in settings.get("set", {}).items() for a in ("--set", f"{key}={value}")]])  # fmt: skip
    metrics = json.loads((out / "surrogate" / "result.json").read_text())["metrics"]
    accuracy = dict(zip(metrics["task_names"], metrics["accuracy"]))
    majority = _majority_rates(root)
    return {
        "variant": variant, "seed": seed, "epochs": epochs, "width": width, "seconds": round(time.perf_counter() - started, 1),
        "mean": metrics["mean_accuracy"], "accuracy": accuracy, "majority": majority,
        "not_learned": [n for n in accuracy if accuracy[n] <= majority[n] + LEARNED_MARGIN],
    }  # fmt: skip


def _run_worker(variant: str, seed: int, work: Path, threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, __file__, "--worker", variant, str(seed), "--work", str(work)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        return {"variant": variant, "seed": seed, "failed": done.stderr[-2000:]}
    return json.loads(lines[-1][len("RESULT "):])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="all", help=f"comma-separated of {', '.join(VARIANTS)} (default all)")
    parser.add_argument("--seeds", default="1,2,3,4", help="training seeds (default 1,2,3,4)")
    parser.add_argument("--jobs", type=int, default=1, help="trainings side by side, one thread each when > 1")
    parser.add_argument("--work", help="samples and runs (default a folder under /tmp, kept)")
    parser.add_argument("--out", help="JSON path")
    parser.add_argument("--worker", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--write-sample", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.work or f"/tmp/celeba-sample-variants-{os.getpid()}")
    if args.write_sample:
        write_sample(args.write_sample, work)
        return 0
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker[0], int(args.worker[1]), work)), flush=True)
        return 0
    names = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; expected some of {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    for variant in names:  # the samples first, so that parallel trainings find them written
        subprocess.run([sys.executable, __file__, "--write-sample", variant, "--work", str(work)], check=True)
    jobs = [(v, s) for v in names for s in seeds]
    threads = 1 if args.jobs > 1 else None
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        records = list(pool.map(lambda job: _run_worker(job[0], job[1], work, threads), jobs))
    for r in records:
        if "failed" in r:
            print(f"{r['variant']} seed {r['seed']}: failed\n{r['failed']}", file=sys.stderr)
        else:
            print(f"{r['variant']} seed {r['seed']}: mean {r['mean']:.4f}, Bald {r['accuracy']['Bald']:.4f} "
                  f"(majority {r['majority']['Bald']:.4f}); not learned: {', '.join(r['not_learned']) or 'none'}",
                  file=sys.stderr)  # fmt: skip
    from mtlue_fast.machine import cpu_bf16_flags, cpu_model, versions

    model = cpu_model()
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")
    out = Path(args.out) if args.out else RESULTS / f"celeba-sample-variants-{slug}-{time.strftime('%Y-%m-%d')}.json"
    record = {
        "benchmark": "clean models on variants of the synthetic CelebA sample (bench/celeba_sample_variants.py)",
        "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": model, "cpu_bf16_flags": cpu_bf16_flags(),
        "threads": threads or "default", "learned_margin": LEARNED_MARGIN,
        "variants": {v: VARIANTS[v][0] for v in names}, "versions": versions(), "results": records,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return 1 if any("failed" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
