"""The paper's CelebA job at full size, timed stage by stage and extrapolated to the whole job.

    python bench/paper_scale.py --out bench/results/paper-scale-<device>-<date>.json
    python bench/paper_scale.py --set train.compile=true --set generate.compile=true   # a variant
    python bench/paper_scale.py --cpu        # tiny sizes, a minute or two on 2 cores ("cpu-smoke")

The job is ``python -m mtlue_fast.run --dataset celeba --data-root ...`` with ``configs/celeba.yaml``
at the paper's settings (not its ``synthetic:`` overrides): 162,770 training and 19,962 test images
cached at 3x70x70 from the 178x218 JPEGs, 40 binary attributes, random crop 64 + flip, ResNet-18 at
width 1.0, batch 512, a 60-epoch clean surrogate, the TAP generator at width 1.0 for
``--generator-passes`` passes, the export, a clean and a protected victim of 60 epochs each, and a
test evaluation after every epoch (``train.eval_every``) of the three trainings.

Each stage runs the package's own code on synthetic data of the real sizes (random uint8 arrays in
memory; for the cache build, ``--cache-images`` real 178x218 JPEGs written once to a temporary
folder) for ``--steps`` steps after ``--warmup`` untimed ones, the device synchronised around the
timed region, and its full-job time is extrapolated from the measured rate:

- ``cache_build``: :func:`mtlue_fast.data.build_cache` with the decoder ``data.decoder`` resolves
  to (on a GPU: DALI's mixed decoder, else torchvision's nvJPEG), both splits' images;
- ``surrogate``, ``victim_clean``, ``victim_protected``: ``build_training`` / ``make_batches`` and
  the training step (:class:`~mtlue_fast.train.TrainStep`, a CUDA graph where ``auto`` picks it),
  plus each epoch's writes (``metrics.jsonl``, ``last.pt``) and schedule step; the two victims are
  one measurement (``victims`` of the config) counted twice;
- ``generator``: :class:`~mtlue_fast.ue.generate.GeneratorStep` set up as ``generate`` does, plus
  each pass's stop test and ``last.pt``;
- ``export``: :func:`~mtlue_fast.ue.export.export_generator` from the saved generator, written to disk;
- ``evaluation``: :func:`~mtlue_fast.train.evaluate` over the test split, as often as the three
  trainings evaluate.

A stage's ``full_job_seconds`` is ``images / images_per_second`` (the steady rate) plus what the
measurement shows the job pays besides: ``setup_seconds`` per instance (building the objects,
uploading the resident data, cuDNN's first calls, the CUDA-graph capture: the warm-up's time beyond
its share of steady work) and the per-epoch (per-pass) writes and stop tests. The top-level
``full_job_seconds`` is the sum of the stages'. Process start-up, imports and CUDA's initialisation
are not counted. The targets on one H200 are printed beside the figures, never asserted.

With ``--out`` the JSON is written after every stage with ``"complete": false`` (the stages so far,
no totals, no verdicts) and once more, complete, at the end: a run stopped partway keeps what it
measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests): bench/ for device_check
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_check.targets import PAPER_SCALE as TARGETS  # noqa: E402 - the thresholds, judged here

from mtlue_fast import config as config_module
from mtlue_fast import machine, ops
from mtlue_fast.fileio import atomic_path
from mtlue_fast.data import build_cache
from mtlue_fast.data.cache import Cache, resolve_decoder
from mtlue_fast.data.loader import DeviceBatches
from mtlue_fast.data.specs import get_spec
from mtlue_fast.models import build_model
from mtlue_fast.train import build_training, evaluate, make_batches, select_tasks
from mtlue_fast.train import checkpoint
from mtlue_fast.train import victim as victim_module
from mtlue_fast.train.graphed import GraphedStep, graph_status
from mtlue_fast.ue import generate as generate_module
from mtlue_fast.ue.export import export_generator
from mtlue_fast.ue.generate import (
    GeneratorStep, build_generator, generator_args, load_generator, make_generator_optimizer, prepare_surrogate, stop_test,
)  # fmt: skip
from mtlue_fast.ue.objectives import Objective

DATASET = "celeba"
TRAIN_IMAGES, TEST_IMAGES = 162_770, 19_962  # partition 0 and 2 of list_eval_partition.txt
SOURCE_SIZE = (218, 178)  # img_align_celeba: 178 wide, 218 high
GENERATOR_PASSES = 15
STAGES = ("cache_build", "surrogate", "generator", "export", "victim_clean", "victim_protected", "evaluation")

PAPER_RUN = {"steps": 50, "warmup": 6, "cache_images": 2048}  # warm-up: a CUDA graph captures on the 4th call
CPU_SMOKE_RUN = {"steps": 2, "warmup": 1, "cache_images": 16, "train_images": 96, "test_images": 32, "cache_chunk": 8}
#: ``--cpu``: the paper's config made tiny (applied before ``--set``).
CPU_SMOKE_CONFIG = {
    "data": {"cache_size": [32, 32]},
    "train": {"width": 0.125, "batch_size": 16},
    "generate": {"width": 0.125, "stride": 8, "batch_size": 16, "stop_subset": 32},
}


# ---------------------------------------------------------------------------- arguments and config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/paper_scale.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", help="write the JSON here (default: print it)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available (--cpu: cpu)")
    p.add_argument("--cpu", action="store_true", help="tiny sizes (scale 'cpu-smoke'): checks the script, not the job")
    p.add_argument("--steps", type=int, help=f"timed steps per stage (default {PAPER_RUN['steps']}; --cpu {CPU_SMOKE_RUN['steps']})")
    p.add_argument("--warmup", type=int, help=f"untimed steps first (default {PAPER_RUN['warmup']}; --cpu {CPU_SMOKE_RUN['warmup']})")
    p.add_argument("--cache-images", type=int, help=f"JPEGs the cache build decodes (default {PAPER_RUN['cache_images']})")
    p.add_argument("--generator-passes", type=int, help=f"generator passes of the job (default generate.max_passes, else {GENERATOR_PASSES})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config field, as for python -m mtlue_fast.run (e.g. train.compile=true)")
    p.add_argument("--workdir", help="folder for the temporary files (JPEGs, caches, checkpoints, the export)")
    args = p.parse_args(argv)
    args.command = ["bench/paper_scale.py", *(sys.argv[1:] if argv is None else argv)]
    for name in ("steps", "warmup", "cache_images", "generator_passes"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} must be >= {0 if name == 'warmup' else 1}, got {value}")
    return args


def resolve_config(args: argparse.Namespace) -> config_module.RunConfig:
    """``configs/celeba.yaml`` at the paper's settings (``--cpu``: made tiny), then ``--set``."""
    overrides = json.loads(json.dumps(CPU_SMOKE_CONFIG)) if args.cpu else {}
    overrides = config_module.merge(overrides, {"train": {"progress": False}, "generate": {"progress": False}})
    cfg = config_module.resolve(DATASET, synthetic=False, overrides=overrides, assignments=args.set)
    if cfg.generate.base == "em":
        raise SystemExit("error: generate.base=em trains its surrogate between passes; this script times TAP and SEP")
    if cfg.victim != "mtl" or cfg.method != "mtlue":
        raise SystemExit("error: this script times the MTL-UE job with multi-task victims (method=mtlue, victim=mtl)")
    return cfg


