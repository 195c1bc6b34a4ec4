"""``python -m mtlue_fast.run``: protect a multi-task dataset and prove it, in one command.

Stages (``--stages``, default all), each writing into the run directory ``OUT``:

- ``prepare``: the uint8 caches of the training and test splits, shared by every run under the
  cache root (``$MTLUE_CACHE``, default ``~/.cache/mtlue_fast``); without ``--data-root`` the built-in
  synthetic sample of the dataset's format is written there once too;
- ``surrogate``: the clean model the generator attacks (``OUT/surrogate``; SEP keeps its checkpoints),
  trained with ``train`` (its seed, backbone and weighting are the surrogate's);
- ``generate``: the MTL-UE generator (``OUT/generator``), or sample-wise EM state for ``--method pgd``;
- ``export``: ``OUT/protected`` (``train_images.npy`` uint8, ``train_labels.npy``, ``delta.npy`` int8);
  with ``--export-images`` also ``OUT/protected/images``, the protected dataset published as files in
  its original layout (by default every image at its original size, the test split copied unchanged);
- ``victim``: for each victim seed (never the surrogate's) a clean and a protected victim that share
  that seed, so their difference isolates the data (``OUT/victim/<recipe>/seed-<s>/{clean,protected}``,
  one folder per victim recipe: a victims-only change adds one, see :mod:`mtlue_fast.victim_cells`); the
  victims' recipe (backbone, weighting, MTL/STL, defence) is separate from the surrogate's; with
  ``--victim-data files`` the protected victims train on the published files read back by the
  ordinary reader (the round trip an unauthorised user of the published dataset makes);
- ``report``: ``OUT/report.json`` (its ``cells``: every victim recipe trained on this export),
  ``OUT/report.md``, ``OUT/figures/``.

Every stage records a digest of its inputs in ``OUT/stages.json``; rerunning the same command skips
finished stages (and says so), an interrupted one resumes where it stopped, and a changed setting
reruns the stages that depend on it. The default ``OUT`` is named by the settings that decide the
protected data, so the same command always finds its own run. See ``--help`` for the flags and ``mtlue_fast.config`` for the configuration.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import startup_interrupt  # noqa: F401 - before torch: Ctrl-C while it loads prints one line

import torch
import yaml

from . import config as config_module
from . import dist
from . import report as report_module
from . import victim_cells
from .report.stats import published_check
from .cli import USER_ERRORS, UserError, resolve_device, run_command
from .config import DEFENSES, METHODS, STAGES, RunConfig
from .data import build_cache, default_cache_root, open_cache
from .data import synthetic as synthetic_data
from .data.specs import DATASETS
from .defenses import defend_cache
from .fileio import atomic_path, read_json, write_json
from .models import BACKBONES, build_model
from .mtl.weighting import STRATEGIES
from .train import checkpoint, load_model, side_by_side, train, train_stl
from .train.tasks import select_tasks
from .train.victim import model_args, reserve_deterministic_cublas
from .ue import baselines
from .ue.export import export_generator, generator_perturb, write_protected
from .ue.generate import generate, load_generator
from .ue.objectives import Objective
from .ue.pgd import em_pgd, pgd_perturb
from .ue.publish import write_image_files

BANNER = "=" * 78
#: Defences that transform the training images before training (both victims get the defended data).
DATA_DEFENSES = ("jpeg", "bdr", "grayscale")


EXAMPLES = """examples:
  python -m mtlue_fast.run --dataset chestxray
      the whole job on the built-in synthetic ChestX-ray14 sample (minutes on 2 CPU cores)
  python -m mtlue_fast.run --dataset celeba --data-root /data/celeba --device cuda --victim-seeds 3
      the paper's CelebA setting on a GPU, with three independent victim pairs
  python -m mtlue_fast.run --dataset chestxray --weighting pcgrad --resume
      new victims only (another weighting); the surrogate, generator and export are reused
  python -m mtlue_fast.run --dataset chestxray --victim-data files --export-images --resume
      publish the protected dataset (OUT/protected/images, original sizes) and train the victims on the files read back
  python -m mtlue_fast.run --dataset utkface --defense jpeg
      victims trained on JPEG-compressed copies: what the protection still costs a defended victim
  python -m mtlue_fast.run --dataset chestxray --preset smoke --stages prepare,surrogate
      a quick check of the plumbing, first stages only
  torchrun --nproc-per-node 8 -m mtlue_fast.run --dataset celeba --data-root /data/celeba --device cuda
      every training stage data-parallel over 8 GPUs

