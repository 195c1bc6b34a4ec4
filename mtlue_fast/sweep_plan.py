"""Which victim recipes a robustness sweep trains (:mod:`mtlue_fast.sweep`).

A recipe is a dict of the fields :func:`mtlue_fast.victim_cells.victim_recipe_fields` names; a sweep
varies four of them, its *axes* (:data:`AXES`), over lists of values, either

- ``product``: every combination of the listed values (an axis not listed keeps the run's value), or
- ``one-axis``: each listed axis on its own, the others at the run's values (the shape of the
  paper's tables: one table per axis).

Pure functions of names; nothing here trains or reads files.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .config import DEFENSES, VICTIMS
from .models import BACKBONES, DENSE_BACKBONES
from .mtl.weighting import STRATEGIES

AXES = ("backbone", "weighting", "victim", "defense")
FLAGS = {"backbone": "--backbones", "weighting": "--weightings", "victim": "--victims", "defense": "--defenses"}
#: ``--axes paper``: the axes of the paper's robustness tables, each varied alone.
PAPER_AXES = ("backbone", "weighting", "defense")
MODES = ("product", "one-axis")


def choices(dense: bool = False) -> dict[str, tuple[str, ...]]:
    """The values each axis accepts (dense NYUv2 victims: the dense backbones only)."""
    return {"backbone": DENSE_BACKBONES if dense else BACKBONES, "weighting": tuple(STRATEGIES), "victim": VICTIMS,
            "defense": DEFENSES}  # fmt: skip


def parse_values(axis: str, text: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]`` for the axis' flag: stripped, repeats dropped, each checked.

    Raises:
        ValueError: naming the flag, the unknown value and the accepted ones.
    """
    values = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    allowed = choices()[axis]
    if not values:
        raise ValueError(f"{FLAGS[axis]} needs a comma-separated list of {', '.join(allowed)}")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"{FLAGS[axis]}: unknown {axis} {unknown[0]!r}; expected any of {', '.join(allowed)}")
    return values


def paper_axes(dense: bool = False) -> dict[str, list[str]]:
    """``--axes paper``: every backbone, weighting strategy and defence (the sweep leaves out, and
    lists, the values that cannot train on the run's data: see :func:`unsupported`)."""
    values = choices(dense)
    return {axis: list(values[axis]) for axis in PAPER_AXES}


def unsupported(recipe: Mapping[str, str], dense: bool, channels: int | None) -> str | None:
    """Why ``recipe`` cannot train on this data (None when it can): grayscale needs 3-channel images,
    JPEG 1 or 3 channels, dense victims a dense backbone."""
    defense = recipe.get("defense")
    if defense == "grayscale" and channels is not None and channels != 3:
        return f"defence 'grayscale' needs 3-channel images; this data has {channels}"
    if defense == "jpeg" and channels is not None and channels not in (1, 3):
        return f"defence 'jpeg' needs 1- or 3-channel images; this data has {channels}"
    if dense and recipe.get("backbone") not in (None, *DENSE_BACKBONES):
        return f"dense victims need one of the backbones {', '.join(DENSE_BACKBONES)}"
    return None


@dataclass(frozen=True)
class Plan:
    """The recipes of a sweep, in training order, and the tables they appear in.

    Attributes:
        mode: ``product`` or ``one-axis``.
        base: the run's own recipe.
        axes: ``{axis: values}`` of the swept axes, in :data:`AXES` order.
        recipes: every distinct recipe (the run's recipe fields, some replaced).
        tables: ``(axis, recipe indices)``: in ``one-axis`` mode one per swept axis, its rows the
            axis' values; in ``product`` mode one per swept axis too, every recipe in each (the
            report groups them by the axis' value).
    """

    mode: str
    base: dict
    axes: dict
    recipes: list
    tables: list


def plan(base: Mapping[str, str], axes: Mapping[str, Sequence[str]], one_axis: bool) -> Plan:
    """The :class:`Plan` for the run's recipe ``base`` and the swept ``axes`` (``{axis: values}``)."""
    swept = {a: list(axes[a]) for a in AXES if axes.get(a)}
    recipes: list[dict] = []

    def index(recipe: dict) -> int:
        if recipe not in recipes:
            recipes.append(recipe)
        return recipes.index(recipe)

    tables = []
    if one_axis:
        for axis, values in swept.items():
            tables.append((axis, [index({**base, axis: v}) for v in values]))
    else:
        lists = [swept.get(a) or [base[a]] for a in AXES]
        every = [index({**base, **dict(zip(AXES, combo))}) for combo in itertools.product(*lists)]
        tables = [(axis, every) for axis in swept]
    return Plan("one-axis" if one_axis else "product", dict(base), swept, recipes, tables)


def recipe_config(cfg, recipe: Mapping[str, str]):
    """``cfg`` (a :class:`~mtlue_fast.config.RunConfig`) with the victims of ``recipe``; the
    surrogate's settings are untouched, so the export stays the same."""
    victims = dataclasses.replace(cfg.victims, backbone=recipe["backbone"], weighting=recipe["weighting"])
    return dataclasses.replace(cfg, victims=victims, victim=recipe["victim"], defense=recipe["defense"])
