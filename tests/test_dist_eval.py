"""Data-parallel evaluation (gloo on the CPU): each rank evaluates its shard, the metrics merge.

The evaluation shard (``DeviceBatches(..., pad=False)``) holds each sample exactly once over the
ranks (single-process test of the shard logic). With 2 and 3 spawned processes (37 samples, which
neither divides), ``merge_ranks`` makes every rank's ``compute()`` what one process computes over all
the samples: classification accuracy (binary and multi-class tasks, with and without AUC) and the
NYUv2 dense metrics; ``evaluate`` over ``make_batches``' test shard gives the single process's
metrics, and so does the generator loop's stop test.

The single-process reference runs in a spawned process of its own, with one thread like each rank
(see tests/test_dist.py's module docstring: kernels depend on the thread count). Every batch that a
rank feeds to a metric or a model is one that the reference also feeds, with the same shape, so the
per-batch values are bitwise the same; what the merge adds is sums in another order and the AUC's
scores gathered in another order. Integer counts and the AUC (rank-based, ties averaged, a float64
sum of half-integers: exact) are compared exactly; only float64 sums get a tolerance.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mtlue_fast import dist
from mtlue_fast.data.loader import DeviceBatches
from mtlue_fast.mtl.metrics import ClassificationMetrics, DenseMetrics

sys.path.insert(0, str(Path(__file__).parent))

from test_dist import spawn  # noqa: E402

N = 37  # samples: divisible by neither world size
CHUNK = 5  # samples per metric update (the last chunk of 2)
CLASSIFICATION_CASES = [  # (num_classes, auc, samples): the last leaves ranks without any update
    ((2, 3, 2, 4), False, N),
    ((2, 3, 2, 4), True, N),
    ((2, 2), True, N),
    ((3, 4), False, N),
    ((2, 3), True, 2),
]


# ---------------------------------------------------------------------------- inputs


def _classification_inputs(seed: int, num_classes: tuple[int, ...], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits on a 0.25 grid (many tied scores, the AUC's hard case) and labels of every class."""
    gen = torch.Generator().manual_seed(seed)
    width = sum(1 if c == 2 else c for c in num_classes)
    logits = (torch.randn(n, width, generator=gen) * 4).round() / 4
    labels = torch.stack([torch.randint(0, c, (n,), generator=gen) for c in num_classes], 1)
    return logits, labels


def _dense_inputs(seed: int, n: int, classes: int = 5, size: int = 6) -> tuple[dict, dict]:
    gen = torch.Generator().manual_seed(seed)
    outputs = {
        "segmentation": torch.randn(n, classes, size, size, generator=gen),
        "depth": torch.rand(n, 1, size, size, generator=gen) * 5,
        "normal": torch.randn(n, 3, size, size, generator=gen),
    }
    seg = torch.randint(-1, classes, (n, size, size), generator=gen)  # -1: ignored
    depth = torch.rand(n, 1, size, size, generator=gen) * 5
    depth[torch.rand(depth.shape, generator=gen) < 0.2] = 0  # missing
    normal = torch.nn.functional.normalize(torch.randn(n, 3, size, size, generator=gen), dim=1)
    normal[:, :, torch.rand(size, size, generator=gen) < 0.2] = 0  # missing
    return outputs, {"seg": seg, "depth": depth, "normal": normal}


def _my_chunks(n: int) -> list[slice]:
    """This rank's share of the CHUNK-sample updates: chunks r, r + w, ... (all for one process)."""
    place = dist.info()
    return [slice(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)][place.rank :: place.world_size]


class _IntegerModel(nn.Module):
    """Logits that are integers computed exactly in float32 (uint8 pixel values times weights in
    {-1, 0, 1}, sums below 2^24), so they do not depend on the batch they are computed in."""

    def __init__(self, pixels: int, outputs: int):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randint(-1, 2, (pixels, outputs), generator=gen).float(), requires_grad=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 255).round().flatten(1)

    def decode(self, z: torch.Tensor, size) -> torch.Tensor:
        return z @ self.weight - 76.5 * self.weight.sum(0)  # about centred: make_cache's pixels average ~76


# ---------------------------------------------------------------------------- the job