Every stage's output is kept in --out; rerunning a command skips what is finished.
Settings: configs/<dataset>.yaml, --overlay, --set key=value (see docs/method.md for each default).
"""


# ---------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mtlue_fast.run",
        description="Make a multi-task image dataset unlearnable (MTL-UE) and measure the effect.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--data-root", help="the dataset in its original layout (absent: a built-in synthetic sample)")
    parser.add_argument("--out", help="run directory (default runs/<dataset>-<method>-<base>-<digest of the protection settings>)")
    parser.add_argument("--config", help="YAML config (default configs/<dataset>.yaml)")
    parser.add_argument("--preset", default="default", help="'default' or 'smoke' (the whole pipeline in about a minute on a CPU)")
    parser.add_argument("--overlay", action="append", default=[], metavar="NAME_OR_FILE",
                        help="config overlay: a YAML file or a name in configs/overlays (e.g. base-sep, backbone-vit_b_16)")
    parser.add_argument("--base", choices=("tap", "em", "sep"), help="base UE objective (default tap)")
    parser.add_argument("--method", choices=METHODS, help="mtlue or a baseline: pgd (sample-wise), ar, random")
    parser.add_argument("--backbone", choices=BACKBONES, help="the victims' backbone (the surrogate keeps the config's)")
    parser.add_argument("--weighting", choices=tuple(STRATEGIES), help="the victims' task weighting (the surrogate keeps the config's)")
    parser.add_argument("--surrogate-backbone", choices=BACKBONES, help="the surrogate's backbone (train.backbone)")
    parser.add_argument("--surrogate-weighting", choices=tuple(STRATEGIES), help="the surrogate's task weighting (train.weighting)")
    parser.add_argument("--victim", choices=("mtl", "stl"), help="victims: one multi-task network, or one network per task")
    parser.add_argument("--victim-seeds", type=int, metavar="N", help="clean/protected victim pairs, each with a seed of its own (default 1)")
    parser.add_argument("--reuse-surrogate-as-clean", action="store_true",
                        help="report the clean surrogate as every clean victim instead of training clean victims (flattering)")
    parser.add_argument("--eps", type=float, help="perturbation budget in 1/255 units (default 8)")
    parser.add_argument("--epochs", type=int, help="surrogate and victim epochs")
    parser.add_argument("--batch-size", type=int, help="surrogate and victim batch size")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, help="the surrogate's, the generator's and the synthetic sample's seed (victims: seed + 1, ...)")
    parser.add_argument("--stages", help=f"comma-separated subset of {','.join(STAGES)} (default all)")
    parser.add_argument("--protect-tasks", help="comma-separated task names or indices to protect (default all)")
    parser.add_argument("--defense", choices=DEFENSES, help="victim-side defence; both victims (clean and protected) train with it")
    parser.add_argument("--export-images", action="store_true",
                        help="also publish the protected dataset as image files in its original layout (OUT/protected/images)")
    parser.add_argument("--export-resolution", choices=("original", "working"),
                        help="original (default): every image of both splits at its original size, the training images "
                             "protected, the test images copied; working: the training images at the cache's resolution")
    parser.add_argument("--export-upsample", choices=("nearest", "inverse"),
                        help="how the perturbation is carried back to the original size: nearest (default) or inverse "
                             "(corrected so that the cache's resize gives it back; slower)")
    parser.add_argument("--victim-data", choices=("cache", "files"),
                        help="what the protected victims train on: the protected cache (default), or a cache the ordinary "
                             "reader builds from the published image files (needs --export-images)")
    parser.add_argument("--subset", type=int, metavar="N", help="a seeded, stratified subset of N training images (data.subset)")
    parser.add_argument("--subset-test", type=int, metavar="M", help="a seeded, stratified subset of M test images (data.subset_test)")
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
    put("victims.backbone", args.backbone)
    put("victims.weighting", args.weighting)
    put("train.backbone", args.surrogate_backbone)
    put("train.weighting", args.surrogate_weighting)
    put("victim", args.victim)
    put("victims.seeds", args.victim_seeds)
    if args.reuse_surrogate_as_clean:
        put("victims.reuse_surrogate", True)
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
    put("export_resolution", args.export_resolution)
    put("export_upsample", args.export_upsample)
    put("victims.data", args.victim_data)
    put("data.subset", args.subset)
    put("data.subset_test", args.subset_test)
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


# ---------------------------------------------------------------------------- the run


class Run:
    """One run directory and its stages."""

    def __init__(self, cfg: RunConfig, out: Path, data_root: str | None, device: torch.device, log: Callable[[str], None]):
        self.cfg, self.out, self.data_root, self.device, self.log = cfg, out, data_root, device, log
        self.synthetic = data_root is None
        self.stages_path = out / "stages.json"
        self.records = read_json(self.stages_path) or {}
        self.train_cache = self.test_cache = None
        self.surrogate_result = None
        self.protected = None
        self.results: dict = {}
        self.requested: list[str] = list(STAGES)

    # -- bookkeeping

    def digest(self, stage: str) -> str:
        """A digest of everything ``stage``'s output depends on (its own settings and its inputs')."""
        cfg = self.cfg.identity()
        caches = [c.manifest.get("source_digest") for c in (self.train_cache, self.test_cache) if c is not None]
        parts = {"data": [cfg["dataset"], cfg["data"], self.data_root, caches]}
        parts["surrogate"] = parts["data"] + [cfg["train"], cfg["sep_every"], cfg["generate"]["base"]]
        parts["generate"] = parts["surrogate"] + [cfg["generate"], cfg["method"]]
        parts["export"] = parts["generate"] + [cfg["export_images"]] + (self._image_settings(cfg) if cfg["export_images"] else [])
        parts["victim"] = parts["export"] + [cfg["victim"], cfg["defense"], cfg["victims"]]
        parts["report"] = parts["victim"]
        return checkpoint.digest(parts.get(stage, parts["data"]))

    @staticmethod
    def _image_settings(cfg: dict) -> list:
        """What the image files depend on besides the generator (the default upsampling is left
        out, so that runs made before it could be chosen keep their digests)."""
        settings = [cfg["export_resolution"]]
        if cfg["export_resolution"] == "original" and cfg.get("export_upsample", "nearest") != "nearest":
            settings.append(cfg["export_upsample"])
        return settings

    def victim_recipe(self) -> str:
        """What every victim pair depends on: the export and the victims' recipe
        (:func:`mtlue_fast.victim_cells.recipe_digest`; not which seeds are trained)."""
        return victim_cells.recipe_digest(self.digest("export"), self.cfg)

    def victim_cell(self) -> Path:
        """``OUT/victim/<recipe name>``: the folder of this recipe's victim pairs."""
        name = victim_cells.cell_name(victim_cells.victim_recipe_fields(self.cfg), self.victim_recipe())
        return self.out / "victim" / name

    def _legacy_victim_recipe(self) -> str:
        """The victim recipe digest as runs recorded it before cells (stages.json's victim ``recipe``)."""
        victims = {k: v for k, v in self.cfg.identity()["victims"].items() if k != "seeds"}
        return checkpoint.digest([self.digest("export"), self.cfg.victim, self.cfg.defense, victims])

    def stage_output(self, stage: str) -> Path | None:
        """The file a finished ``stage`` leaves for the later ones (None: it leaves none to check)."""
        outputs = {"export": self.out / "protected" / "manifest.json", "victim": self.out / "victims.json"}
        if self._needs_surrogate():
            outputs["surrogate"] = self.out / "surrogate" / "result.json"
        if self.cfg.method == "mtlue":
            outputs["generate"] = self.out / "generator" / "generator.pt"
        return outputs.get(stage)

    def finished(self, stage: str) -> dict | None:
        """The record of ``stage`` when it finished earlier with the same inputs and its output
        (:meth:`stage_output`) is still there (else None): a stage whose folder was deleted by hand
        since is redone, not skipped (the export needs ``generator.pt``)."""
        output = self.stage_output(stage)
        if output is not None and not output.exists():
            return None
        previous = self.records.get(stage)
        return previous if previous and previous.get("digest") == self.digest(stage) else None

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
        """The caches of both splits, shared under the cache root by every run that reads the same data."""
        data = self.cfg.data
        root = self.data_root
        main = dist.info().is_main
        if self.synthetic:
            root = str(self.synthetic_root())
            if main:
                self.log(
                    f"{BANNER}\nNo --data-root given: using the BUILT-IN SYNTHETIC {self.cfg.dataset} sample "
                    f"({data.synthetic_train} train / {data.synthetic_test} test images) in the dataset's original format,\n"
                    f"shared by every run under {root}. Numbers from it show the method works; they are not results on real data.\n{BANNER}"
                )
                if not Path(root).exists():
                    write_synthetic_sample(self.cfg, Path(root))
        dist.barrier()  # the synthetic sample exists for every rank
        kwargs = self._cache_kwargs()
        # Every rank decodes a share of each split; rank 0 assembles it (mtlue_fast.data.cache).
        self.train_cache = build_cache(self.cfg.dataset, root, "train", None, subset=data.subset,
                                       subset_seed=data.subset_seed, **kwargs)
        self.test_cache = build_cache(self.cfg.dataset, root, "test", None, subset=data.subset_test,
                                      subset_seed=data.subset_seed, **kwargs)
        self.data_path = root
        for split, cache in (("training", self.train_cache), ("test", self.test_cache)):
            chosen = cache.manifest.get("subset")
            if chosen and main:
                self.log(f"subset: {chosen['selected']} of {chosen['of']} {split} images (seed {chosen['seed']}, "
                         f"stratified by {chosen['stratified_by'] or 'nothing: a uniform draw'})")

    def _cache_kwargs(self) -> dict:
        """build_cache's settings of this run (resolution, decoder, progress), subsets aside."""
        data = self.cfg.data
        return {"size": tuple(data.cache_size) if data.cache_size else None, "decoder": data.decoder,
                "device": str(self.device), "progress": self.cfg.train.progress and dist.info().is_main}

    def synthetic_root(self) -> Path:
        """Where the built-in synthetic sample of these settings lives (one folder per settings)."""
        data = self.cfg.data
        key = checkpoint.digest([self.cfg.dataset, data.synthetic_train, data.synthetic_test, data.synthetic_seed,
                                 data.synthetic_size, synthetic_data.VERSION])[:12]
        return default_cache_root() / "synthetic" / f"{self.cfg.dataset}-{key}"

    def _crop(self) -> tuple[int, int] | None:
        return tuple(self.cfg.data.crop) if self.cfg.data.crop else None

    def _needs_surrogate(self) -> bool:
        attacked = self.cfg.generate.base in ("tap", "sep") and self.cfg.method in ("mtlue", "pgd")
        return attacked or (self.cfg.victims.reuse_surrogate and "victim" in self.requested)

    def surrogate(self):
        if not self._needs_surrogate():
            return None
        train_cfg = self.cfg.train.replace(keep_every=self.cfg.sep_every if self.cfg.generate.base == "sep" else 0)
        path = self.stage_dir("surrogate")
        self.surrogate_result = train(self.train_cache, self.test_cache, path, train_cfg, device=self.device,
                                      crop=self._crop(), label=f"surrogate (clean, seed {train_cfg.seed})")
        return self.surrogate_result

    def _surrogates(self):
        """TAP: the clean model; SEP: its kept checkpoints; EM: a fresh network."""
        base = self.cfg.generate.base
        if base == "em":
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
            gen_cfg = cfg.generate.replace(crop=self._crop() or cfg.generate.crop)
            result = generate(self.train_cache, path, gen_cfg, surrogates=self._surrogates(), device=self.device)
            self.results["generator"] = {"passes": result.passes, "stopped": result.stopped,
                                         "last": result.history[-1] if result.history else None}
        elif cfg.method == "pgd" and cfg.generate.base == "em":
            if dist.info().is_main:  # the sample-wise baseline runs in one process
                em_pgd(self.train_cache, path, self._surrogates(), eps=cfg.generate.eps, device=self.device,
                       batch_size=cfg.generate.batch_size, progress=cfg.generate.progress)
            dist.barrier()

    def export(self):
        cfg = self.cfg
        path = self._export_dir()
        eps = cfg.generate.eps
        settings = {"digest": self.digest("generate")}
        progress = cfg.generate.progress
        if cfg.method == "mtlue":
            generator = load_generator(self.out / "generator" / "generator.pt", self.device)
            protected = export_generator(generator, self.train_cache, path, device=self.device, settings=settings, progress=progress)
        else:  # the baselines export from one process
            if dist.info().is_main:
                perturb = self._baseline_perturb()
                write_protected(self.train_cache, path, perturb, method=f"{cfg.method}-{cfg.generate.base}",
                                eps=eps, device=self.device, batch_size=min(cfg.generate.batch_size, 256),
                                settings=settings, progress=progress)
            dist.barrier()
            protected = open_cache(path)
        if dist.info().is_main:
            link_contract_names(protected.path, {"images.npy": "train_images.npy", "labels.npy": "train_labels.npy"})
        if cfg.export_images:  # every rank writes a share of the files
            self._export_images(protected, path / "images")
        dist.barrier()
        self.protected = protected
        return protected

    def _export_dir(self) -> Path:
        """``OUT/protected``; the protected cache is kept when only the image files' settings changed
        (its own digest, recorded as ``cache_digest``, is the generate stage's), else redone."""
        path = self.out / "protected"
        previous = self.records.get("export", {})
        if previous.get("digest") == self.digest("export") or previous.get("cache_digest") != self.digest("generate"):
            return self.stage_dir("export", "protected")
        if (path / "images").exists():
            self.log("export: the image files' settings changed, rewriting them (the protected cache is kept)")
            if dist.info().is_main:
                shutil.rmtree(path / "images")
            dist.barrier()
        return path

    def _export_images(self, protected, folder: Path) -> None:
        """The published dataset (``OUT/protected/images``, :func:`mtlue_fast.ue.publish.write_image_files`).
        At the original resolution an ``mtlue`` generator recomputes the float perturbation that is
        carried back to the original size; the baselines carry the stored int8 one."""
        cfg = self.cfg
        progress = cfg.generate.progress
        if cfg.export_resolution == "working":
            write_image_files(protected, self.data_path, folder, progress=progress)
            return
        perturb = None
        if cfg.method == "mtlue":
            perturb = generator_perturb(load_generator(self.out / "generator" / "generator.pt", self.device))
        write_image_files(protected, self.data_path, folder, progress=progress, resolution="original", perturb=perturb,
                          test_files=self.test_cache.manifest["row_files"], device=self.device, upsample=cfg.export_upsample,
                          batch_size=min(cfg.generate.batch_size, 256))  # fmt: skip

    def _baseline_perturb(self):
        cfg = self.cfg
        view = select_tasks(self.train_cache, None, self._crop())
        if cfg.method == "random":
            return baselines.uniform_noise(cfg.generate.eps, cfg.generate.seed)
        if cfg.method == "ar":
            return baselines.ar_patches(view.num_classes, tuple(view.images.shape[-2:]), view.channels,
                                        cfg.generate.eps, cfg.generate.seed)
        if cfg.generate.base == "em":
            return em_pgd(self.train_cache, self.out / "generator", self._surrogates(), eps=cfg.generate.eps,
                          device=self.device, batch_size=cfg.generate.batch_size, progress=cfg.generate.progress)
        objective = Objective(cfg.generate.base, view.num_classes, targeted=cfg.generate.targeted)
        return pgd_perturb(self._surrogates(), objective, eps=cfg.generate.eps, crop=view.crop)

    def _published_cache(self, protected):
        """``--victim-data files``: the training cache the ordinary reader (build_cache) builds from
        the published image files, as an unauthorised user of the published dataset would; the
        victims are still measured on the run's clean test split. Records how far its images are
        from the protected cache's (``self.results["published"]``)."""
        folder = self.out / "protected" / "images"
        if self.cfg.dataset == "utkface" and self.cfg.data.subset is not None:
            raise UserError("--victim-data files with a UTKFace subset: UTKFace has no split files, so its reader "
                            "re-splits the published folder differently from the run's subset; use the full dataset")
        if not folder.is_dir():
            raise UserError(f"--victim-data files needs the published image files {folder}: run the export stage "
                            "with --export-images")
        cache = build_cache(self.cfg.dataset, folder, "train", None, **self._cache_kwargs())
        self.results["published"] = published_check(cache, protected, self.train_cache)
        self.log(f"victim: the protected victims train on {len(cache)} images read back from {folder} "
                 f"(cache {cache.path}; mean |published - protected cache| "
                 f"{self.results['published']['mean_abs_diff_vs_protected_cache']:.3f} levels)")
        return cache

    def _defended(self, cache, folder: Path):
        """``cache`` under the run's data defence (rank 0 writes it, then every rank opens it)."""
        if dist.info().is_main:
            defend_cache(self.cfg.defense, cache, folder, progress=self.cfg.train.progress)
        dist.barrier()
        return defend_cache(self.cfg.defense, cache, folder, progress=False)  # complete: opened

    def victim(self):
        """Clean/protected victim pairs, one per victim seed; both of a pair share its seed (initial
        weights, data order, augmentation draws) and the defence, so their difference is the data's.
        The pairs live in the recipe's cell (:meth:`victim_cell`, :mod:`mtlue_fast.victim_cells`):
        another recipe adds a cell and keeps this one; cells of an earlier export are removed."""
        cfg = self.cfg
        protected = self.protected or open_cache(self.out / "protected")
        clean = self.train_cache
        if cfg.victims.data == "files":
            protected = self._published_cache(protected)
        base = self.out / "victim"
        cell, export, recipe = self.victim_cell(), self.digest("export"), self.victim_recipe()
        if dist.info().is_main:
            victim_cells.remove_stale(base, export, self.log)
            previous = self.records.get("victim", {}).get("recipe")  # None: the first victim stage never finished
            matches = previous is None or previous == self._legacy_victim_recipe()
            victim_cells.migrate_legacy(base, cell, matches, self.log)
            victim_cells.start_cell(cell, cell.name, recipe, export, victim_cells.victim_recipe_fields(cfg))
        dist.barrier()
        if cfg.defense in DATA_DEFENSES:
            shared = default_cache_root() / "defended" / f"{cfg.defense}-{clean.manifest['source_digest'][:16]}"
            clean = self._defended(clean, shared)
            protected = self._defended(protected, base / f"defended-{cfg.defense}")
        seeds = cfg.victim_seeds()
        self._victims_side_by_side(seeds, cell, clean, protected)
        victims = []
        for number, seed in enumerate(seeds, start=1):
            train_cfg = self._victim_config(seed)
            folder = cell / f"seed-{seed}"
            label = f"victim {number}/{len(seeds)} (seed {seed}"
            pair = {"seed": seed}
            for kind, data in (("clean", clean), ("protected", protected)):
                if kind == "clean" and cfg.victims.reuse_surrogate:
                    pair[kind] = self._surrogate_as_clean()
                elif cfg.victim == "stl":
                    pair[kind] = {"metrics": train_stl(data, self.test_cache, folder / kind, train_cfg, device=self.device,
                                                       crop=self._crop()), "images_per_second": None}
                else:
                    result = train(data, self.test_cache, folder / kind, train_cfg, device=self.device, crop=self._crop(),
                                   label=f"{label}, {kind} data)")
                    pair[kind] = {"metrics": result.metrics, "images_per_second": result.images_per_second}
            victims.append(pair)
        self.results["victims"] = victims
        if dist.info().is_main:
            victim_cells.finish_cell(cell, victims)
        dist.barrier()

    def _victim_config(self, seed: int):
        train_cfg = self.cfg.victim_train(seed)
        if self.cfg.defense in ("augment", "adv"):
            train_cfg = train_cfg.replace(defense=self.cfg.defense, defense_eps=self.cfg.generate.eps)
        return train_cfg

    def _victims_side_by_side(self, seeds: list[int], cell: Path, clean, protected) -> None:
        """On a CPU, train the victims not yet finished in processes of their own, side by side
        (``victims.processes``, :mod:`mtlue_fast.train.side_by_side`); the caller's loop then reads
        their stored results. Nothing to do with one process (a GPU, torchrun, one thread)."""
        cfg = self.cfg
        jobs = []
        for number, seed in enumerate(seeds, start=1):
            for kind, data in (("clean", clean), ("protected", protected)):
                out_dir = cell / f"seed-{seed}" / kind
                if (kind == "clean" and cfg.victims.reuse_surrogate) or (out_dir / "result.json").exists():
                    continue
                jobs.append(side_by_side.TrainJob(
                    Path(data.path), Path(self.test_cache.path), out_dir, self._victim_config(seed), self._crop(),
                    f"victim {number}/{len(seeds)} (seed {seed}, {kind} data)", single_task=cfg.victim == "stl",
                ))  # fmt: skip
        images_seen = len(clean) * (jobs[0].config.epochs if jobs else 0)
        processes, threads = side_by_side.plan_processes(
            cfg.victims.processes, len(jobs), torch.get_num_threads(), self.device, dist.info().distributed, images_seen
        )
        if processes > 1:
            side_by_side.train_side_by_side(jobs, processes, threads, self.log)

    def _surrogate_as_clean(self) -> dict:
        """The clean surrogate's result as a clean victim (``--reuse-surrogate-as-clean``); only
        when the victims' recipe is the surrogate's, undefended and multi-task."""
        if not self.cfg.surrogate_can_be_the_clean_victim():
            raise UserError("--reuse-surrogate-as-clean needs MTL victims with the surrogate's backbone, weighting, "
                            "width and epochs and no defence")
        if self.surrogate_result is None:
            self.surrogate()
        result = self.surrogate_result
        return {"metrics": result.metrics, "images_per_second": result.images_per_second, "surrogate": True}

    def report(self) -> dict:
        cfg = self.cfg
        victims = self.results.get("victims") or self._stored_victims()
        protected = self.protected or open_cache(self.out / "protected")
        names = list(protected.task_names)
        dense = isinstance(protected.labels, dict)
        metric = _metric_name(victims[0]["clean"]["metrics"], dense)
        clean_dir = self.out / "clean"
        link_contract_names(self.train_cache.path, {"images.npy": "train_images.npy", "labels.npy": "train_labels.npy"}, clean_dir)
        stats = report_module.perturbation_stats(self.train_cache.images, protected.images, self.train_cache.labels,
                                                 names, list(protected.num_classes))
        timings = {k: v.get("seconds") for k, v in self.records.items()}
        throughput = {k: v.get("images_per_second") for k, v in self.records.items() if v.get("images_per_second")}
        victim_cfg = cfg.victim_train(victims[0]["seed"])
        report = report_module.build_report(
            dataset=cfg.dataset, synthetic=self.synthetic, data_root=self.data_root, tasks=names, metric=metric,
            victims=victim_scores(victims, names, dense),
            surrogate={"seed": cfg.train.seed, "backbone": cfg.train.backbone, "weighting": cfg.train.weighting,
                       "width": cfg.train.width, "epochs": cfg.train.epochs},
            clean_cache=str(clean_dir), eps=cfg.generate.eps, base=cfg.generate.base, method=cfg.method,
            backbone=victim_cfg.backbone, weighting=victim_cfg.weighting, width=victim_cfg.width,
            epochs=victim_cfg.epochs, victim=cfg.victim, timings=timings,
            throughput=throughput, versions=report_module.versions(), git=report_module.git_revision(),
            perturbation_stats=stats, defense=cfg.defense if cfg.defense != "none" else None,
            cells=self.report_cells(victims, names, dense),
        )  # fmt: skip
        if cfg.victims.reuse_surrogate:
            report["clean_victim"] = "the clean surrogate (--reuse-surrogate-as-clean)"
        report["victim_data"] = cfg.victims.data
        if cfg.victims.data == "files":
            report["published"] = self.results.get("published") or self.records.get("victim", {}).get("published")
        report["subset"] = {split: cache.manifest.get("subset") for split, cache in
                            (("train", self.train_cache), ("test", self.test_cache))}  # fmt: skip
        report_module.write_report(self.out, report, clean_images=self.train_cache.images, protected_images=protected.images)
        return report

    def report_cells(self, victims: list[dict], names: list[str], dense: bool) -> list[dict]:
        """The report's ``cells``: every finished victim recipe of the current export, the run's own
        marked ``current`` (from ``victims`` when its cell holds no finished pair yet)."""
        current = self.victim_cell()
        cells = victim_cells.list_cells(self.out / "victim", self.digest("export"))
        if not any(c["name"] == current.name for c in cells):
            cells.append({"name": current.name, "digest": self.victim_recipe(),
                          "fields": victim_cells.victim_recipe_fields(self.cfg), "victims": victims})
        return [{"name": c["name"], "digest": c["digest"], "fields": c["fields"], "current": c["name"] == current.name,
                 "victims": victim_scores(c["victims"], names, dense)} for c in cells]  # fmt: skip

    def _stored_victims(self) -> list[dict]:
        stored = read_json(self.out / "victims.json")
        if not isinstance(stored, dict) or not isinstance(stored.get("victims"), list):
            raise UserError(f"the report needs the victim stage's results; run with --stages victim,report ({self.out})")
        return stored["victims"]


