"""Sample-wise PGD baselines: the bound, the objective moves the right way, EM's resumable state."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from mtlue_fast.data import open_cache
from mtlue_fast.ue.export import write_protected
from mtlue_fast.ue.objectives import Objective
from mtlue_fast.ue.pgd import em_pgd, pgd, pgd_perturb

sys.path.insert(0, str(Path(__file__).parent))
from test_generate import CROP, cache_dir, surrogate  # noqa: E402
from test_train import CLASSES, make_cache  # noqa: E402

EPS = 8 / 255


def test_pgd_stays_in_the_budget_and_lowers_its_objective():
    fake = make_cache(8, 0)
    images, labels = torch.from_numpy(fake.images), torch.from_numpy(fake.labels)
    model = surrogate().eval().requires_grad_(False)
    objective = Objective("tap", CLASSES)
    delta = pgd(images, labels, [model], objective, eps=EPS, crop=CROP, steps=5)
    x = images.float() / 255
    assert delta.abs().max() <= EPS + 1e-7
    assert ((x + delta) >= 0).all() and ((x + delta) <= 1 + 1e-6).all()

    def objective_at(d):
        top = (36 - 32) // 2
        return float(objective.loss(model((x + d).clamp(0, 1)[..., top : top + 32, top : top + 32]), labels))

    assert objective_at(delta) < objective_at(torch.zeros_like(delta))


def test_tap_pgd_exports_through_write_protected(tmp_path):
    clean = open_cache(cache_dir(tmp_path / "clean", 16, 0))
    perturb = pgd_perturb(surrogate(), Objective("tap", CLASSES), eps=EPS, crop=CROP, steps=2)
    protected = write_protected(clean, tmp_path / "protected", perturb, method="tap-pgd", eps=EPS, batch_size=8, progress=False)
    delta = np.asarray(protected.images).astype(np.int16) - np.asarray(clean.images)
    assert 0 < np.abs(delta).max() <= 8


def test_em_pgd_runs_resumes_and_reads_back(tmp_path):
    clean = open_cache(cache_dir(tmp_path / "clean", 32, 0))
    kwargs = dict(steps=2, train_steps=2, batch_size=16, stop_subset=16, progress=False)
    perturb = em_pgd(clean, tmp_path / "em", surrogate(), max_passes=2, **kwargs)
    state = np.load(tmp_path / "em" / "delta_state.npy")
    assert state.dtype == np.int8 and np.abs(state).max() <= 127 and np.abs(state).max() > 0
    stamp = (tmp_path / "em" / "delta_state.npy").stat().st_mtime_ns
    again = em_pgd(clean, tmp_path / "em", surrogate(), max_passes=2, **kwargs)  # finished: read back
    assert (tmp_path / "em" / "delta_state.npy").stat().st_mtime_ns == stamp
    rows = torch.arange(4)
    images = torch.from_numpy(np.array(clean.images[:4]))
    delta = again(images, None, rows)
    torch.testing.assert_close(delta, perturb(images, None, rows))
    assert delta.abs().max() <= EPS + 1e-7
