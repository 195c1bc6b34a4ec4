"""The round trip through the published files: does the protection survive publication?

    python bench/publish_roundtrip.py --dataset chestxray
    python bench/publish_roundtrip.py --dataset chestxray --set data.synthetic_size=[128,128] --tag 2x
    python bench/publish_roundtrip.py --dataset celeba --victim-seeds 6 --upsample nearest,inverse

Runs ``python -m mtlue_fast.run --dataset D`` (the victims train on the protected cache), then, on
a copy of that run folder per carry-back mode (``--export-upsample``), the same with
``--victim-data files --export-images --resume``: the surrogate, generator and protected cache are
reused, the protected dataset is published as image files at the original resolution
(``OUT/protected/images``) and the protected victims train on a cache that the ordinary reader
builds from those files, as an unauthorised user of the published dataset would. All runs share
the victim seeds, so the clean victims are the same and the per-seed difference of the drops is
what publication costs the protection (reported with its standard error over the seeds).

Also measured, without training, on ``--fidelity-rows`` training images of the finished run:
how much of the working-resolution perturbation the cache's decoder (Pillow's geometry) gives back
from an image composed at the original resolution, with the perturbation carried back by nearest
neighbour (the export's default), by the inverse of the cache's resize (``--export-upsample
inverse``), or bilinearly: ``delta_correlation`` and ``amplitude_ratio`` (mean |recovered| / mean
|delta|) per mode.

Writes ``bench/results/publish-roundtrip-<dataset>[-<tag>]-<cpu-slug>-<date>.json`` (or ``--out``)
with the commands, wall times, both reports' drops and means, the published files' check, the
marker file's bound and geometry, the CPU model (``lscpu``) and the versions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    found = re.search(r"^Model name:\s*(.+)$", text, re.M)
    return found.group(1).strip() if found else "unknown"


def slug(model: str) -> str:
    lowered = model.lower()
    if "epyc" in lowered:
        return "amd-epyc"
    if "xeon" in lowered:
        return "intel-xeon"
    return re.sub(r"[^a-z0-9]+", "-", lowered).strip("-")[:24] or "cpu"


def run(command: list[str]) -> float:
    print("$", " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - started


def summary(report: dict) -> dict:
    keys = ("drop", "drop_std", "victim_data", "published", "subset", "metric", "versions", "git")
    out = {key: report.get(key) for key in keys}
    out["clean_mean"] = (report.get("clean") or {}).get("mean")
    out["protected_mean"] = (report.get("protected") or {}).get("mean")
    out["victims"] = [{k: v.get(k) for k in ("seed", "drop", "clean", "protected")} for v in report.get("victims", [])]
    return out


def paired(files: dict, cache: dict) -> dict:
    """Per victim seed, the files' drop minus the cache's: mean, standard deviation and the
    standard error of the mean over the seeds both runs have."""
    by_seed = {v["seed"]: v["drop"] for v in cache["victims"] if v.get("drop") is not None}
    diffs = [v["drop"] - by_seed[v["seed"]] for v in files["victims"] if v.get("drop") is not None and v["seed"] in by_seed]
    if not diffs:
        return {"seeds": 0}
    values = np.asarray(diffs, dtype=np.float64)
    std = float(values.std(ddof=1)) if len(values) > 1 else None
    return {"seeds": len(values), "per_seed": [round(float(d), 6) for d in values], "mean": float(values.mean()),
            "std": std, "standard_error": std / len(values) ** 0.5 if std is not None else None}


def _fidelity(run_dir: Path, rows: int) -> dict:
    """Recovered perturbation per upsampling mode (see the module docstring)."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from mtlue_fast.data import open_cache
    from mtlue_fast.data.decode import center_box
    from mtlue_fast.ue.export import generator_perturb, label_rows
    from mtlue_fast.ue.generate import load_generator
    from mtlue_fast.ue.publish import carry_back, decode_original, upsample_nearest

    protected = open_cache(run_dir / "protected")
    clean_path = Path(protected.manifest["clean_path"])
    clean = open_cache(clean_path)
    root = Path(clean.manifest["root"])
    crop = clean.manifest.get("center_crop")
    height, width = clean.images.shape[-2:]
    channels = clean.images.shape[1]
    perturb = generator_perturb(load_generator(run_dir / "generator" / "generator.pt"))
    n = min(rows, len(clean))
    images = torch.from_numpy(np.array(clean.images[:n]))
    labels = label_rows(clean.labels, 0, n, torch.device("cpu"))  # NYUv2: a dict of dense maps
    delta = perturb(images, labels, torch.arange(n)).numpy()
    results = {}
    eps = float(protected.manifest["eps"])
    for mode in ("nearest", "inverse", "bilinear"):
        recovered, working = [], []
        for i, rel in enumerate(clean.manifest["row_files"][:n]):
            original = decode_original(root / rel, channels)
            _, big_h, big_w = original.shape
            if crop:
                left, top, _, _ = center_box(big_w, big_h, tuple(crop))
                ch, cw = crop
            else:
                left = top = 0
                ch, cw = big_h, big_w
            if mode == "nearest":
                up = upsample_nearest(delta[i], (ch, cw))
            elif mode == "inverse":
                up = carry_back(delta[i], (ch, cw), eps, "inverse")
            else:
                up = F.interpolate(torch.from_numpy(delta[i][None]), size=(ch, cw), mode="bilinear",
                                   align_corners=False)[0].numpy()  # fmt: skip
            window = original[:, top : top + ch, left : left + cw].astype(np.float32)
            composed = original.copy()
            composed[:, top : top + ch, left : left + cw] = np.clip(np.rint(window + 255 * up), 0, 255).astype(np.uint8)

            def cached(array: np.ndarray) -> np.ndarray:  # the cache decoder's geometry (PIL path)
                image = Image.fromarray(array[0] if channels == 1 else array.transpose(1, 2, 0))
                if crop:
                    image = image.crop((left, top, left + cw, top + ch))
                if image.size != (width, height):
                    image = image.resize((width, height), Image.BILINEAR)
                out = np.asarray(image, dtype=np.float32)
                return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)

            recovered.append((cached(composed) - cached(original)) / 255.0)
            working.append(delta[i])
        r, w = np.stack(recovered).ravel(), np.stack(working).ravel()
        results[mode] = {
            "delta_correlation": float(np.corrcoef(r, w)[0, 1]),
            "amplitude_ratio": float(np.abs(r).mean() / np.abs(w).mean()),
            "mean_abs_recovered_levels": float(255 * np.abs(r).mean()),
        }
    results["rows"] = n
    results["mean_abs_delta_levels"] = float(255 * np.abs(delta).mean())
    return results


