"""Synthetic UTKFace: face chips named ``{age}_{gender}_{race}_{stamp}.jpg.chip.jpg`` under
``UTKFace/`` (plus two malformed names, as in the release); the age bin, race and gender each draw a
mark (a forehead band, a cheek mark, a chin mark).
"""

from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path

import numpy as np

from ..specs import UTKFACE_AGE_EDGES
from .drawing import _Pattern, _draw, _face_background, _face_pad, _finish, _paint, _save_jpeg, _strength
from .streams import _LABELS, _META, _rng, _write_chunks

#: UTKFace race shares (0 White, 1 Black, 2 Asian, 3 Indian, 4 Others).
UTKFACE_RACE_PREVALENCE = (0.42, 0.19, 0.15, 0.14, 0.10)


_UTK_FACE = (0.55, 0.5, 0.38, 0.34)
_UTK_AGE_COLORS = ((0.98, 0.85, 0.3), (0.2, 0.25, 0.55))  # paint: warm light (young) -> dark bluish (old)


def _utk_patterns() -> tuple[list[_Pattern], list[_Pattern], list[_Pattern]]:
    """(age bin patterns [9], race patterns [5], gender patterns [2]), relative to the whole image.

    Age: a forehead band whose wrinkle-like grating frequency rises and colour shifts with the bin.
    Race: a cheek mark (random side) with a per-class shape, texture and hue.
    Gender: a chin mark, stubble-like dark dots (0) or a bright warm arc (1).
    """
    n_age = len(UTKFACE_AGE_EDGES) + 1
    young, old = (np.array(c) for c in _UTK_AGE_COLORS)
    age = [
        _Pattern(0.24, 0.5, 0.16, "rect", "grating", freq=0.8 + 0.55 * b, tex_angle=math.pi / 2, aspect=2.8, mix=0.6,
                 color=tuple(float(c) for c in young + (old - young) * b / (n_age - 1)), amp=0.35, jitter=0.025, spin=0.08,
                 blend=True)
        for b in range(n_age)
    ]  # fmt: skip
    race_look = (("disc", "flat", 0.0, 0.02), ("square", "grating", 2.0, 0.2), ("diamond", "dots", 2.5, 0.4),
                 ("tri", "rings", 1.5, 0.6), ("ring", "checker", 2.5, 0.8))  # fmt: skip
    race = [
        _Pattern(0.55, 0.25, 0.09, shape, texture, freq=freq, mix=0.5, color=_paint(hue, 1.0 if c % 2 else -1.0),
                 amp=0.25, jitter=0.025, mirror=True, blend=True)
        for c, (shape, texture, freq, hue) in enumerate(race_look)
    ]  # fmt: skip
    gender = [
        _Pattern(0.84, 0.5, 0.11, "ellipse", "dots", freq=3.0, aspect=1.6, mix=0.8, color=(0.12, 0.1, 0.08), amp=0.24,
                 jitter=0.02, blend=True),
        _Pattern(0.84, 0.5, 0.11, "arc", "flat", color=(0.98, 0.5, 0.6), amp=0.24, jitter=0.02, blend=True),
    ]  # fmt: skip
    return age, race, gender


def _utk_ages(rng: np.random.Generator, n: int) -> np.ndarray:
    """Ages 1..100: ~10% infants/children (mostly 1-5), a bulk at 20-40, a tail to 100."""
    part = rng.choice(3, n, p=(0.12, 0.58, 0.30))
    child = np.minimum(1 + rng.geometric(0.3, n), 14)
    adult = np.rint(rng.normal(30.0, 7.0, n))
    older = np.rint(rng.normal(55.0, 16.0, n))
    return np.clip(np.choose(part, [child, adult, older]), 1, 100).astype(np.int64)


def _utk_labels(rng: np.random.Generator, n: int) -> np.ndarray:
    """int64 ``[n, 3]`` = (age in years, gender 0/1, race 0..4), mildly correlated."""
    age = _utk_ages(rng, n)
    p_female = np.where((age >= 18) & (age < 40), 0.55, 0.44)
    gender = (rng.random(n) < p_female).astype(np.int64)
    base = np.array(UTKFACE_RACE_PREVALENCE)
    child = base * np.array([0.8, 0.7, 1.2, 0.9, 2.2])  # "Others" is more common among children
    u = rng.random(n)
    race = np.where(
        age < 10,
        np.searchsorted(np.cumsum(child / child.sum()), u, side="right"),
        np.searchsorted(np.cumsum(base / base.sum()), u, side="right"),
    )
    return np.stack([age, gender, np.minimum(race, 4)], 1).astype(np.int64)


def _age_bin(age: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.array(UTKFACE_AGE_EDGES), age, side="left")


def _utk_images(rng: np.random.Generator, tasks: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Face chips uint8 ``[b, H, W, 3]`` for ``tasks`` ``[b, 3]`` = (age bin, race, gender)."""
    h, w = hw
    region = (0.0, 0.0, float(h), float(w))
    age, race, gender = _utk_patterns()
    pad = max([p.half_window(min(h, w)) for p in age + race + gender] + [_face_pad(h, w, _UTK_FACE)]) + 1
    canvas = np.zeros((len(tasks), h + 2 * pad, w + 2 * pad, 3), np.float32)
    _face_background(rng, canvas, pad, _UTK_FACE)
    for column, patterns in enumerate((age, race, gender)):
        for c, pattern in enumerate(patterns):
            which = np.flatnonzero(tasks[:, column] == c)
            _draw(canvas, pad, region, pattern, which, _strength(rng, which.size, pattern.amp), rng)
    return _finish(canvas, pad, rng, 0.035)


def _utk_stamps(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct 17-digit ``yyyymmddHHMMSSfff`` time stamps between 2016-12-19 and 2017-01-20."""
    start = _dt.datetime(2016, 12, 19)
    span_ms = 32 * 24 * 3600 * 1000
    offsets = rng.choice(span_ms, n, replace=False)
    out = []
    for ms in offsets.tolist():
        t = start + _dt.timedelta(milliseconds=ms)
        out.append(t.strftime("%Y%m%d%H%M%S") + f"{t.microsecond // 1000:03d}")
    return out


def _write_utkface(root: Path, n_train: int, n_test: int, seed: int, hw: tuple[int, int]):
    n = n_train + n_test
    labels = _utk_labels(_rng(seed, "utkface", "train", _LABELS), n + 2)
    stamps = _utk_stamps(_rng(seed, "utkface", "train", _META), n + 2)
    names = [f"{a}_{g}_{r}_{s}.jpg.chip.jpg" for (a, g, r), s in zip(labels[:n].tolist(), stamps[:n])]
    # the release's malformed names: the race field missing (one with an impossible gender 3)
    (a0, g0, _), (a1, _, _) = labels[n:].tolist()
    names += [f"{a0}_{g0}_{stamps[n]}.jpg.chip.jpg", f"{a1}_3_{stamps[n + 1]}.jpg.chip.jpg"]
    tasks = np.stack([_age_bin(labels[:, 0]), labels[:, 2], labels[:, 1]], 1)  # reader order: age bin, race, gender
    folder = root / "UTKFace"
    folder.mkdir()
    _write_chunks(
        seed, "utkface", "train", tasks, lambda rng, lab: _utk_images(rng, lab, hw),
        lambda array, i: _save_jpeg(array, folder / names[i]),
    )  # fmt: skip
    return {"train": {f"UTKFace/{name}": tasks[i].copy() for i, name in enumerate(names[:n])}, "test": {}}
