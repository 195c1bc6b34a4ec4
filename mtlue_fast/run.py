"""``python -m mtlue_fast.run``: protect a multi-task dataset and prove it, in one command.

Stages (``--stages``, default all), each writing into the run directory ``OUT``:

- ``prepare``: the uint8 caches of the training and test splits (the built-in synthetic sample of
  the dataset's format when no ``--data-root`` is given, written under ``OUT/synthetic``);
- ``surrogate``: a clean training run with the victim's recipe (``OUT/surrogate``; SEP keeps its
  checkpoints). Its clean-test metrics are the clean victim's when the settings match;
- ``generate``: the MTL-UE generator (``OUT/generator``), or sample-wise EM state for ``--method pgd``;
- ``export``: ``OUT/protected`` (``train_images.npy`` uint8, ``train_labels.npy``, ``delta.npy`` int8);
- ``victim``: victims trained on the clean and the protected training set (``OUT/victim/*``);
- ``report``: ``OUT/report.json``, ``OUT/report.md``, ``OUT/figures/``.

Every stage records a digest of its inputs in ``OUT/stages.json``; rerunning the same command skips
finished stages, an interrupted one resumes where it stopped, and a changed setting reruns the stages
that depend on it. See ``--help`` for the flags and ``mtlue_fast.config`` for the configuration.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import config as config_module
from . import dist
from .config import DEFENSES, METHODS, STAGES, ConfigError, RunConfig
from .data.records import DatasetFormatError
from .data.specs import DATASETS
from .fileio import read_json, write_json
from .train import checkpoint

BANNER = "=" * 78


class UserError(Exception):
    """A problem with what the user asked for; printed as one line, exit status 2."""


# ---------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from .models import BACKBONES
    from .mtl.weighting import STRATEGIES

    parser = argparse.ArgumentParser(
        prog="python -m mtlue_fast.run",
        description="Make a multi-task image dataset unlearnable (MTL-UE) and measure the effect.",
    )
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--data-root", help="the dataset in its original layout (absent: a built-in synthetic sample)")
    parser.add_argument("--out", help="run directory (default runs/<dataset>-<base>-<timestamp>)")
    parser.add_argument("--config", help="YAML config (default configs/<dataset>.yaml)")
    parser.add_argument("--preset", default="default", help="'default' or 'smoke' (the whole pipeline in about a minute on a CPU)")
    parser.add_argument("--overlay", action="append", default=[], metavar="NAME_OR_FILE",
                        help="config overlay: a YAML file or a name in configs/overlays (e.g. base-sep, backbone-vit_b_16)")
    parser.add_argument("--base", choices=("tap", "em", "sep"), help="base UE objective (default tap)")
    parser.add_argument("--method", choices=METHODS, help="mtlue or a baseline: pgd (sample-wise), ar, random")
    parser.add_argument("--backbone", choices=BACKBONES)
    parser.add_argument("--weighting", choices=tuple(STRATEGIES))
    parser.add_argument("--victim", choices=("mtl", "stl"))
    parser.add_argument("--eps", type=float, help="perturbation budget in 1/255 units (default 8)")
    parser.add_argument("--epochs", type=int, help="victim and surrogate epochs")
    parser.add_argument("--batch-size", type=int, help="victim and surrogate batch size")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)} (default all)")
    parser.add_argument("--protect-tasks", help="comma-separated task names or indices to protect (default all)")
    parser.add_argument("--defense", choices=DEFENSES, help="victim-side defence on the protected data")
    parser.add_argument("--export-images", action="store_true", help="also write protected image files in the original layout")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config field, e.g. train.lr=0.002")
    parser.add_argument("--resume", action="store_true", help="continue in an OUT holding a run with other settings, keeping what still matches")
    parser.add_argument("--force", action="store_true", help="redo every stage in an OUT holding another run")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The dedicated flags as a config overlay."""
    out: dict = {}

    def put(path: str, value) -> None:
        if value is None:
            return
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    put("generate.base", args.base)
    put("method", args.method)
    put("train.backbone", args.backbone)
    put("train.weighting", args.weighting)
    put("victim", args.victim)
    put("generate.eps", args.eps / 255 if args.eps is not None else None)
    put("train.epochs", args.epochs)
    put("train.batch_size", args.batch_size)
    put("device", args.device)
    if args.seed is not None:
        put("train.seed", args.seed)
        put("generate.seed", args.seed)
        put("data.synthetic_seed", args.seed)
    if args.protect_tasks:
        tasks = [int(t) if t.strip().isdigit() else t.strip() for t in args.protect_tasks.split(",") if t.strip()]
        put("generate.protect", tasks)
    put("defense", args.defense)
    if args.export_images:
        put("export_images", True)
    if args.quiet:
        put("train.progress", False)
        put("generate.progress", False)
    return out


