"""Two independent victim trainings on a CPU: one after another with every thread, against side by
side in two processes sharing the threads (what the victim stage does, ``victims.processes``).

Run:  pytest bench/bench_side_by_side.py --benchmark-json bench/results/<name>.json
      python bench/summarize.py bench/results/<name>.json

The synthetic CelebA default's victim at smaller sizes: ResNet-18 at width 0.25, batch 128, crop
64 of 70x70 uint8 images, 40 binary tasks, evaluated on 512 images after every epoch; ``small``: 3
epochs of 2,048 images (6,144 seen), where starting two processes costs more than it gains;
``threshold``: 5 epochs of 4,096 (20,480 seen, ``AUTO_MIN_IMAGES``, the smallest training that
``victims.processes=auto`` puts side by side). The synthetic default's victims see 160,000. A round is the whole pair, process start-up included (the side-by-side
round pays two spawned processes' imports, as the victim stage does); each round trains into fresh
folders. CPU only: a GPU trains the victims one after another.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from mtlue_fast.data.cache import open_cache
from mtlue_fast.train import TrainConfig, train
from mtlue_fast.train.side_by_side import TrainJob, train_side_by_side

NUM_TASKS, TEST_IMAGES = 40, 512
SIZES = {"small": (2048, 3), "threshold": (4096, 5)}  # images, epochs


def write_cache(folder, n: int, seed: int):
    """A complete cache entry (what :func:`mtlue_fast.data.open_cache` reads) of random CelebA-shaped data."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    np.save(folder / "images.npy", rng.integers(0, 256, (n, 3, 70, 70), dtype=np.uint8))
    np.save(folder / "labels.npy", (rng.random((n, NUM_TASKS)) < 0.3).astype(np.int64))
    manifest = {"dataset": "bench", "task_names": [f"t{k}" for k in range(NUM_TASKS)], "num_classes": [2] * NUM_TASKS,
                "source_digest": f"bench-{seed}-{n}"}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("side-by-side")
    test = write_cache(root / "test", TEST_IMAGES, 1)
    return {name: (write_cache(root / name, images, 0), test, root / f"runs-{name}") for name, (images, _) in SIZES.items()}


def jobs(caches, size: str, round_number: int) -> list[TrainJob]:
    train_cache, test_cache, root = caches[size]
    config = TrainConfig(width=0.25, batch_size=128, epochs=SIZES[size][1], progress=False)
    return [TrainJob(train_cache, test_cache, root / f"round-{round_number}" / f"seed-{seed}", config.replace(seed=seed), (64, 64))
            for seed in (1, 2)]  # fmt: skip


@pytest.mark.parametrize("schedule", ["one-after-another", "side-by-side"])
@pytest.mark.parametrize("size", list(SIZES))
def test_victim_pair(benchmark, caches, bench_device, size, schedule):
    if bench_device.type != "cpu":
        pytest.skip("side by side is a CPU schedule")
    threads = torch.get_num_threads()
    if schedule == "side-by-side" and threads < 2:
        pytest.skip("side by side needs at least 2 threads")
    rounds = itertools.count()

    def once():
        pair = jobs(caches, size, next(rounds) + (100 if schedule == "side-by-side" else 0))
        if schedule == "side-by-side":
            train_side_by_side(pair, 2, threads // 2, log=lambda text: None)
        else:
            for job in pair:
                train(open_cache(job.train_cache), open_cache(job.test_cache), job.out_dir, job.config, crop=job.crop)

    images, epochs = SIZES[size]
    benchmark.extra_info.update({"threads": threads, "images": images, "epochs": epochs, "trainings": 2})
    benchmark.pedantic(once, rounds=3, iterations=1, warmup_rounds=0)