def write_synthetic_sample(cfg: RunConfig, root: Path) -> None:
    """Write the built-in synthetic sample once; a concurrent run that finished it first is fine."""
    data = cfg.data
    try:
        synthetic_data.write(cfg.dataset, root, data.synthetic_train, data.synthetic_test, data.synthetic_seed,
                             data.synthetic_size)
    except (OSError, ValueError):
        if not root.is_dir():
            raise


def _metric_name(metrics: dict, dense: bool):
    if dense:
        return {"segmentation": "miou", "depth": "depth_abs_error", "normal": "normal_angle_mean"}
    return "auc" if "mean_auc" in metrics else "accuracy"


def victim_scores(pairs: list[dict], names: list[str], dense: bool) -> list[dict]:
    """The victim stage's pairs (``{"seed", "clean": {"metrics", ...}, "protected": ...}``) as the
    report's ``victims`` entries ``{"seed", "clean": scores, "protected": scores}``."""
    return [{"seed": p["seed"], "clean": _summary(p["clean"]["metrics"], names, dense),
             "protected": _summary(p["protected"]["metrics"], names, dense)} for p in pairs]  # fmt: skip


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


def default_out(cfg: RunConfig, data_root: str | None) -> Path:
    """``runs/<dataset>-<method>-<base>-<digest>``, the digest over what decides the protected data
    (data, surrogate, generator, method): the same command finds its own run again, and a command that
    changes only the victims or the published files (``--export-images``, ``--victim-data``) finds the
    run whose surrogate, generator and protected cache it can reuse (with ``--resume``)."""
    settings = cfg.identity()
    protection = [settings[k] for k in ("dataset", "data", "train", "generate", "method", "sep_every")]
    return Path("runs") / f"{cfg.dataset}-{cfg.method}-{cfg.generate.base}-{checkpoint.digest([protection, data_root])[:10]}"