def parse_stages(text: str | None) -> list[str]:
    if not text:
        return list(STAGES)
    stages = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise UserError(f"unknown stage {unknown[0] if unknown else text!r}; expected any of {', '.join(STAGES)}")
    return [s for s in STAGES if s in stages]


def resolve_device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA GPU is available to this torch")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# ---------------------------------------------------------------------------- the run


class Run:
    """One run directory and its stages."""

    def __init__(self, cfg: RunConfig, out: Path, data_root: str | None, device, log: Callable[[str], None]):
        self.cfg, self.out, self.data_root, self.device, self.log = cfg, out, data_root, device, log
        self.synthetic = data_root is None
        self.stages_path = out / "stages.json"
        self.records = read_json(self.stages_path) or {}
        self.train_cache = self.test_cache = None
        self.surrogate_result = None
        self.protected = None
        self.results: dict = {}

    # -- bookkeeping

    def digest(self, stage: str) -> str:
        cfg = self.cfg.to_dict()
        caches = [c.manifest.get("source_digest") for c in (self.train_cache, self.test_cache) if c is not None]
        parts = {"data": [cfg["dataset"], cfg["data"], self.data_root, caches]}
        parts["surrogate"] = parts["data"] + [cfg["train"], cfg["sep_every"], cfg["generate"]["base"]]
        parts["generate"] = parts["surrogate"] + [cfg["generate"], cfg["method"]]
        parts["export"] = parts["generate"] + [cfg["export_images"]]
        parts["victim"] = parts["export"] + [cfg["victim"], cfg["defense"]]
        parts["report"] = parts["victim"]
        return checkpoint.digest(parts.get(stage, parts["data"]))

    def record(self, stage: str, seconds: float, **extra) -> None:
        self.records[stage] = {"digest": self.digest(stage), "seconds": round(seconds, 3), **extra}
        if dist.info().is_main:
            write_json(self.stages_path, self.records)

    def stage_dir(self, stage: str, name: str | None = None) -> Path:
        """``OUT/<name>``, emptied first when it holds this package's output for other inputs."""
        path = self.out / (name or stage)
        previous = self.records.get(stage, {}).get("digest")
        if previous is not None and previous != self.digest(stage) and path.exists():
            self.log(f"{stage}: settings changed since the last run, redoing it")
            if dist.info().is_main:
                shutil.rmtree(path)
            dist.barrier()
        return path

    # -- stages

    def prepare(self) -> None:
        from .data import build_cache
        from .data import synthetic as synthetic_data

        data = self.cfg.data
        root = self.data_root
        if self.synthetic:
            root = str(self.out / "synthetic" / self.cfg.dataset)
            if not Path(root).exists() and dist.info().is_main:
                self.log(
                    f"{BANNER}\nNo --data-root given: using the BUILT-IN SYNTHETIC {self.cfg.dataset} sample "
                    f"({data.synthetic_train} train / {data.synthetic_test} test images), written in the dataset's\n"
                    f"original format to {root}. Numbers from it show the method works; they are not results on real data.\n{BANNER}"
                )
                synthetic_data.write(self.cfg.dataset, root, data.synthetic_train, data.synthetic_test,
                                     data.synthetic_seed, data.synthetic_size)
        elif not Path(root).is_dir():
            raise UserError(f"--data-root {root} does not exist or is not a directory")
        dist.barrier()  # the synthetic sample exists for every rank
        cache_dir = self.out / "cache" if self.synthetic else None
        main = dist.info().is_main
        kwargs = {"size": tuple(data.cache_size) if data.cache_size else None, "decoder": data.decoder,
                  "progress": self.cfg.train.progress and main}
        for turn in ("main", "others"):  # rank 0 builds the caches once; the others then open them
            if (turn == "main") == main:
                self.train_cache = build_cache(self.cfg.dataset, root, "train", cache_dir, **kwargs)
                self.test_cache = build_cache(self.cfg.dataset, root, "test", cache_dir, **kwargs)
            dist.barrier()
        self.data_path = root

    def _crop(self):
        return tuple(self.cfg.data.crop) if self.cfg.data.crop else None

    def surrogate(self):
        from .train import train

        needs = self.cfg.generate.base in ("tap", "sep") and self.cfg.method in ("mtlue", "pgd")
        train_cfg = self.cfg.train.replace(keep_every=self.cfg.sep_every if self.cfg.generate.base == "sep" else 0)
        if not needs and "victim" not in self.requested:
            return None
        path = self.stage_dir("surrogate")
        self.surrogate_result = train(self.train_cache, self.test_cache, path, train_cfg, device=self.device,
                                      crop=self._crop(), label="surrogate (clean)")
        return self.surrogate_result

    def _surrogates(self):
        """TAP: the clean model; SEP: its kept checkpoints; EM: a fresh network."""
        from .models import build_model
        from .train import load_model
        from .train.victim import model_args
        from .train.tasks import select_tasks

        base = self.cfg.generate.base
        if base == "em":
            import torch

            torch.manual_seed(self.cfg.train.seed)
            return build_model(**model_args(select_tasks(self.train_cache, None, self._crop()), self.cfg.train))
        if self.surrogate_result is None:
            self.surrogate()
        if base == "tap":
            return self.surrogate_result.load_model(self.device)
        kept = sorted(self.surrogate_result.out_dir.glob("epoch_*.pt"))
        if not kept:
            raise UserError("SEP needs checkpoints of the clean surrogate: set sep_every <= train.epochs")
        return [load_model(p, self.device) for p in kept]

    def generate(self):
        cfg = self.cfg
        path = self.stage_dir("generate", "generator")
        if cfg.method == "mtlue":
            from .ue.generate import generate

            gen_cfg = cfg.generate.replace(crop=self._crop() or cfg.generate.crop)
            result = generate(self.train_cache, path, gen_cfg, surrogates=self._surrogates(), device=self.device)
            self.results["generator"] = {"passes": result.passes, "stopped": result.stopped,
                                         "last": result.history[-1] if result.history else None}
        elif cfg.method == "pgd" and cfg.generate.base == "em":
            from .ue.pgd import em_pgd

            if dist.info().is_main:  # the sample-wise baseline runs in one process
                em_pgd(self.train_cache, path, self._surrogates(), eps=cfg.generate.eps, device=self.device,
                       batch_size=cfg.generate.batch_size, progress=cfg.generate.progress)
            dist.barrier()

    def export(self):
        from .ue.export import write_image_files, write_protected

        cfg = self.cfg
        path = self.stage_dir("export", "protected")
        eps = cfg.generate.eps
        settings = {"digest": self.digest("generate")}
        progress = cfg.generate.progress
        if cfg.method == "mtlue":
            from .ue.generate import export_generator, load_generator

            generator = load_generator(self.out / "generator" / "generator.pt", self.device)
            protected = export_generator(generator, self.train_cache, path, device=self.device, settings=settings, progress=progress)
        else:  # the baselines export from one process
            if dist.info().is_main:
                perturb = self._baseline_perturb()
                write_protected(self.train_cache, path, perturb, method=f"{cfg.method}-{cfg.generate.base}",
                                eps=eps, device=self.device, batch_size=min(cfg.generate.batch_size, 256),
                                settings=settings, progress=progress)
            dist.barrier()
            from .data import open_cache

            protected = open_cache(path)
        if dist.info().is_main:
            link_contract_names(protected.path, {"images.npy": "train_images.npy", "labels.npy": "train_labels.npy"})
            if cfg.export_images:
                write_image_files(protected, self.data_path, path / "images")
        dist.barrier()
        self.protected = protected
        return protected

    def _baseline_perturb(self):
        from .train.tasks import select_tasks
        from .ue import baselines
        from .ue.objectives import Objective

        cfg = self.cfg
        view = select_tasks(self.train_cache, None, self._crop())
        if cfg.method == "random":
            return baselines.uniform_noise(cfg.generate.eps, cfg.generate.seed)
        if cfg.method == "ar":
            return baselines.ar_patches(view.num_classes, tuple(view.images.shape[-2:]), view.channels,
                                        cfg.generate.eps, cfg.generate.seed)
        if cfg.generate.base == "em":
            from .ue.pgd import em_pgd

            return em_pgd(self.train_cache, self.out / "generator", self._surrogates(), eps=cfg.generate.eps,
                          device=self.device, batch_size=cfg.generate.batch_size, progress=cfg.generate.progress)
        from .ue.pgd import pgd_perturb

        objective = Objective(cfg.generate.base, view.num_classes, targeted=cfg.generate.targeted)
        return pgd_perturb(self._surrogates(), objective, eps=cfg.generate.eps, crop=view.crop)

    def victim(self):
        from .data import open_cache
        from .train import train, train_stl

        cfg = self.cfg
        protected = self.protected or open_cache(self.out / "protected")
        base = self.stage_dir("victim")
        train_cfg = cfg.train.replace(keep_every=0)
        if cfg.defense in ("augment", "adv"):
            protected_cfg = train_cfg.replace(defense=cfg.defense, defense_eps=cfg.generate.eps)
        else:
            protected_cfg = train_cfg
        if cfg.defense in ("jpeg", "bdr", "grayscale"):
            from .defenses import defend_cache

            if dist.info().is_main:
                defend_cache(cfg.defense, protected, base / f"defended-{cfg.defense}")
            dist.barrier()
            protected = defend_cache(cfg.defense, protected, base / f"defended-{cfg.defense}")  # complete: opened
        runs = {}
        if cfg.victim == "stl":
            runs["clean"] = train_stl(self.train_cache, self.test_cache, base / "clean", train_cfg, device=self.device, crop=self._crop())
            runs["protected"] = train_stl(protected, self.test_cache, base / "protected", protected_cfg, device=self.device, crop=self._crop())
            self.results["victims"] = {k: {"metrics": v, "images_per_second": None} for k, v in runs.items()}
            return
        if self.surrogate_result is not None:  # same recipe by construction (keep_every only saves more)
            self.log("victim (clean): the clean surrogate was trained with the victim's recipe; reusing its result")
            clean = self.surrogate_result
        else:
            clean = train(self.train_cache, self.test_cache, base / "clean", train_cfg, device=self.device,
                          crop=self._crop(), label="victim (clean)")
        prot = train(protected, self.test_cache, base / "protected", protected_cfg, device=self.device,
                     crop=self._crop(), label="victim (protected)")
        self.results["victims"] = {
            "clean": {"metrics": clean.metrics, "images_per_second": clean.images_per_second},
            "protected": {"metrics": prot.metrics, "images_per_second": prot.images_per_second},
        }

    def report(self) -> dict:
        from . import report as report_module
        from .data import open_cache

        cfg = self.cfg
        victims = self.results.get("victims") or self._stored_victims()
        protected = self.protected or open_cache(self.out / "protected")
        names = list(protected.task_names)
        dense = isinstance(protected.labels, dict)
        clean_m, prot_m = victims["clean"]["metrics"], victims["protected"]["metrics"]
        metric = _metric_name(clean_m, dense)
        clean_dir = self.out / "clean"
        link_contract_names(self.train_cache.path, {"images.npy": "train_images.npy", "labels.npy": "train_labels.npy"}, clean_dir)
        stats = report_module.perturbation_stats(self.train_cache.images, protected.images, self.train_cache.labels,
                                                 names, list(protected.num_classes))
        timings = {k: v.get("seconds") for k, v in self.records.items()}
        throughput = {k: v.get("images_per_second") for k, v in self.records.items() if v.get("images_per_second")}
        report = report_module.build_report(
            dataset=cfg.dataset, synthetic=self.synthetic, data_root=self.data_root, tasks=names, metric=metric,
            clean=_summary(clean_m, names, dense), protected=_summary(prot_m, names, dense),
            clean_cache=str(clean_dir), eps=cfg.generate.eps, base=cfg.generate.base, method=cfg.method,
            backbone=cfg.train.backbone, weighting=cfg.train.weighting, victim=cfg.victim, timings=timings,
            throughput=throughput, versions=report_module.versions(), git=report_module.git_revision(),
            perturbation_stats=stats,
        )  # fmt: skip
        if cfg.defense != "none":
            report["defense"] = cfg.defense
        report_module.write_report(self.out, report, clean_images=self.train_cache.images, protected_images=protected.images)
        return report

    def _stored_victims(self) -> dict:
        stored = read_json(self.out / "victims.json")
        if stored is None:
            raise UserError(f"the report needs the victim stage's results; run with --stages victim,report ({self.out})")
        return stored