#: The settings that make the job the paper's: a run whose ``--set`` changes any is no longer
#: compared with the targets (``paper_settings_changed`` lists them).
PAPER_KEYS = {
    "data": ("cache_size", "crop"),
    "train": ("backbone", "width", "batch_size", "epochs", "eval_every", "weighting"),
    "victims": ("backbone", "weighting", "width", "epochs", "seeds"),
    "generate": ("base", "width", "batch_size", "embed_dim", "stride", "stop_subset", "max_passes"),
}


def changed_paper_settings(cfg: config_module.RunConfig) -> list[str]:
    """The :data:`PAPER_KEYS` on which ``cfg`` differs from ``configs/celeba.yaml``."""
    paper = config_module.resolve(DATASET, synthetic=False).to_dict()
    mine = cfg.to_dict()
    return [f"{section}.{key}" for section, keys in PAPER_KEYS.items() for key in keys if mine[section][key] != paper[section][key]]


# ---------------------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def endless(batches: DeviceBatches) -> Iterator:
    """The batches of epoch 0, 1, ... (the epoch's order and augmentation each time)."""
    epoch = 0
    while True:
        batches.set_epoch(epoch)
        yield from batches
        epoch += 1


def measure(step: Callable[[], int], warmup: int, steps: int, device: torch.device) -> dict:
    """Run ``step`` (returns the images it processed) ``warmup`` then ``steps`` times; the timed
    region is bracketed by device synchronisations (and the kernels' pending-error check, which a
    training epoch runs once at its end)."""
    started = time.perf_counter()
    warm_images = sum(step() for _ in range(warmup))
    sync(device)
    begin = time.perf_counter()
    images = sum(step() for _ in range(steps))
    sync(device)
    ops.raise_pending_errors(device)
    seconds = time.perf_counter() - begin
    return {"images": images, "seconds": seconds, "warmup_images": warm_images, "warmup_seconds": begin - started}