def check_out_dir(out: Path, resolved: str, resume: bool, force: bool, log) -> None:
    """Refuse an OUT holding another run unless --resume / --force; never touch foreign folders."""
    if not out.exists():
        return
    stored = out / "config.yaml"
    if not stored.exists():
        if any(out.iterdir()):
            raise UserError(f"--out {out} is a non-empty folder that is not an mtlue_fast run; choose another")
        return
    if config_module.identity_of(yaml.safe_load(stored.read_text()) or {}) == config_module.identity_of(yaml.safe_load(resolved)):
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
    cfg = config_module.resolve(
        args.dataset, config_file=args.config, synthetic=args.data_root is None, preset=args.preset,
        overlays=args.overlay, overrides=overrides_from_args(args), assignments=args.set,
    )  # fmt: skip
    if args.data_root is not None and not Path(args.data_root).is_dir():
        raise UserError(f"--data-root {args.data_root} does not exist or is not a directory")
    data_root = str(Path(args.data_root).resolve()) if args.data_root else None
    if args.preset == "smoke" and data_root and args.subset is None and cfg.data.subset is not None:
        log(f"smoke preset: a seeded, stratified subset of the real data ({cfg.data.subset} training / "
            f"{cfg.data.subset_test or 'all'} test images; --subset N / --subset-test M to change)")
    if cfg.train.deterministic:
        reserve_deterministic_cublas()
    device = resolve_device(cfg.device)
    place = dist.setup(device.type)
    if device.type == "cuda" and place.distributed:
        device = torch.device("cuda", place.local_rank)
    if not place.is_main:
        log = lambda text: None  # noqa: E731 - only rank 0 talks
    out = Path(args.out) if args.out else default_out(cfg, data_root)
    resolved = config_module.dump(cfg)
    created = not out.exists()
    if place.is_main:
        check_out_dir(out, resolved, args.resume, args.force, log)
    try:
        return _run_stages(cfg, out, data_root, device, stages, resolved, log, defaulted=not args.out)
    except USER_ERRORS:
        if created and place.is_main and out.exists() and not (out / "stages.json").exists():
            shutil.rmtree(out)  # a refused run leaves nothing behind
        raise