def _eval_job(rank: int, out: str, seed: int) -> None:
    from test_generate import FAST_GEN, surrogate
    from test_train import make_cache

    from mtlue_fast.train import TrainConfig, evaluate, make_batches, select_tasks
    from mtlue_fast.train.victim import model_args
    from mtlue_fast.models import build_model
    from mtlue_fast.ue.generate import build_generator, generator_args, stop_test
    from mtlue_fast.ue.objectives import Objective

    place = dist.info()
    result: dict = {"classification": [], "shard": None}
    for i, (num_classes, auc, n) in enumerate(CLASSIFICATION_CASES):
        logits, labels = _classification_inputs(seed + i, num_classes, n)
        metrics = ClassificationMetrics(num_classes, auc=auc)
        for part in _my_chunks(n):
            metrics.update(logits[part], labels[part])
        metrics.merge_ranks()
        result["classification"].append(metrics.compute())

    outputs, labels = _dense_inputs(seed, N)
    dense = DenseMetrics(5, angle_bin_deg=0.5)
    for part in _my_chunks(N):
        dense.update({k: v[part] for k, v in outputs.items()}, {k: v[part] for k, v in labels.items()})
    dense.merge_ranks()
    result["dense"] = dense.compute()

    view = select_tasks(make_cache(N, seed % 1000), None, (8, 8))
    shard = DeviceBatches(view.images, view.labels, 4, crop=view.crop, train=False, rank=place.rank,
                          world_size=place.world_size, pad=False, with_indices=True)  # fmt: skip
    result["shard"] = [int(i) for _images, _labels, index in shard for i in index]
    # evaluate(): this rank's test shard from make_batches (batches of 4: 10, 10 / 7, 7, 7 per rank's
    # share of 37), an exact model, so the batch a sample falls in cannot change its logits.
    batches = make_batches(view, TrainConfig(batch_size=4), "cpu", train=False)
    integer = _IntegerModel(3 * 8 * 8, 5)
    result["evaluate_exact"] = evaluate(integer, batches, ClassificationMetrics(view.num_classes, auc=True))

    # evaluate() of a ResNet with synchronised batch norms (eval mode: no collective, so the ranks'
    # batch counts may differ) in batches of one sample, each computed as the single process does.
    config = TrainConfig(width=0.25, batch_size=1, channels_last=False, amp=False)
    view32 = select_tasks(make_cache(N, seed % 1000), None, (32, 32))
    torch.manual_seed(seed)
    model = dist.convert_sync_batchnorm(build_model(**model_args(view32, config)), "cpu").eval()
    batches = make_batches(view32, config, "cpu", train=False)
    result["evaluate_resnet"] = evaluate(model, batches, ClassificationMetrics(view32.num_classes, auc=True))

    # The generator loop's stop test: rank r runs the batches r, r + w, ... of the single process's.
    gen_config = FAST_GEN.replace(base="tap", batch_size=8, amp=False, stop_subset=N - 4)
    torch.manual_seed(seed)
    generator = build_generator(**generator_args(view32, gen_config))
    objective = Objective("tap", view32.num_classes, protected=generator.protected_tasks)
    subset = np.random.default_rng([seed, 7]).permutation(N)[: gen_config.stop_subset]
    result["stop_error"] = stop_test(generator, [surrogate().eval()], objective, view32, subset, gen_config,
                                     (32, 32), torch.device("cpu"), False)  # fmt: skip
    Path(f"{out}.{rank}.json").write_text(json.dumps(result))