def _metric_name(metrics: dict, dense: bool):
    if dense:
        return {"segmentation": "miou", "depth": "depth_abs_error", "normal": "normal_angle_mean"}
    return "auc" if "mean_auc" in metrics else "accuracy"


def _summary(metrics: dict, names: list[str], dense: bool) -> dict:
    """``{"mean": float, "per_task": {name: float}}`` from a victim's metrics (STL summaries too)."""
    if dense:
        per_task = {"segmentation": metrics.get("miou"), "depth": metrics.get("depth_abs_error"), "normal": metrics.get("normal_angle_mean")}
        return {"mean": metrics.get("primary"), "per_task": {k: v for k, v in per_task.items() if k in names}}
    key = "auc" if "mean_auc" in metrics else "accuracy"
    values = metrics.get(key) or []
    return {"mean": metrics.get(f"mean_{key}"), "per_task": {n: v for n, v in zip(names, values)}}


def link_contract_names(folder: Path, names: dict[str, str], target: Path | None = None) -> None:
    """Expose ``folder/<a>`` as ``target/<b>`` (the report contract's file names) by hard link, or a
    symbolic link across file systems; never copies the data."""
    target = target or folder
    target.mkdir(parents=True, exist_ok=True)
    for source, alias in names.items():
        src, dst = Path(folder) / source, target / alias
        if not src.exists() or dst.exists():
            continue
        try:
            os.link(src, dst)
        except OSError:
            os.symlink(src.resolve(), dst)