def stage(rate_run: dict, *, full_images: int, setup_seconds: float, instances: int = 1, periods: int = 0,
          period_seconds: float = 0.0, steps: int, batch_size: int, peak_bytes: int | None, **extra) -> dict:  # fmt: skip
    """One stage's record: ``full_job_seconds = instances * setup + full_images / rate + periods * period_seconds``."""
    rate = rate_run["images"] / max(rate_run["seconds"], 1e-12)
    compute = full_images / rate
    total = instances * setup_seconds + compute + periods * period_seconds
    return {
        "images_per_second": rate, "full_job_seconds": total, "steps_timed": steps, "batch_size": batch_size,
        "images_timed": rate_run["images"], "seconds_timed": rate_run["seconds"], "full_job_images": full_images,
        "compute_seconds": compute, "setup_seconds": setup_seconds, "instances": instances,
        "periods": periods, "seconds_per_period": period_seconds, "peak_gpu_memory_bytes": peak_bytes, **extra,
    }  # fmt: skip


def setup_beyond_work(started: float, run: dict) -> float:
    """Seconds from ``started`` to the end of the warm-up, less the warm-up's steady-state work."""
    rate = run["images"] / max(run["seconds"], 1e-12)
    return max(0.0, run["setup_and_warmup_seconds"] - run["warmup_images"] / rate)


# ---------------------------------------------------------------------------- data


