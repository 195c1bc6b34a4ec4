"""``python -m mtlue_fast.protect RUN --data-root NEW --out OUT``: protect images that were not in a run.

A finished ``python -m mtlue_fast.run`` (method ``mtlue``) leaves a trained generator in
``RUN/generator/generator.pt``. This command applies it, without training anything, to a dataset
given in the same dataset's original layout with its labels (e.g. images added after the run), and
writes ``OUT`` exactly as the run's ``--export-images`` does
(:func:`mtlue_fast.ue.publish.write_image_files`): by default every image at its original size, the
training split protected (``|protected - original| <= ceil(255 * eps)`` on every pixel, checked for
every file), the test split copied unchanged, the annotation files copied with the names of the
written images; ``--resolution working`` writes the training images at the cache's resolution only.

Steps: the clean cache of NEW's training split is built with the run's cache settings (resolution,
decoder; no subset: every image given is protected); the generator exports it to a protected cache
under the cache root (``$MTLUE_CACHE/protect/``, reused by a rerun); the files are written to OUT.

Deterministic: the same inputs give the same bytes. An image that was in the run gets the very file
the run's export wrote for it when NEW is the run's own data root (same cache rows, same batches);
for other roots the generator sees the image in other batches, which on the CPU gives the same
values (per-sample computation in eval mode).

``OUT/protect.json`` records what was protected with which generator: the run folder, the
generator file and its sha256, the data root, the splits and counts, the format and resolution.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

from . import startup_interrupt  # noqa: F401 - before torch: Ctrl-C while it loads prints one line

import yaml

from . import config as config_module
from .config import ConfigError, RunConfig
from .data import build_cache, default_cache_root, load_records
from .data.records import DatasetFormatError
from .cli import UserError, resolve_device, run_command
from .fileio import read_json, write_json
from .ue.export import export_generator, generator_perturb
from .ue.generate import load_generator
from .ue.publish import MARKER_FILE, write_image_files

RECORD_FILE = "protect.json"

EXAMPLES = """examples:
  python -m mtlue_fast.protect runs/celeba-mtlue-tap-0123456789 --data-root /data/celeba-new --out /data/celeba-new-protected
      every image of /data/celeba-new at its original size, the training split protected with the run's generator
  python -m mtlue_fast.protect RUN --data-root NEW --out OUT --resolution working
      the training images only, at the cache's working resolution
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m mtlue_fast.protect",
        description="Protect images that were not in a run with the run's trained MTL-UE generator (no training).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run", metavar="RUN", help="a finished python -m mtlue_fast.run directory (method mtlue)")
    parser.add_argument("--data-root", required=True, help="the images to protect, in the dataset's original layout with labels")
    parser.add_argument("--out", required=True, help="folder to create: the protected copy in the same layout")
    parser.add_argument("--resolution", choices=("original", "working"), default="original",
                        help="original (default): every image at its original size, the test split copied; "
                             "working: the training images at the cache's resolution")  # fmt: skip
    parser.add_argument("--image-format", choices=("png", "jpeg"), default="png", help="png (default, exact) or jpeg (lossy: weakens the protection)")
    parser.add_argument("--jpeg-quality", type=int, default=95, help="1..100 for --image-format jpeg")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--batch-size", type=int, help="images per generator call (default: the run's generate.batch_size, at most 256)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def load_run(run_dir: Path) -> tuple[RunConfig, Path]:
    """The run's resolved configuration and its generator file; a UserError says what is missing."""
    if not run_dir.is_dir():
        raise UserError(f"RUN {run_dir} does not exist or is not a folder; pass a python -m mtlue_fast.run directory")
    stored = run_dir / "config.yaml"
    if not stored.is_file():
        raise UserError(f"RUN {run_dir} has no config.yaml: not a python -m mtlue_fast.run directory")
    try:
        cfg = config_module.build(RunConfig, yaml.safe_load(stored.read_text()) or {})
    except (ConfigError, yaml.YAMLError) as err:
        raise UserError(f"{stored} cannot be read by this version of mtlue_fast: {err}") from None
    if cfg.method != "mtlue":
        raise UserError(f"RUN {run_dir} was made with --method {cfg.method}: only an mtlue run has a generator "
                        "that protects new images")  # fmt: skip
    generator = run_dir / "generator" / "generator.pt"
    if not generator.is_file():
        raise UserError(f"{generator} not found: the run has no trained generator yet; finish its generate stage "
                        "(python -m mtlue_fast.run ... --stages generate)")  # fmt: skip
    return cfg, generator


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _test_files(dataset: str, root: str, log) -> list[str]:
    """The test split's files relative to ``root`` (copied unchanged); none when the split is empty."""
    try:
        records = load_records(dataset, root, "test")
    except DatasetFormatError as err:
        if "is empty" not in str(err):
            raise
        log(f"{dataset}: the test split under {root} is empty: only training images are written")
        return []
    return [os.path.relpath(p, records.root) for p in records.paths]


def protect(args: argparse.Namespace, log) -> Path:
    """Do what :func:`main` is asked; returns OUT."""
    run_dir = Path(args.run).expanduser().resolve()
    cfg, generator_file = load_run(run_dir)
    root = Path(args.data_root).expanduser()
    if not root.is_dir():
        raise UserError(f"--data-root {root} does not exist or is not a directory")
    root = root.resolve()
    out = Path(args.out).expanduser().resolve()
    if out == root or root in out.parents:
        raise UserError(f"--out {out} is inside --data-root {root}; write the protected copy elsewhere")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    show = not args.quiet
    digest = file_sha256(generator_file)
    generator = load_generator(generator_file, device)
    log(f"mtlue_fast.protect: {cfg.dataset} images of {root} with the generator of {run_dir} "
        f"(sha256 {digest[:12]}), device {device}, out {out}")  # fmt: skip

    data = cfg.data
    train = build_cache(cfg.dataset, root, "train", None, size=tuple(data.cache_size) if data.cache_size else None,
                        decoder=data.decoder, progress=show, device=str(device))  # fmt: skip
    _check_generator(generator, train, generator_file)
    batch = args.batch_size or min(cfg.generate.batch_size, 256)
    settings = {"generator_sha256": digest}
    protected_dir = default_cache_root() / "protect" / f"{Path(train.path).name}-{digest[:12]}"
    protected = export_generator(generator, train, protected_dir, device=device, batch_size=batch, settings=settings,
                                 progress=show)  # fmt: skip
    original = args.resolution == "original"
    test = _test_files(cfg.dataset, str(root), log) if original else []
    existed = (out / MARKER_FILE).is_file()
    write_image_files(protected, root, out, image_format=args.image_format, jpeg_quality=args.jpeg_quality, progress=show,
                      resolution=args.resolution, perturb=generator_perturb(generator) if original else None,
                      test_files=test if original else None, device=device, batch_size=batch,
                      upsample=cfg.export_upsample if original else None)  # fmt: skip
    if not (existed and read_json(out / RECORD_FILE)):
        write_json(out / RECORD_FILE, _record(cfg, run_dir, generator_file, digest, root, protected, train, test, args))
    log(f"protected {len(train)} training images" + (f", copied {len(test)} test images" if test else "")
        + f" into {out} ({out / RECORD_FILE})")
    return out


def _check_generator(generator, train, path: Path) -> None:
    """The generator must fit the new data: same image size, channels and label classes."""
    size = tuple(generator.image_size) if hasattr(generator, "image_size") else None
    if size is not None and size != tuple(train.images.shape[-2:]):
        raise UserError(f"{path} was trained on {size[0]}x{size[1]} images, but the cache of the new data is "
                        f"{train.images.shape[-2]}x{train.images.shape[-1]}")  # fmt: skip
    classes = getattr(generator, "num_classes", None)
    if classes is not None and list(classes) != list(train.num_classes):
        raise UserError(f"{path} knows the classes per task {list(classes)}, the new data has {list(train.num_classes)}")


def _record(cfg, run_dir, generator_file, digest, root, protected, train, test, args) -> dict:
    from .machine import versions

    return {
        "kind": "mtlue_protect", "dataset": cfg.dataset, "run": str(run_dir),
        "generator": {"path": str(generator_file), "sha256": digest},
        "method": cfg.method, "eps": cfg.generate.eps, "data_root": str(root),
        "resolution": args.resolution, "upsample": cfg.export_upsample if args.resolution == "original" else None,
        "image_format": args.image_format,
        "jpeg_quality": args.jpeg_quality if args.image_format == "jpeg" else None,
        "splits": {"train": {"count": len(train), "protected": True},
                   "test": {"count": len(test), "protected": False,
                            "note": "copied unchanged: the protection covers the training data only"}},
        "clean_cache": str(train.path), "protected_cache": str(protected.path),
        "source_digest": protected.manifest["source_digest"], "marker": MARKER_FILE,
        "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    log = (lambda text: None) if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))

    def body() -> int:
        protect(args, log)
        return 0

    return run_command(body, interrupted="nothing was published; rerun the same command")


if __name__ == "__main__":
    sys.exit(main())