def anonymised(record: dict, run_dir: Path) -> dict:
    """The record with the run directory written ``OUT`` and the cache root ``$MTLUE_CACHE``."""
    from mtlue_fast.data import default_cache_root

    text = json.dumps(record)
    for path, name in ((str(run_dir), "OUT"), (str(default_cache_root()), "$MTLUE_CACHE")):
        text = text.replace(path, name)
    return json.loads(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="chestxray")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="passed to both runs")
    parser.add_argument("--tag", help="name part for a variant (e.g. 2x)")
    parser.add_argument("--work", default="runs/publish-roundtrip", help="folder of the run directory")
    parser.add_argument("--out", help="result file (default bench/results/publish-roundtrip-...json)")
    parser.add_argument("--victim-seeds", type=int, default=1, help="victim pairs per run (seeds 1..N)")
    parser.add_argument("--upsample", default="nearest", help="comma-separated carry-back modes to publish with (nearest, inverse)")
    parser.add_argument("--fidelity-rows", type=int, default=256)
    parser.add_argument("--reuse", action="store_true", help="keep a finished run in --work (pass --resume to the first run)")
    args = parser.parse_args(argv)

    modes = [m.strip() for m in args.upsample.split(",") if m.strip()]
    work = Path(args.work) / (args.dataset + (f"-{args.tag}" if args.tag else ""))
    if work.exists() and not args.reuse:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    sets = [item for assignment in args.set for item in ("--set", assignment)]
    base = [sys.executable, "-m", "mtlue_fast.run", "--dataset", args.dataset, "--victim-seeds", str(args.victim_seeds), *sets]
    first = base + ["--out", str(work / "run")] + (["--resume"] if args.reuse else [])
    seconds = {"cache": run(first)}
    cache_report = json.loads((work / "run" / "report.json").read_text())
    cache = summary(cache_report)
    files, markers, commands = {}, {}, {"cache": "python " + " ".join(first[1:])}
    for mode in modes:  # each mode on its own copy: a new export replaces the victims of the previous one
        folder = work / f"run-files-{mode}"
        if not (args.reuse and folder.exists()):
            if folder.exists():
                shutil.rmtree(folder)
            shutil.copytree(work / "run", folder, symlinks=True)
        second = base + ["--out", str(folder), "--victim-data", "files", "--export-images", "--export-upsample", mode, "--resume"]
        commands[f"files_{mode}"] = "python " + " ".join(second[1:]).replace(str(folder), "OUT")
        seconds[f"files_{mode}"] = run(second)
        files[mode] = summary(json.loads((folder / "report.json").read_text()))
        marker = json.loads((folder / "protected" / "images" / "mtlue_protected.json").read_text())
        markers[mode] = {k: marker.get(k) for k in ("resolution", "upsample", "geometry", "eps_levels", "max_abs_diff_levels",
                                                    "splits", "omitted", "delta_source", "image_format")}  # fmt: skip
    model = cpu_model()
    record = {
        "benchmark": "drop of the protected victims trained on the protected cache vs on the published files "
                     "read back by the ordinary reader (same surrogate, generator and victim seeds), per carry-back mode",
        "dataset": args.dataset, "synthetic": cache_report.get("synthetic"),
        "cpu": model, "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
        "commands": commands,
        "environment": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "MTLUE_CACHE": os.environ.get("MTLUE_CACHE")},
        "wall_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "cache": cache, "files": files,
        "drop_difference_files_minus_cache": {mode: paired(files[mode], cache) for mode in modes},
        "marker": markers,
        "fidelity": _fidelity(work / "run", args.fidelity_rows),
        "versions": cache_report.get("versions"), "git": cache_report.get("git"),
    }  # fmt: skip
    record = anonymised(record, work / "run")
    name = f"publish-roundtrip-{args.dataset}" + (f"-{args.tag}" if args.tag else "")
    out = Path(args.out) if args.out else RESULTS / f"{name}-{slug(model)}-{record['date']}.json"
    out.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    print(json.dumps({k: record[k] for k in ("drop_difference_files_minus_cache", "fidelity")}, indent=1))
    print(f"cache drop {cache['drop']:.4f}; files drop " + ", ".join(f"{m} {files[m]['drop']:.4f}" for m in modes) + f"; written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
