"""Synthetic ChestX-ray14: 14 correlated findings drawn on random chest radiographs as opacities or
lucencies of distinct shape, size, texture and side, written as ``images/*.png`` (a few RGBA, as in
the release), ``Data_Entry_2017_v2020.csv`` and the patient-disjoint ``train_val_list.txt`` /
``test_list.txt``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from ..specs import CHESTXRAY_FINDINGS
from .drawing import _Pattern, _draw, _ellipse, _finish, _grid, _smooth_noise, _strength
from .streams import _LABELS, _META, _latent_binary, _loadings, _rng, _write_chunks

#: Positive rate per finding (real ChestX-ray14 rates, the rarest raised to 2% so they can be learned).
CHESTXRAY_PREVALENCE: dict[str, float] = {
    "Atelectasis": 0.10, "Cardiomegaly": 0.03, "Effusion": 0.12, "Infiltration": 0.17, "Mass": 0.05,
    "Nodule": 0.056, "Pneumonia": 0.02, "Pneumothorax": 0.047, "Consolidation": 0.042, "Edema": 0.021,
    "Emphysema": 0.022, "Fibrosis": 0.02, "Pleural_Thickening": 0.03, "Hernia": 0.02,
}  # fmt: skip


_CHEST_FACTORS: dict[str, dict[str, float]] = {
    "illness": {f: 0.3 for f in CHESTXRAY_FINDINGS},
    "fluid": {"Effusion": 0.55, "Atelectasis": 0.45, "Edema": 0.5, "Consolidation": 0.45, "Pneumonia": 0.4,
              "Infiltration": 0.4, "Cardiomegaly": 0.35},
    "tumour": {"Mass": 0.55, "Nodule": 0.5, "Pleural_Thickening": 0.3},
    "chronic": {"Emphysema": 0.5, "Fibrosis": 0.5, "Pneumothorax": 0.4, "Pleural_Thickening": 0.4, "Hernia": 0.2},
}  # fmt: skip

# Multiplies every finding's amplitude below. Calibrated with the package's own victim (ResNet-18 at
# width 0.25, 64x64 cache, random crop 56, 14 epochs, batch 128, 10,000 training images): mean AUC 0.89
# (1.0x gave 0.60-0.71, 2.0x 0.84). The per-finding ratios are the ridge-calibrated ones.
_CHEST_AMP_SCALE = 2.5

# Each finding's look, coordinates relative to the whole image (lungs at x ~0.3 and ~0.7).
# mirror=True: the finding appears on a random side. Colour +1 = opacity (brighter), -1 = lucency.
_CHEST_PATTERNS: dict[str, _Pattern] = {
    "Atelectasis": _Pattern(
        0.62, 0.30, 0.11, "rect", "flat",
        aspect=4.0, angle=-0.35, color=(1.0,), amp=0.068, jitter=0.04, mirror=True,
    ),
    "Cardiomegaly": _Pattern(
        0.60, 0.56, 0.17, "disc", "rings",
        freq=1.0, mix=0.3, color=(1.0,), amp=0.068, jitter=0.02,
    ),
    "Effusion": _Pattern(
        0.75, 0.27, 0.13, "ellipse", "flat",
        aspect=2.2, angle=0.25, color=(1.0,), amp=0.068, jitter=0.03, mirror=True,
    ),
    "Infiltration": _Pattern(
        0.45, 0.30, 0.15, "gauss", "dots",
        freq=3.0, mix=0.8, color=(1.0,), amp=0.086, jitter=0.06, mirror=True,
    ),
    "Mass": _Pattern(0.40, 0.30, 0.08, "disc", "flat", color=(1.0,), amp=0.065, jitter=0.08, mirror=True),
    "Nodule": _Pattern(0.38, 0.68, 0.04, "disc", "flat", color=(1.0,), amp=0.086, jitter=0.10, mirror=True),
    "Pneumonia": _Pattern(
        0.52, 0.32, 0.13, "gauss", "rings",
        freq=1.5, mix=0.6, color=(1.0,), amp=0.109, jitter=0.05, mirror=True,
    ),
    "Pneumothorax": _Pattern(
        0.25, 0.20, 0.14, "ellipse", "flat",
        aspect=3.0, angle=1.2, color=(-1.0,), amp=0.054, jitter=0.03, mirror=True,
    ),
    "Consolidation": _Pattern(
        0.58, 0.70, 0.08, "square", "flat",
        color=(1.0,), amp=0.05, jitter=0.05, spin=0.4, mirror=True,
    ),
    "Edema": _Pattern(
        0.45, 0.50, 0.25, "ellipse", "grating",
        freq=3.0, tex_angle=math.pi / 2, aspect=2.2, mix=0.7, color=(1.0,), amp=0.056, jitter=0.02,
    ),
    "Emphysema": _Pattern(
        0.35, 0.30, 0.16, "ellipse", "checker",
        freq=3.0, aspect=1.4, angle=math.pi / 2, mix=0.5, color=(-1.0,), amp=0.052, jitter=0.03, mirror=True,
    ),
    "Fibrosis": _Pattern(
        0.30, 0.68, 0.11, "diamond", "grating",
        freq=3.5, angle=0.8, mix=0.9, color=(1.0,), amp=0.08, jitter=0.04, mirror=True,
    ),
    "Pleural_Thickening": _Pattern(
        0.45, 0.15, 0.17, "rect", "flat",
        aspect=5.0, angle=math.pi / 2, color=(1.0,), amp=0.084, jitter=0.02, mirror=True,
    ),
    "Hernia": _Pattern(0.80, 0.50, 0.07, "ring", "flat", color=(1.0,), amp=0.115, jitter=0.03),
}  # fmt: skip


def _chest_background(rng: np.random.Generator, b: int, h: int, w: int) -> np.ndarray:
    """Random frontal chest radiographs ``[b, h, w, 1]`` in [0, 1] (no findings): dark surround,
    bright torso, dark lungs with ribs, bright spine, heart and diaphragm, exposure variation."""
    y, x = _grid(h, w)
    yr, xr = y / h, x / w
    img = np.broadcast_to(rng.uniform(0.03, 0.12, (b, 1, 1)).astype(np.float32), (b, h, w)).copy()
    cx = 0.5 + rng.uniform(-0.03, 0.03, b)
    torso = _ellipse(
        h, w, (0.56 + rng.uniform(-0.02, 0.02, b)) * h, cx * w, 0.55 * h * np.ones(b), rng.uniform(0.42, 0.48, b) * w, soft=4.0
    )
    img += torso * rng.uniform(0.45, 0.6, (b, 1, 1)).astype(np.float32)
    lung_y = (0.46 + rng.uniform(-0.03, 0.03, b)) * h
    lung_ay, lung_ax = rng.uniform(0.27, 0.33, b) * h, rng.uniform(0.15, 0.19, b) * w
    lungs = np.maximum(
        _ellipse(h, w, lung_y, (cx - 0.2) * w, lung_ay, lung_ax, soft=3.0),
        _ellipse(h, w, lung_y, (cx + 0.2) * w, lung_ay, lung_ax, soft=3.0),
    )
    ribs = 0.5 + 0.5 * np.cos(
        2 * math.pi * (yr * rng.uniform(7, 9, (b, 1, 1)) + 2.0 * (xr - 0.5) ** 2) + rng.uniform(0, 6.3, (b, 1, 1))
    )
    img -= lungs * (rng.uniform(0.28, 0.36, (b, 1, 1)) - 0.07 * ribs).astype(np.float32)
    spine = np.exp(-(((x - cx[:, None, None] * w) / (0.045 * w)) ** 2)) * (yr > 0.05)
    img += 0.18 * spine.astype(np.float32)
    heart = _ellipse(
        h, w, 0.6 * h * np.ones(b), (cx + 0.05) * w, rng.uniform(0.1, 0.13, b) * h, rng.uniform(0.11, 0.14, b) * w, soft=3.0
    )
    img += 0.15 * heart
    dome = (yr > 0.8 + 0.08 * ((xr - 0.5) * 2.2) ** 2 + rng.uniform(-0.03, 0.03, (b, 1, 1))).astype(np.float32)
    img += 0.2 * dome * torso
    img += 0.04 * _smooth_noise(rng, b, h, w, 1, 6)[..., 0]
    img = img * rng.uniform(0.85, 1.15, (b, 1, 1)).astype(np.float32)
    return img[..., None].astype(np.float32)


def _chest_images(rng: np.random.Generator, labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """X-rays uint8 ``[b, H, W]`` for 0/1 ``labels`` ``[b, 14]``."""
    h, w = hw
    region = (0.0, 0.0, float(h), float(w))
    patterns = [_CHEST_PATTERNS[f] for f in CHESTXRAY_FINDINGS]
    pad = max(p.half_window(min(h, w)) for p in patterns) + 1
    b = len(labels)
    canvas = np.zeros((b, h + 2 * pad, w + 2 * pad, 1), np.float32)
    canvas[:, pad : pad + h, pad : pad + w] = _chest_background(rng, b, h, w)
    for k, pattern in enumerate(patterns):
        which = np.flatnonzero(labels[:, k])
        _draw(canvas, pad, region, pattern, which, _strength(rng, which.size, pattern.amp * _CHEST_AMP_SCALE), rng)
    return _finish(canvas, pad, rng, 0.02)[..., 0]


def _chest_patients(rng: np.random.Generator, n: int) -> list[int]:
    """Follow-up counts of the patients covering exactly ``n`` images (geometric plus a heavy tail, mean ~3)."""
    counts: list[int] = []
    while sum(counts) < n:
        extra = int(rng.integers(1, 12)) if rng.random() < 0.15 else 0  # a few patients with many visits
        counts.append(int(rng.geometric(0.5)) + extra)
    counts[-1] -= sum(counts) - n
    return counts


def _write_chestxray(root: Path, n_train: int, n_test: int, seed: int, hw: tuple[int, int]):
    meta = _rng(seed, "chestxray", "train", _META)
    counts = {split: _chest_patients(meta, n) for split, n in (("train", n_train), ("test", n_test))}
    n_patients = len(counts["train"]) + len(counts["test"])
    ids = np.sort(meta.choice(np.arange(1, max(30806, 3 * n_patients)), n_patients, replace=False))
    owner = meta.permutation(np.array(["train"] * len(counts["train"]) + ["test"] * len(counts["test"])))
    patients = {"train": list(ids[owner == "train"]), "test": list(ids[owner == "test"])}
    (root / "images").mkdir()
    rows: list[tuple[str, str]] = []
    truth: dict[str, dict[str, np.ndarray]] = {"train": {}, "test": {}}
    sizes = ((2500, 2048), (2048, 2500), (3056, 2544), (2992, 2991), (2021, 2021), (2500, 2500), (3056, 2544))
    spacings = (0.143, 0.168, 0.139, 0.171, 0.194311, 0.1395)
    for split in ("train", "test"):
        names, info = [], []
        for pid, count in zip(patients[split], counts[split]):
            age = int(np.clip(meta.normal(47.0, 17.0), 1, 94))
            sex = "M" if meta.random() < 0.56 else "F"
            for follow_up in range(count):
                names.append(f"{pid:08d}_{follow_up:03d}.png")
                width, height = sizes[int(meta.integers(len(sizes)))]
                spacing = spacings[int(meta.integers(len(spacings)))]
                view = "PA" if meta.random() < 0.6 else "AP"
                info.append((follow_up, int(pid), min(age + follow_up // 3, 95), sex, view, width, height, spacing))
        names_info = sorted(zip(names, info))
        names = [x[0] for x in names_info]
        labels = _latent_binary(
            _rng(seed, "chestxray", split, _LABELS), len(names),
            np.array([CHESTXRAY_PREVALENCE[f] for f in CHESTXRAY_FINDINGS]), _loadings(CHESTXRAY_FINDINGS, _CHEST_FACTORS),
        ).astype(np.int64)  # fmt: skip
        rgba = set(meta.choice(len(names), max(1, round(0.02 * len(names))), replace=False).tolist())

        def save(array: np.ndarray, j: int, names=names, rgba=rgba) -> None:
            if j in rgba:  # the release's quirk: a few PNGs are RGBA (gray in RGB, opaque alpha)
                array = np.concatenate([np.repeat(array[..., None], 3, -1), np.full(array.shape + (1,), 255, np.uint8)], -1)
                image = Image.fromarray(array, "RGBA")
            else:
                image = Image.fromarray(array, "L")
            image.save(root / "images" / names[j], format="PNG", compress_level=6, optimize=False)

        _write_chunks(seed, "chestxray", split, labels, lambda rng, lab: _chest_images(rng, lab, hw), save)
        for (name, (follow_up, pid, age, sex, view, width, height, spacing)), row in zip(names_info, labels):
            findings = sorted(CHESTXRAY_FINDINGS[k] for k in np.flatnonzero(row))
            text = "|".join(findings) if findings else "No Finding"
            fields = (name, text, follow_up, pid, age, sex, view, width, height, repr(spacing), repr(spacing))
            rows.append((name, ",".join(str(f) for f in fields)))
            truth[split][f"images/{name}"] = row.copy()
        (root / ("train_val_list.txt" if split == "train" else "test_list.txt")).write_text(
            "".join(n + "\n" for n in names), encoding="ascii", newline="\n"
        )
    header = (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
        "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
    )
    body = "".join(r + "\n" for _, r in sorted(rows))
    (root / "Data_Entry_2017_v2020.csv").write_text(header + "\n" + body, encoding="ascii", newline="\n")
    return truth