def _run_stages(cfg: RunConfig, out: Path, data_root: str | None, device: torch.device, stages: list[str],
                resolved: str, log: Callable[[str], None], defaulted: bool) -> int:
    place = dist.info()
    if place.is_main:
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / "config.yaml") as tmp:
            tmp.write_text(resolved)
    dist.barrier()
    runner = Run(cfg, out, data_root, device, log)
    runner.requested = stages
    where = f"{out} (the default for these settings: the same command resumes and skips what is done)" if defaulted else str(out)
    log(f"mtlue_fast.run: {cfg.dataset}, method {cfg.method} ({cfg.generate.base}), device {device}, out {where}")
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
        done = runner.finished(name)
        if done is not None:
            log(f"{name}: skipped, finished earlier with the same settings and inputs "
                f"({done.get('seconds', 0):.0f} s then; digest {done['digest'][:10]} in {runner.stages_path})")
            if name == "generate":
                continue  # nothing later needs it in memory; the others reload their results for free
        t = time.perf_counter()
        result = stage()
        extra = {}
        if name == "surrogate" and result is not None:
            extra["images_per_second"] = result.images_per_second
        if name == "export":
            extra["cache_digest"] = runner.digest("generate")  # what the protected cache itself depends on
        if name == "victim" and runner.results.get("published"):
            extra["published"] = runner.results["published"]
        if name == "victim":
            if place.is_main:
                write_json(out / "victims.json", {"victims": runner.results["victims"]})
            extra["recipe"] = runner.victim_recipe()
            extra["cell"] = runner.victim_cell().name
            ips = runner.results["victims"][0]["protected"].get("images_per_second")
            if ips:
                extra["images_per_second"] = ips
        if done is None:
            runner.record(name, time.perf_counter() - t, **extra)
    if "report" in stages and place.is_main:
        t = time.perf_counter()
        report = runner.report()
        runner.record("report", time.perf_counter() - t)
        print(report_module.summary_table(report))
        if runner.synthetic:
            print(f"(synthetic data: the built-in stand-in for {cfg.dataset}, not the real dataset; pass --data-root for that)")
        print(f"\nreport: {out / 'report.md'} and {out / 'report.json'}")
        print(f"figures: {out / 'figures'} (metrics.png, samples.png)")
        print(f"finished in {time.perf_counter() - started:.0f} s")
    dist.barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit_:  # argparse printed its message
        return int(exit_.code or 0)
    return run_command(lambda: run(args), interrupted="rerun the same command to resume from the last finished step")


if __name__ == "__main__":
    sys.exit(main())
