"""Victim cells: the clean/protected victim pairs of one victim recipe, kept side by side in a run.

A *recipe* is everything a victim pair depends on except its seed: the protected export (by the
export stage's digest) and the victims' settings. Its readable part is :func:`victim_recipe_fields`
(backbone, weighting, ``mtl``/``stl``, defence, the victims' data source); every other victim
setting enters the digest too
(:func:`recipe_digest`), except which seeds are trained, since pairs live in per-seed folders.

Layout in a run directory ``OUT``::

    OUT/victim/<name>/cell.json                  this file's record (see below)
    OUT/victim/<name>/seed-<s>/{clean,protected} one pair per victim seed
    OUT/victim/defended-<defence>/               the protected data under a data defence (shared by
                                                 every cell with that defence; rebuilt when the export changes)

``<name>`` is the recipe fields' values joined by ``-`` (a defence ``none`` as ``nodefense``) and 8
hex digits of the digest (:func:`cell_name`), e.g. ``resnet18-ew-mtl-nodefense-cache-1a2b3c4d``. ``cell.json`` holds ``name``,
``digest``, ``export`` (the export digest), ``fields`` and ``victims`` (the finished pairs, each
``{"seed", "clean", "protected"}`` as the victim stage returns them). It is written when a cell
starts (no pairs yet) and once more, atomically, when the cell's requested seeds are all finished,
so a cell is either finished for a seed or not; a half-trained victim resumes from its ``last.pt``.

A change of victim settings adds a cell and keeps the others. A cell whose export is not the run's
current one is *stale*: its victims measured data that no longer exists, and :func:`remove_stale`
deletes it. Runs of the layout before cells (``OUT/victim/seed-<s>``) are moved into their cell by
:func:`migrate_legacy` when their recorded recipe is still the current one (each victim is then
reused as its own settings digest allows), else removed, as a recipe change removed them before
(their recipe cannot be named); the next victim stage trains what it asks for.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import OPTIONAL_VICTIM_SETTINGS
from .fileio import read_json, write_json
from .train import checkpoint

CELL_FILE = "cell.json"
#: Victim settings that choose which pairs are trained, not what a pair is: outside the recipe.
SEED_SETTINGS = ("seeds", "first_seed")


def victim_recipe_fields(cfg) -> dict[str, Any]:
    """The readable victim recipe of a :class:`~mtlue_fast.config.RunConfig`, resolved (a victims'
    backbone / weighting left unset is the surrogate's): ``{"backbone", "weighting", "victim",
    "defense", "data"}`` (``data``: ``cache`` or ``files``, what the protected victims train on). The one place that says what a recipe is made of: a field added here enters the
    digest, the cell's folder name and the report's ``cells``."""
    recipe = cfg.victim_train(cfg.victim_seeds()[0])
    fields = {"backbone": recipe.backbone, "weighting": recipe.weighting, "victim": cfg.victim, "defense": cfg.defense,
              "data": cfg.victims.data}
    for name in OPTIONAL_VICTIM_SETTINGS:  # only a value of their own, so that earlier cells keep their names
        if getattr(recipe, name) != getattr(cfg.train, name):
            fields[name] = getattr(recipe, name)
    return fields


def recipe_digest(export_digest: str, cfg) -> str:
    """sha256 hex over the export's digest, :func:`victim_recipe_fields` and every other victim
    setting except :data:`SEED_SETTINGS` (e.g. ``victims.reuse_surrogate``)."""
    fields = victim_recipe_fields(cfg)
    others = {k: v for k, v in cfg.identity()["victims"].items() if k not in SEED_SETTINGS and k not in fields}
    return checkpoint.digest([export_digest, fields, others])


def cell_name(fields: Mapping[str, Any], digest: str) -> str:
    """``<field values joined by ->-<8 hex>``; a defence ``none`` reads ``nodefense``; characters other
    than letters, digits, ``_`` and ``.`` become ``_``."""
    parts = ["nodefense" if key == "defense" and value == "none" else str(value) for key, value in fields.items()]
    return "-".join(re.sub(r"[^A-Za-z0-9_.]", "_", p) for p in [*parts, digest[:8]])


def read_cell(folder: str | Path) -> dict | None:
    """The cell's record (``cell.json``), or None when absent or unreadable."""
    record = read_json(Path(folder) / CELL_FILE)
    return record if isinstance(record, dict) and "digest" in record else None