def synthetic_cache(path: Path, n: int, size: tuple[int, int], seed: int) -> Cache:
    """A cache of ``n`` random uint8 ``[3, H, W]`` images and 40 binary labels (in memory)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, *size), dtype=np.uint8)
    labels = (rng.random((n, 40)) < 0.3).astype(np.int64)
    manifest = {"dataset": DATASET, "split": "train", "source_digest": f"paper-scale-{seed}-{n}-{size[0]}x{size[1]}"}
    return Cache(path, images, labels, [f"attr{k:02d}" for k in range(40)], [2] * 40, manifest)


def head(cache: Cache, n: int, tag: str) -> Cache:
    """The first ``n`` rows of ``cache`` as a cache of their own (its own digest)."""
    manifest = {**cache.manifest, "source_digest": f"{cache.manifest['source_digest']}-{tag}-{n}"}
    return Cache(cache.path, cache.images[:n], cache.labels[:n], cache.task_names, cache.num_classes, manifest)


def write_celeba_jpegs(root: Path, n: int, seed: int = 0, quality: int = 90) -> list[str]:
    """``n`` photograph-like 178x218 JPEGs in CelebA's layout (every image in the training split)."""
    from PIL import Image

    folder = root / "img_align_celeba"
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    names = [f"{i:06d}.jpg" for i in range(1, n + 1)]

    def save(item: tuple[str, np.ndarray]) -> None:
        Image.fromarray(item[1]).save(folder / item[0], quality=quality)

    with ThreadPoolExecutor(max_workers=8) as pool:
        for start in range(0, n, 256):
            count = min(256, n - start)
            coarse = torch.rand((count, 3, SOURCE_SIZE[0] // 16 + 2, SOURCE_SIZE[1] // 16 + 2), generator=gen)
            fine = torch.nn.functional.interpolate(coarse, size=SOURCE_SIZE, mode="bicubic", align_corners=False)
            pixels = (fine * 200 + 20 + 6 * torch.randn(fine.shape, generator=gen)).clamp(0, 255).to(torch.uint8)
            list(pool.map(save, zip(names[start : start + count], pixels.permute(0, 2, 3, 1).numpy())))
    rows = [f"{name} " + " ".join("1" if (i + k) % 3 == 0 else "-1" for k in range(40)) for i, name in enumerate(names)]
    (root / "list_attr_celeba.txt").write_text("\n".join([str(n), " ".join(f"attr{k:02d}" for k in range(40)), *rows, ""]))
    (root / "list_eval_partition.txt").write_text("".join(f"{name} 0\n" for name in names))
    return [str(folder / name) for name in names]


# ---------------------------------------------------------------------------- stages


def time_cache_build(cfg, work: Path, n: int, chunk: int, warm: int, device: torch.device) -> dict:
    """``build_cache`` over ``n`` JPEGs with the configured decoder, its set-up (a DALI pipeline,
    nvJPEG's state) done first on ``warm`` files."""
    root = work / "jpegs"
    paths = write_celeba_jpegs(root, n)
    size = tuple(cfg.data.cache_size) if cfg.data.cache_size else None
    resize = get_spec(DATASET).resize if size is None else replace(get_spec(DATASET).resize, size=size)
    reset_peak(device)
    started = time.perf_counter()
    decoder = resolve_decoder(cfg.data.decoder)
    decoder.decode(paths[: max(1, min(warm, n))], resize)
    sync(device)
    set_up = time.perf_counter() - started
    begin = time.perf_counter()
    cache = build_cache(DATASET, root, "train", work / "cache", size=size, decoder=decoder, chunk_size=chunk, progress=False)
    sync(device)
    seconds = time.perf_counter() - begin
    if len(cache) != n:
        raise RuntimeError(f"cache build: {n - len(cache)} of {n} synthetic JPEGs did not decode ({cache.manifest.get('summary')})")
    run = {"images": n, "seconds": seconds}
    setup = max(0.0, set_up - min(warm, n) * seconds / n)  # the warm-up decode's own work is not set-up
    return stage(run, full_images=TRAIN_IMAGES + TEST_IMAGES, setup_seconds=setup, steps=math.ceil(n / chunk),
                 batch_size=chunk, peak_bytes=peak(device), decoder=decoder.name, source_size=list(SOURCE_SIZE),
                 resolution=list(resize.size))  # fmt: skip


def _train_step(step, stream: Iterator, device: torch.device, sums: list) -> int:
    """One step as ``train_epoch`` takes it (a host-side batch copied first; losses kept on the device)."""
    images, labels = next(stream)
    if images.device != device:  # train.host_augment: batches made on the host
        images, labels = images.to(device), labels.to(device)
    losses = step(images, labels)
    sums[0] = losses if sums[0] is None else sums[0] + losses
    return images.shape[0]


def time_training(view, test_view, config, device: torch.device, steps: int, warmup: int, out: Path,
                  evaluate_too: bool) -> tuple[dict, dict | None]:  # fmt: skip
    """A training's steps, its per-epoch writes and (``evaluate_too``) a test evaluation:
    ``(training run, evaluation run or None)``."""
    reset_peak(device)
    started = time.perf_counter()
    parts = build_training(view, config, device)
    batches = make_batches(view, config, device, train=True, dataset=DATASET)
    parts.step.model.train()
    stream, sums = endless(batches), [None]
    run = measure(lambda: _train_step(parts.step, stream, device, sums), warmup, steps, device)
    run["setup_and_warmup_seconds"] = time.perf_counter() - started - run["seconds"]
    run["setup"] = setup_beyond_work(started, run)
    run["peak"] = peak(device)
    run["graph"] = graph_status(parts.step)
    run["steps_per_epoch"] = len(batches)
    # What train() does after every epoch besides the steps: the weighting's and the schedule's
    # epoch step, then rank 0's writes (metrics.jsonl, last.pt; kept weights every keep_every).
    out.mkdir(parents=True, exist_ok=True)
    record = {"epoch": 1, "train_loss": (sums[0] / steps).tolist(), "lr": config.lr, "images_per_second": 0.0, "seconds": 0.0}
    sync(device)
    begin = time.perf_counter()
    parts.strategy.epoch_end()
    parts.scheduler.step()
    victim_module._save_epoch(out, [record], parts.model, parts.strategy, parts.optimizer, parts.scheduler, parts.step,
                              parts.model_args, "paper-scale", 0, config)  # fmt: skip
    sync(device)
    run["epoch_seconds"] = time.perf_counter() - begin
    evaluation = None
    if evaluate_too:
        evaluation = time_evaluation(parts, test_view, config, device, steps)
    del parts, batches, stream
    release(device)
    return run, evaluation


def time_evaluation(parts, test_view, config, device: torch.device, steps: int) -> dict:
    """Whole test-split evaluations (the unit the job repeats), after one untimed one."""
    reset_peak(device)
    switches = config.resolved(device)
    metrics = victim_module.make_metrics(test_view, config, DATASET, device)
    batches = make_batches(test_view, config, device, train=False, dataset=DATASET)
    step = parts.step

    def once() -> int:
        evaluate(parts.model, batches, metrics, amp=switches["amp"], channels_last=switches["channels_last"],
                 encode=step.encode, decode=step.decode, mark_steps=step.mark_steps)  # fmt: skip
        return batches.num_samples

    started = time.perf_counter()
    calls = max(1, math.ceil(steps / len(batches)))
    run = measure(once, 1, calls, device)
    run["setup_and_warmup_seconds"] = time.perf_counter() - started - run["seconds"]
    run["setup"] = setup_beyond_work(started, run)
    run["steps"] = calls * len(batches)
    run["peak"] = peak(device)
    return run


def time_generator(cfg, cache: Cache, device: torch.device, steps: int, warmup: int, out: Path) -> tuple[dict, Path]:
    """The generator step set up as ``generate`` sets it up, its per-pass stop test and ``last.pt``;
    returns the run and the saved ``generator.pt`` (what the export loads)."""
    config = cfg.generate.replace(crop=tuple(cfg.data.crop) if cfg.data.crop else cfg.generate.crop)
    view = select_tasks(cache, None, config.crop)
    crop = view.crop
    args = generator_args(view, config)
    amp = generate_module._use_amp(config, device)
    reset_peak(device)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    generator = build_generator(**args).to(device)
    channels_last = config.use_channels_last(device.type)
    if channels_last:
        generator = generator.to(memory_format=torch.channels_last)
    count = 1 if config.base == "tap" else len(range(cfg.sep_every, cfg.train.epochs + 1, cfg.sep_every))
    surrogate_args = victim_module.model_args(view, cfg.train)
    models = [build_model(**surrogate_args).to(device).eval().requires_grad_(False) for _ in range(count)]
    models = [prepare_surrogate(m, channels_last, config.use_surrogate_bf16(device.type, amp)) for m in models]
    objective = Objective(config.base, view.num_classes, targeted=config.targeted, protected=generator.protected_tasks, dense=False)
    graphed = config.use_cuda_graph(device.type, False)
    optimizer = make_generator_optimizer(generator, config, capturable=graphed)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(config.milestones), config.gamma)
    batches = DeviceBatches(view.images, view.labels, config.batch_size, device, train=False, shuffle=True,
                            seed=config.seed, drop_last=len(view.images) >= config.batch_size)  # fmt: skip
    generator.check_label_values(np.asarray(view.labels))
    step = GeneratorStep(generator, objective, models, optimizer, config, crop, amp)
    if graphed:
        step = GraphedStep(step, label="generator step")
    generator.train()
    stream, sums = endless(batches), [None]
    run = measure(lambda: _train_step(step, stream, device, sums), warmup, steps, device)
    run["setup_and_warmup_seconds"] = time.perf_counter() - started - run["seconds"]
    run["setup"] = setup_beyond_work(started, run)
    run["steps_per_pass"] = len(batches)
    run["surrogates"] = count
    run["graph"] = graph_status(step)
    # After every pass: the schedule, the stop test on its fixed subset, the regularisers' values, last.pt.
    subset = np.random.default_rng([config.seed, 7]).permutation(len(view.images))[: config.stop_subset]
    stop_test(generator, models, objective, view, subset, config, crop, device, amp)  # warm-up: eval-mode kernels
    sync(device)
    begin = time.perf_counter()
    scheduler.step()
    error = stop_test(generator, models, objective, view, subset, config, crop, device, amp)
    with torch.no_grad():
        intra, inter = ops.embedding_reg(generator.embedding_table().float(), generator.task_offsets)
    out.mkdir(parents=True, exist_ok=True)
    history = [{"pass": 1, "loss": float(sums[0] / steps), "stop_error": error, "intra": float(intra), "inter": float(inter)}]
    checkpoint.save(out / "last.pt", {"digest": "paper-scale", "passes": 1, "history": history, "generator": generator.state_dict(),
                                      "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                      "rng": checkpoint.rng_state(device)})  # fmt: skip
    sync(device)
    run["pass_seconds"] = time.perf_counter() - begin
    run["stop_subset"] = len(subset)
    run["peak"] = peak(device)
    saved = out / "generator.pt"  # as generate() leaves it; the export stage loads it
    checkpoint.save(saved, {"generator": {k: v.detach().cpu() for k, v in generator.state_dict().items()},
                            "generator_args": args, "passes": 1})  # fmt: skip
    del step, generator, models, optimizer, batches, stream
    release(device)
    return run, saved


def time_export(generator_file: Path, cache: Cache, device: torch.device, steps: int, warmup: int, out: Path) -> dict:
    """``export_generator`` from the saved generator, as ``run`` calls it: ``warmup`` batches into
    one folder (untimed), then ``steps`` batches into another."""
    batch = export_batch_size()
    reset_peak(device)
    started = time.perf_counter()
    generator = load_generator(generator_file, device)
    if warmup:
        export_generator(generator, head(cache, warmup * batch, "warm"), out / "warm", device=device,
                         settings={"warm": True}, progress=False)  # fmt: skip
    sync(device)
    setup_and_warmup = time.perf_counter() - started
    n = min(steps * batch, len(cache.images))
    begin = time.perf_counter()
    export_generator(generator, head(cache, n, "timed"), out / "timed", device=device, settings={"timed": True}, progress=False)
    sync(device)
    run = {"images": n, "seconds": time.perf_counter() - begin, "warmup_images": warmup * batch if warmup else 0,
           "setup_and_warmup_seconds": setup_and_warmup}  # fmt: skip
    run["setup"] = setup_beyond_work(started, run)
    run["steps"] = math.ceil(n / batch)
    run["peak"] = peak(device)
    del generator
    release(device)
    return run


def export_batch_size() -> int:
    """The batch ``run`` exports with: ``export_generator``'s default."""
    import inspect

    return int(inspect.signature(export_generator).parameters["batch_size"].default)


def evaluations(config) -> int:
    """How many test evaluations one training of ``config`` runs (every ``eval_every`` epochs and the last)."""
    return sum(1 for e in range(config.epochs) if (e + 1) % config.eval_every == 0 or e + 1 == config.epochs)


def samples_per_epoch(n: int, batch_size: int) -> int:
    """Training images per epoch of ``n`` (``drop_last`` when ``n`` fills a batch)."""
    return n - n % batch_size if n >= batch_size else n


# ---------------------------------------------------------------------------- the job


def run(args: argparse.Namespace, on_stage: Callable[[dict], None] | None = None) -> dict:
    """Time every stage; return the result (see the module docstring). ``on_stage`` is given the
    result so far (``complete`` false, ``full_job_seconds`` None) after each stage, so that a run
    stopped or failed partway still leaves what it measured."""
    cfg = resolve_config(args)
    smoke = args.cpu
    defaults = CPU_SMOKE_RUN if smoke else PAPER_RUN
    steps = args.steps or defaults["steps"]
    warmup = defaults["warmup"] if args.warmup is None else args.warmup
    cache_images = args.cache_images or defaults["cache_images"]
    device = torch.device(args.device or ("cpu" if smoke or not torch.cuda.is_available() else "cuda"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda, but torch.cuda.is_available() is False")
        torch.cuda.init()
        torch.zeros(1, device=device)  # the context exists before anything is timed
    passes = args.generator_passes or cfg.generate.max_passes or GENERATOR_PASSES
    size = tuple(cfg.data.cache_size) if cfg.data.cache_size else get_spec(DATASET).resize.size
    victim_cfg = cfg.victim_train(cfg.victim_seeds()[0])
    surrogate_cfg = cfg.train.replace(keep_every=cfg.sep_every if cfg.generate.base == "sep" else 0)
    export_batch = export_batch_size()
    biggest = max(surrogate_cfg.batch_size, victim_cfg.batch_size, cfg.generate.batch_size)
    if smoke:
        train_n = max(defaults["train_images"], biggest * (steps + warmup), export_batch * (steps + warmup))
        test_n = defaults["test_images"]
    else:
        train_n, test_n = TRAIN_IMAGES, TEST_IMAGES
    chunk = defaults.get("cache_chunk", 1024)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    progress = lambda text: print(f"paper_scale: {text}", file=sys.stderr, flush=True)  # noqa: E731

    stages: dict[str, dict] = {}
    context = dict(args=args, cfg=cfg, device=device, smoke=smoke, passes=passes, surrogate_cfg=surrogate_cfg,
                   victim_cfg=victim_cfg, size=size, started=started, train_n=train_n, test_n=test_n,
                   cache_images=cache_images, chunk=chunk, steps=steps, warmup=warmup, export_batch=export_batch)  # fmt: skip

    def result(complete: bool) -> dict:
        return _result_so_far(stages=stages, complete=complete, **context)

    def report() -> None:
        if on_stage is not None:
            on_stage(result(complete=False))

    with tempfile.TemporaryDirectory(prefix="paper-scale-", dir=args.workdir) as tmp:
        work = Path(tmp)

        progress(f"cache build: {cache_images} JPEGs of {SOURCE_SIZE[1]}x{SOURCE_SIZE[0]} -> {size[0]}x{size[1]}")
        stages["cache_build"] = time_cache_build(cfg, work, cache_images, chunk, min(64, cache_images), device)
        report()

        progress(f"synthetic caches: {train_n} + {test_n} images of 3x{size[0]}x{size[1]}")
        train_cache = synthetic_cache(work / "train", train_n, size, seed=1)
        test_cache = synthetic_cache(work / "test", test_n, size, seed=2)
        crop = tuple(cfg.data.crop) if cfg.data.crop else None
        view, test_view = select_tasks(train_cache, None, crop), select_tasks(test_cache, None, crop)
        context["crop"] = view.crop

        progress(f"surrogate: {steps} steps of {surrogate_cfg.batch_size}")
        sur, _ = time_training(view, test_view, surrogate_cfg, device, steps, warmup, work / "surrogate", evaluate_too=False)
        epoch_images = samples_per_epoch(TRAIN_IMAGES, surrogate_cfg.batch_size)
        stages["surrogate"] = stage(sur, full_images=surrogate_cfg.epochs * epoch_images, setup_seconds=sur["setup"],
                                    periods=surrogate_cfg.epochs, period_seconds=sur["epoch_seconds"], steps=steps,
                                    batch_size=surrogate_cfg.batch_size, peak_bytes=sur["peak"], epochs=surrogate_cfg.epochs,
                                    cuda_graph=sur["graph"])  # fmt: skip
        report()

        progress(f"victim: {steps} steps of {victim_cfg.batch_size}, then the test evaluation")
        vic, ev = time_training(view, test_view, victim_cfg, device, steps, warmup, work / "victim", evaluate_too=True)
        epoch_images = samples_per_epoch(TRAIN_IMAGES, victim_cfg.batch_size)
        for name in ("victim_clean", "victim_protected"):
            stages[name] = stage(vic, full_images=victim_cfg.epochs * epoch_images, setup_seconds=vic["setup"],
                                 periods=victim_cfg.epochs, period_seconds=vic["epoch_seconds"], steps=steps,
                                 batch_size=victim_cfg.batch_size, peak_bytes=vic["peak"], epochs=victim_cfg.epochs,
                                 measured_as="victim", cuda_graph=vic["graph"])  # fmt: skip
        evals = evaluations(surrogate_cfg) + 2 * evaluations(victim_cfg)
        stages["evaluation"] = stage(ev, full_images=evals * TEST_IMAGES, setup_seconds=ev["setup"], instances=3,
                                     steps=ev["steps"], batch_size=victim_cfg.batch_size, peak_bytes=ev["peak"],
                                     evaluations=evals, measured_as="victim")  # fmt: skip
        report()

        progress(f"generator ({cfg.generate.base}): {steps} steps of {cfg.generate.batch_size}")
        gen, generator_file = time_generator(cfg, train_cache, device, steps, warmup, work / "generator")
        pass_images = samples_per_epoch(TRAIN_IMAGES, cfg.generate.batch_size)
        stages["generator"] = stage(gen, full_images=passes * pass_images, setup_seconds=gen["setup"], periods=passes,
                                    period_seconds=gen["pass_seconds"], steps=steps, batch_size=cfg.generate.batch_size,
                                    peak_bytes=gen["peak"], passes=passes, surrogates=gen["surrogates"],
                                    stop_subset=gen["stop_subset"], cuda_graph=gen["graph"])  # fmt: skip
        report()

        progress(f"export: {steps} batches of {export_batch}")
        exp = time_export(generator_file, train_cache, device, steps, warmup, work / "export")
        stages["export"] = stage(exp, full_images=TRAIN_IMAGES, setup_seconds=exp["setup"], steps=exp["steps"],
                                 batch_size=export_batch, peak_bytes=exp["peak"])  # fmt: skip

    return result(complete=True)


def _result_so_far(*, stages: dict, complete: bool, **context) -> dict:
    """The result from the stages measured so far; the totals and the targets only when ``complete``."""
    args, cfg, device, smoke, passes = context["args"], context["cfg"], context["device"], context["smoke"], context["passes"]
    peaks = [s["peak_gpu_memory_bytes"] for s in stages.values() if s["peak_gpu_memory_bytes"] is not None]
    stages = {name: stages[name] for name in STAGES if name in stages}
    total = sum(s["full_job_seconds"] for s in stages.values()) if complete else None
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine.cpu_model()
    rate = lambda name: stages[name]["images_per_second"] if name in stages else None  # noqa: E731
    measured = {"full_job_seconds": total, "victim_images_per_second": rate("victim_clean"),
                "generator_images_per_second": rate("generator")}  # fmt: skip
    changed = changed_paper_settings(cfg)
    paper = not smoke and not changed and passes == GENERATOR_PASSES
    targets = {
        name: {"target": target, "measured": measured[name],
               "met": None if not paper or measured[name] is None else
                      measured[name] <= target if name == "full_job_seconds" else measured[name] >= target}
        for name, target in TARGETS.items()
    }  # fmt: skip
    surrogate_cfg, victim_cfg, size = context["surrogate_cfg"], context["victim_cfg"], context["size"]
    return {
        "scale": "cpu-smoke" if smoke else "paper",
        "complete": complete,
        "stages_measured": ",".join(stages),
        "paper_settings_changed": changed,
        "full_job_seconds": total,
        "full_job_minutes": None if total is None else total / 60,
        "victim_images_per_second": measured["victim_images_per_second"],
        "generator_images_per_second": measured["generator_images_per_second"],
        "device": device_name,
        "device_type": device.type,
        "peak_gpu_memory_bytes": max(peaks) if peaks else None,
        "date": context["started"],
        "command": " ".join(getattr(args, "command", [])),
        "git_revision": machine.git_revision(),
        "versions": {**machine.versions(), "platform": platform.platform()},
        "stages": stages,
        "targets": targets,
        "settings": {
            "dataset": DATASET, "train_images": TRAIN_IMAGES, "test_images": TEST_IMAGES,
            "images_in_memory": {"train": context["train_n"], "test": context["test_n"]}, "cache_resolution": list(size),
            "crop": list(context["crop"]) if context.get("crop") else None, "source_jpeg_size": [SOURCE_SIZE[1], SOURCE_SIZE[0]],
            "cache_images": context["cache_images"], "cache_chunk": context["chunk"], "steps": context["steps"],
            "warmup": context["warmup"], "generator_passes": passes, "export_batch_size": context["export_batch"],
            "set": list(args.set), "train": surrogate_cfg.to_dict(),
            "victims": victim_cfg.to_dict(), "generate": cfg.generate.to_dict(), "decoder": cfg.data.decoder,
            "train_switches": surrogate_cfg.resolved(device), "victim_switches": victim_cfg.resolved(device),
        },  # fmt: skip
        "notes": [
            "victim_clean and victim_protected are one measurement (the victims' config) counted twice",
            "evaluation is measured with the victim's model and counted for the surrogate and both victims",
            f"generator passes: {passes} (the job's TAP generator stops on its error threshold; this count is assumed)",
        ],
    }


def summary(result: dict) -> str:
    """The figures as a table, the targets beside them."""
    changed = f" with {', '.join(result['paper_settings_changed'])} changed" if result["paper_settings_changed"] else ""
    lines = [f"{result['scale']}{changed} on {result['device']} ({result['device_type']}), {result['date']}", "",
             f"{'stage':18s} {'images/s':>12s} {'steps':>6s} {'setup s':>8s} {'full job s':>11s} {'share':>6s}"]  # fmt: skip
    total = result["full_job_seconds"]
    for name, s in result["stages"].items():
        lines.append(f"{name:18s} {s['images_per_second']:12,.0f} {s['steps_timed']:6d} {s['setup_seconds']:8.2f} "
                     f"{s['full_job_seconds']:11.1f} {s['full_job_seconds'] / total:6.1%}")  # fmt: skip
    lines.append(f"{'total':18s} {'':12s} {'':6s} {'':8s} {total:11.1f}  ({total / 60:.1f} min)")
    if result["peak_gpu_memory_bytes"] is not None:
        lines.append(f"peak GPU memory: {result['peak_gpu_memory_bytes'] / 2**30:.2f} GiB")
    lines.append("")
    for name, t in result["targets"].items():
        verdict = {True: "met", False: "not met", None: "not comparable: not the paper's settings"}[t["met"]]
        lines.append(f"target {name}: {t['target']:,.0f}; measured {t['measured']:,.1f} ({verdict})")
    return "\n".join(lines)


def _write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out else None
    # With --out the JSON is rewritten after every stage ("complete": false until the last), so a
    # run stopped at a time limit or failing in a late stage keeps the stages it measured.
    result = run(args, on_stage=(lambda partial: _write(out, partial)) if out else None)
    print(summary(result), file=sys.stderr, flush=True)
    if out:
        _write(out, result)
        print(f"paper_scale: wrote {out}", file=sys.stderr)
    else:
        print(json.dumps(result, indent=2, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