# ---------------------------------------------------------------------------- main


def default_out(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.dataset}-{cfg.generate.base}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_out_dir(out: Path, resolved: str, resume: bool, force: bool, log) -> None:
    """Refuse an OUT holding another run unless --resume / --force; never touch foreign folders."""
    if not out.exists():
        return
    stored = out / "config.yaml"
    if not stored.exists():
        if any(out.iterdir()):
            raise UserError(f"--out {out} is a non-empty folder that is not an mtlue_fast run; choose another")
        return
    if stored.read_text() == resolved:
        return
    if force:
        log(f"--force: redoing every stage in {out}")
        for name in ("surrogate", "generator", "protected", "victim", "clean", "figures", "cache", "synthetic"):
            path = out / name
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.exists():
                shutil.rmtree(path)
        for name in ("stages.json", "victims.json", "report.json", "report.md"):
            (out / name).unlink(missing_ok=True)
        return
    if not resume:
        raise UserError(
            f"--out {out} holds a run with other settings (see {stored}); pass --resume to keep the stages "
            "that still match and redo the rest, or --force to redo everything"
        )


def run(args: argparse.Namespace) -> int:
    log = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
    stages = parse_stages(args.stages)
    synthetic = args.data_root is None
    cfg = config_module.resolve(
        args.dataset, config_file=args.config, synthetic=synthetic, preset=args.preset,
        overlays=args.overlay, overrides=overrides_from_args(args), assignments=args.set,
    )  # fmt: skip
    device = resolve_device(cfg.device)
    place = dist.setup(device.type)
    if device.type == "cuda" and place.distributed:
        import torch

        device = torch.device("cuda", place.local_rank)
    if not place.is_main:
        log = lambda text: None  # noqa: E731 - only rank 0 talks
    out = Path(args.out) if args.out else default_out(cfg)
    if place.distributed and not args.out:
        out = Path(dist.broadcast_object(str(out)))  # one timestamp for every rank
    resolved = config_module.dump(cfg)
    if place.is_main:
        check_out_dir(out, resolved, args.resume, args.force, log)
        out.mkdir(parents=True, exist_ok=True)
        from .fileio import atomic_path

        with atomic_path(out / "config.yaml") as tmp:
            tmp.write_text(resolved)
    dist.barrier()
    data_root = str(Path(args.data_root).resolve()) if args.data_root else None
    runner = Run(cfg, out, data_root, device, log)
    runner.requested = stages
    log(f"mtlue_fast.run: {cfg.dataset}, method {cfg.method} ({cfg.generate.base}), device {device}, out {out}")
    started = time.perf_counter()
    # prepare always runs (it is cheap when the caches exist): every later stage reads them.
    t = time.perf_counter()
    runner.prepare()
    runner.record("prepare", time.perf_counter() - t)
    order = [("surrogate", runner.surrogate), ("generate", runner.generate), ("export", runner.export),
             ("victim", runner.victim)]  # fmt: skip
    for name, stage in order:
        if name not in stages:
            continue
        t = time.perf_counter()
        result = stage()
        extra = {}
        if name == "surrogate" and result is not None:
            extra["images_per_second"] = result.images_per_second
        if name == "victim":
            if place.is_main:
                write_json(out / "victims.json", runner.results["victims"])
            ips = runner.results["victims"]["protected"].get("images_per_second")
            if ips:
                extra["images_per_second"] = ips
        runner.record(name, time.perf_counter() - t, **extra)
    if "report" in stages and place.is_main:
        t = time.perf_counter()
        report = runner.report()
        runner.record("report", time.perf_counter() - t)
        from .report import summary_table

        print(summary_table(report))
        print(f"\nreport: {out / 'report.md'} ({time.perf_counter() - started:.0f} s)")
    dist.barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # argparse printed its message
        return int(exit_.code or 0)
    try:
        return run(args)
    except (UserError, ConfigError, DatasetFormatError, ValueError) as err:
        if dist.info().distributed:
            print(f"rank {dist.info().rank}: ", end="", file=sys.stderr)
        # The package's ValueErrors name the argument, file or field and what was expected.
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno == errno.ENOSPC:
            print(f"error: no space left on device while writing {err.filename or 'the run directory'}", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("\ninterrupted: rerun the same command to resume from the last finished step", file=sys.stderr)
        return 130
    finally:
        dist.teardown()


if __name__ == "__main__":
    sys.exit(main())