def _same(got, want, rtol: float = 0.0, path: str = "") -> None:
    """Equal (NaN equal to NaN), floats within ``rtol`` relative."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for key in want:
            _same(got[key], want[key], rtol, f"{path}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, rtol, f"{path}[{i}]")
    elif isinstance(want, float) and isinstance(got, float):
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=rtol, abs=0), (path, got, want)
    else:
        assert got == want, (path, got, want)


@pytest.mark.parametrize("world", [2, 3])
def test_data_parallel_evaluation_equals_one_process(tmp_path, world):
    seed = int.from_bytes(os.urandom(4), "little") % 2**31
    spawn(_eval_job, str(tmp_path / "many"), seed, world=world, reference=(str(tmp_path / "one"), seed))
    one = json.loads((tmp_path / "one.0.json").read_text())
    ranks = [json.loads((tmp_path / f"many.{r}.json").read_text()) for r in range(world)]
    # The evaluation shard: every sample on exactly one rank, counts within one of each other.
    shards = [r.pop("shard") for r in ranks]
    assert sorted(i for s in shards for i in s) == list(range(N)), f"seed {seed}"
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert one.pop("shard") == list(range(N))
    for rank, got in enumerate(ranks):
        where = f"seed {seed}, rank {rank} of {world}"
        # Counts, accuracies, AUCs (scores gathered in rank order: the AUC depends only on the
        # multiset of (score, label) pairs) and the stop error (integer error counts) are exact.
        _same(got["classification"], one["classification"], path=where)
        _same(got["evaluate_exact"], one["evaluate_exact"], path=where)
        _same(got["evaluate_resnet"], one["evaluate_resnet"], path=where)
        assert got["stop_error"] == one["stop_error"], where
        # The dense metrics' float64 sums (depth errors, angle sum) add the same per-batch sums in
        # another order (each rank's, then across ranks): they may differ in the last bits, a
        # relative 1e-15 or so for these ~8 terms; 1e-12 leaves a wide margin and still catches a
        # missing or doubled rank (an O(1) change). Everything else in them comes from integer counts.
        _same(got["dense"], one["dense"], rtol=1e-12, path=where)
    assert not math.isnan(one["stop_error"]) and one["evaluate_resnet"]["auc"][0] is not None


# ---------------------------------------------------------------------------- single process


def _indices(batches: DeviceBatches) -> list[int]:
    batches.set_epoch(0)
    return [int(i) for _images, _labels, index in batches for i in index]


@pytest.mark.parametrize("n", [1, 2, 37, 40])
def test_evaluation_shard_holds_each_sample_once(n):
    rng = np.random.default_rng()
    images = rng.integers(0, 256, (n, 3, 6, 5), dtype=np.uint8)
    labels = rng.integers(0, 2, (n, 2))
    common = dict(crop=(4, 3), train=False, with_indices=True)
    for shuffle in (False, True):
        # One process: the order of today's (padded) test batches.
        alone = DeviceBatches(images, labels, 4, shuffle=shuffle, seed=3, pad=False, **common)
        assert _indices(alone) == _indices(DeviceBatches(images, labels, 4, shuffle=shuffle, seed=3, **common))
        for world in (2, 3, 5):
            shards = [DeviceBatches(images, labels, 4, shuffle=shuffle, seed=3, rank=r, world_size=world, pad=False, **common)
                      for r in range(world)]  # fmt: skip
            seen = [_indices(s) for s in shards]
            assert sorted(i for part in seen for i in part) == list(range(n)), (n, world, shuffle)
            # Rank r holds positions r, r + w, ... of the single process's order.
            whole = _indices(alone)
            assert all(part == whole[r::world] for r, part in enumerate(seen))
            assert [s.num_samples for s in shards] == [len(part) for part in seen]
            assert [len(s) for s in shards] == [-(-len(part) // 4) for part in seen]
            for s in shards:  # the right pixels and labels, centre window
                for batch_images, batch_labels, index in s:
                    assert torch.equal(batch_images, torch.from_numpy(images[index.numpy()][:, :, 1:5, 1:4]))
                    assert torch.equal(batch_labels, torch.from_numpy(labels[index.numpy()]))
    # Padded (training) shards, for contrast: equal counts, wrapped samples seen twice.
    padded = [DeviceBatches(images, labels, 4, rank=r, world_size=3, **common) for r in range(3)]
    assert len({p.num_samples for p in padded}) == 1 and sum(p.num_samples for p in padded) == 3 * -(-n // 3)
    # drop_last never pads: pad=False changes nothing there.
    for r in range(3):
        kept = dict(drop_last=True, rank=r, world_size=3, **common)
        assert _indices(DeviceBatches(images, labels, 1, pad=False, **kept)) == _indices(DeviceBatches(images, labels, 1, **kept))


def test_unpadded_shard_with_random_scales_plans_every_sample():
    images = np.zeros((11, 3, 8, 8), dtype=np.uint8)
    labels = {"seg": np.zeros((11, 8, 8), dtype=np.int64)}
    for r in range(3):
        shard = DeviceBatches(images, labels, 2, crop=(6, 6), rank=r, world_size=3, pad=False, scales=(1.0, 1.5))
        plan, scales = shard.epoch_plan(0), shard.scale_plan(0)
        assert len(plan[0]) == shard.num_samples == len(range(r, 11, 3))
        assert all(len(part) == shard.num_samples for part in (*plan, *scales))
        assert sum(len(b[0]) for b in shard) == shard.num_samples


def test_merge_ranks_is_a_no_op_for_one_process():
    logits, labels = _classification_inputs(0, (2, 3), 9)
    metrics = ClassificationMetrics((2, 3), auc=True)
    metrics.update(logits, labels)
    before = metrics.compute()
    metrics.merge_ranks()
    assert metrics.compute() == before
    outputs, dense_labels = _dense_inputs(0, 3)
    dense = DenseMetrics(5)
    dense.update(outputs, dense_labels)
    before = dense.compute()
    dense.merge_ranks()
    _same(dense.compute(), before)