def start_cell(folder: str | Path, name: str, digest: str, export: str, fields: Mapping[str, Any]) -> dict:
    """Create the cell's folder and record (keeping the finished pairs of the same recipe)."""
    folder = Path(folder)
    record = read_cell(folder)
    if record is None or record.get("digest") != digest:
        record = {"name": name, "digest": digest, "export": export, "fields": dict(fields), "victims": []}
        write_json(folder / CELL_FILE, record)
    return record


def finish_cell(folder: str | Path, pairs: Sequence[Mapping]) -> dict:
    """Add the finished ``pairs`` to the cell's record (a pair of the same seed is replaced) in one
    atomic write; the cell must have been started."""
    folder = Path(folder)
    record = read_cell(folder)
    if record is None:
        raise FileNotFoundError(f"{folder / CELL_FILE} is missing: the cell was not started")
    by_seed = {int(p["seed"]): dict(p) for p in record.get("victims") or []}
    by_seed.update({int(p["seed"]): dict(p) for p in pairs})
    record["victims"] = [by_seed[s] for s in sorted(by_seed)]
    write_json(folder / CELL_FILE, record)
    return record


def finished_pairs(folder: str | Path, digest: str, seeds: Sequence[int]) -> list[dict] | None:
    """The cell's pairs for ``seeds`` (in that order) when every one is finished with the recipe
    ``digest``, else None."""
    record = read_cell(folder)
    if record is None or record.get("digest") != digest:
        return None
    by_seed = {int(p["seed"]): p for p in record.get("victims") or []}
    if any(int(s) not in by_seed for s in seeds):
        return None
    return [by_seed[int(s)] for s in seeds]


def list_cells(root: str | Path, export: str) -> list[dict]:
    """The records of the cells under ``root`` (``OUT/victim``) that measured the export ``export``
    and have at least one finished pair, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    cells = [read_cell(p) for p in sorted(root.iterdir()) if p.is_dir()]
    return [c for c in cells if c is not None and c.get("export") == export and c.get("victims")]


def remove_stale(root: str | Path, export: str, log: Callable[[str], None]) -> list[str]:
    """Delete the cells under ``root`` recorded for another export than ``export``; returns their names.
    Folders without a cell record are left alone."""
    root = Path(root)
    removed = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        record = read_cell(folder) if folder.is_dir() else None
        if record is not None and record.get("export") != export:
            shutil.rmtree(folder)
            removed.append(folder.name)
    if removed:
        log(f"victim: removed {len(removed)} victim cell(s) of an earlier protected export: {', '.join(removed)}")
    return removed


def legacy_pairs(root: str | Path) -> list[Path]:
    """The ``seed-<s>`` folders of the layout before cells, directly under ``root``."""
    root = Path(root)
    return sorted(p for p in root.glob("seed-*") if p.is_dir()) if root.is_dir() else []


def migrate_legacy(root: str | Path, cell: str | Path, matches: bool, log: Callable[[str], None]) -> bool:
    """Move ``root/seed-<s>`` folders (the layout before cells) into the folder ``cell`` when
    ``matches`` (their recorded recipe is the current one), else delete them. Nothing is recorded as
    finished here: the victim stage that follows asks each victim, which returns its stored result
    when its own settings digest still matches (and resumes or retrains otherwise). Returns whether
    anything was moved."""
    old = legacy_pairs(root)
    if not old:
        return False
    if not matches:
        for folder in old:
            shutil.rmtree(folder)
        log(f"victim: removed {len(old)} victim pair(s) of the earlier folder layout whose settings differ "
            "from this run's (they are retrained when asked for)")
        return False
    cell = Path(cell)
    cell.mkdir(parents=True, exist_ok=True)
    for folder in old:
        target = cell / folder.name
        if target.exists():
            shutil.rmtree(folder)  # the cell has this seed already
        else:
            folder.rename(target)
    log(f"victim: moved {len(old)} victim pair(s) of the earlier folder layout into {cell}")
    return True
