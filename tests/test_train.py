"""The training loop: learning, resume equals uninterrupted, STL, checkpoints, bad settings."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from mtlue_fast.models import BACKBONES
from mtlue_fast.train import TrainConfig, load_model, select_tasks, train, train_stl

TASKS = ("spot", "stripe", "shade")
CLASSES = (2, 2, 3)


@dataclass
class FakeCache:
    """A cache-shaped dataset: task k's label is drawn in its own visual pattern (learnable)."""

    images: np.ndarray
    labels: np.ndarray
    task_names: list
    num_classes: list
    manifest: dict


def make_cache(n: int, seed: int, size: int = 36, channels: int = 3, strength: float = 1.0) -> FakeCache:
    """``strength`` scales the patterns (1.0: obvious; ~0.2: subtle, as real features are)."""
    rng = np.random.default_rng(seed)
    labels = np.stack([rng.random(n) < 0.3, rng.random(n) < 0.5, rng.integers(0, 3, n)], 1).astype(np.int64)
    images = rng.normal(0.3, 0.08, (n, channels, size, size))
    half = size // 2
    images[labels[:, 0] == 1, :, 4:half - 4, 4:half - 4] += 0.45 * strength  # a bright square top-left
    images[labels[:, 1] == 1, :, half:, ::4] += 0.4 * strength  # vertical stripes in the bottom half
    images += (labels[:, 2] * 0.12 * strength)[:, None, None, None]  # overall brightness in three levels
    images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    digest = f"fake-{n}-{seed}-{size}-{channels}-{strength}"
    return FakeCache(images, labels, list(TASKS), list(CLASSES), {"dataset": None, "source_digest": digest})


FAST = dict(width=0.25, batch_size=32, epochs=4, lr=2e-3, progress=False)


def majority_rate(cache: FakeCache) -> np.ndarray:
    return np.array([np.bincount(cache.labels[:, k]).max() / len(cache.labels) for k in range(len(TASKS))])


def _learns(tmp_path, backbone: str, every_task: bool = True, **overrides):
    train_cache, test_cache = make_cache(384, 0), make_cache(160, 1)
    config = TrainConfig(backbone=backbone, **{**FAST, **overrides})
    result = train(train_cache, test_cache, tmp_path / backbone, config, crop=(32, 32))
    accuracy, majority = np.array(result.metrics["accuracy"]), majority_rate(test_cache)
    if every_task:
        assert np.all(accuracy > majority + 0.1), (accuracy, majority)
    else:  # well above on average, no task below its majority rate
        assert accuracy.mean() > majority.mean() + 0.1 and np.all(accuracy > majority - 0.02), (accuracy, majority)
    return result


def test_resnet18_learns_every_task(tmp_path):
    result = _learns(tmp_path, "resnet18")
    lines = (tmp_path / "resnet18" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    assert "test" in json.loads(lines[-1]) and result.history[-1]["images_per_second"] > 0
    assert (tmp_path / "resnet18" / "final.pt").exists() and (tmp_path / "resnet18" / "result.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("backbone", [b for b in BACKBONES if b != "resnet18"])
def test_every_backbone_learns_at_a_tiny_size(tmp_path, backbone):
    if backbone == "vit_b_16":  # a transformer on 384 images: slower to learn the small square
        _learns(tmp_path, backbone, every_task=False, epochs=8, lr=5e-4)
    else:
        _learns(tmp_path, backbone, epochs=6)


@pytest.mark.parametrize("name", ["uw", "pcgrad", "fairgrad"])
def test_weighting_strategies_train(tmp_path, name):
    _learns(tmp_path, "resnet18", weighting=name, epochs=5)


def test_resume_equals_uninterrupted(tmp_path):
    train_cache, test_cache = make_cache(96, 0), make_cache(32, 1)
    config = TrainConfig(**{**FAST, "epochs": 3}, weighting="rlw", deterministic=True, keep_every=2)
    straight = train(train_cache, test_cache, tmp_path / "straight", config, crop=(32, 32))

    class Interrupt(Exception):
        pass

    def stop_after_two(record):
        if record["epoch"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(train_cache, test_cache, tmp_path / "resumed", config, crop=(32, 32), on_epoch_end=stop_after_two)
    assert not (tmp_path / "resumed" / "final.pt").exists() and (tmp_path / "resumed" / "epoch_002.pt").exists()
    resumed = train(train_cache, test_cache, tmp_path / "resumed", config, crop=(32, 32))
    a = torch.load(tmp_path / "straight" / "final.pt")["model"]
    b = torch.load(tmp_path / "resumed" / "final.pt")["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.metrics == straight.metrics
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]


def test_finished_run_is_not_redone_and_changed_settings_are_refused(tmp_path):
    train_cache, test_cache = make_cache(64, 0), make_cache(32, 1)
    config = TrainConfig(**{**FAST, "epochs": 1})
    first = train(train_cache, test_cache, tmp_path, config, crop=(32, 32))
    stamp = (tmp_path / "final.pt").stat().st_mtime_ns
    again = train(train_cache, test_cache, tmp_path, config, crop=(32, 32))
    assert again.metrics == first.metrics and (tmp_path / "final.pt").stat().st_mtime_ns == stamp
    (tmp_path / "result.json").unlink()  # an unfinished run with other settings must not be mixed in
    with pytest.raises(ValueError, match="last.pt was written by a training run with different settings"):
        train(train_cache, test_cache, tmp_path, config.replace(lr=1e-2), crop=(32, 32))


def test_stl_trains_one_network_per_task(tmp_path):
    train_cache, test_cache = make_cache(256, 0), make_cache(96, 1)
    summary = train_stl(train_cache, test_cache, tmp_path, TrainConfig(**FAST), crop=(32, 32))
    assert summary["task_names"] == list(TASKS)
    for name in TASKS:
        stored = torch.load(tmp_path / f"task_{name}" / "final.pt")
        assert stored["model_args"]["tasks"] == [CLASSES[TASKS.index(name)]]
    assert len(summary["accuracy"]) == 3
    assert summary["mean_accuracy"] == pytest.approx(np.mean(summary["accuracy"]))
    assert np.all(np.array(summary["accuracy"]) > majority_rate(test_cache))


def test_auc_metric_and_keep_every(tmp_path):
    train_cache, test_cache = make_cache(64, 0), make_cache(48, 1)
    config = TrainConfig(**{**FAST, "epochs": 2}, metric="auc", keep_every=1)
    result = train(train_cache, test_cache, tmp_path, config, crop=(32, 32), tasks=["spot", "stripe"])
    assert result.task_names == ("spot", "stripe")
    assert len(result.metrics["auc"]) == 2 and "mean_auc" in result.metrics
    assert sorted(p.name for p in tmp_path.glob("epoch_*.pt")) == ["epoch_001.pt", "epoch_002.pt"]
    model = result.load_model()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 2)
    kept = load_model(tmp_path / "epoch_001.pt")
    assert not torch.equal(kept.head.weight, model.head.weight)  # epoch 1's weights, not the final ones


def test_select_tasks_checks_names_and_indices():
    cache = make_cache(8, 0)
    assert select_tasks(cache, ["shade", 0]).task_names == ("shade", "spot")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        select_tasks(cache, ["nope"])
    with pytest.raises(ValueError, match="out of range"):
        select_tasks(cache, [5])


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="'weighting' must be one of"):
        TrainConfig(weighting="magic")
    with pytest.raises(ValueError, match="'backbone'"):
        TrainConfig(backbone="resnet7")
    assert TrainConfig().milestone_epochs() == [36, 48]


def make_dense_cache(n: int, seed: int, size: int = 32) -> FakeCache:
    """NYUv2-shaped: segmentation = which of 4 brightness levels a pixel has, depth = brightness,
    normals = a fixed direction per class; some pixels unlabelled / without depth."""
    rng = np.random.default_rng(seed)
    level = rng.integers(0, 4, (n, 1, size // 8, size // 8)).repeat(8, 2).repeat(8, 3)  # 8x8 blocks
    images = np.clip(level * 0.25 + 0.1 + rng.normal(0, 0.03, (n, 3, size, size)), 0, 1)
    seg = level[:, 0].astype(np.int8)
    seg[rng.random(seg.shape) < 0.1] = -1
    depth = (1.0 + level).astype(np.float16)
    depth[rng.random(depth.shape) < 0.1] = 0
    directions = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0], [0.6, 0, 0.8]], dtype=np.float16)
    normal = directions[level[:, 0]].transpose(0, 3, 1, 2)
    labels = {"seg": seg, "depth": depth, "normal": np.ascontiguousarray(normal)}
    images = (images * 255).round().astype(np.uint8)
    manifest = {"dataset": "nyuv2", "source_digest": f"dense-{n}-{seed}"}
    return FakeCache(images, labels, ["segmentation", "depth", "normal"], [13, 1, 3], manifest)


def test_dense_mtl_and_stl_train(tmp_path):
    train_cache, test_cache = make_dense_cache(96, 0), make_dense_cache(16, 1)
    config = TrainConfig(backbone="resnet18", width=0.25, batch_size=8, epochs=8, lr=2e-3, schedule="step", step_size=6, progress=False)
    result = train(train_cache, test_cache, tmp_path / "mtl", config)
    metrics = result.metrics
    for key in ("miou", "pixel_accuracy", "depth_abs_error", "depth_rel_error", "normal_angle_mean", "normal_within_30"):
        assert np.isfinite(metrics[key]), key
    assert result.history[-1]["train_loss_mean"] < result.history[0]["train_loss_mean"]
    assert metrics["pixel_accuracy"] > 0.4  # four balanced levels: chance is 0.25
    assert [r["lr"] for r in result.history] == [2e-3] * 6 + [2e-4] * 2
    summary = train_stl(train_cache, test_cache, tmp_path / "stl", config.replace(epochs=1), tasks=["depth", "normal"])
    assert summary["task_names"] == ["depth", "normal"]
    assert np.isfinite(summary["tasks"]["depth"]["depth_abs_error"]) and np.isnan(summary["tasks"]["depth"]["miou"])


def test_fast_path_switches_run_on_cpu(tmp_path):
    """bf16 autocast, channels-last and host-side augmentation with per-step reads, on the CPU."""
    train_cache, test_cache = make_cache(64, 0), make_cache(32, 1)
    base = dict(FAST, epochs=1)
    fast = train(train_cache, test_cache, tmp_path / "fast", TrainConfig(**base, amp=True, channels_last=True), crop=(32, 32))
    naive = train(train_cache, test_cache, tmp_path / "naive", TrainConfig(**base, host_augment=True, sync_every_step=True), crop=(32, 32))
    for result in (fast, naive):
        assert np.all(np.isfinite(result.metrics["accuracy"]))


@pytest.mark.slow
@pytest.mark.parametrize("weighting", ["ew", "pcgrad"])
def test_compiled_model_trains(tmp_path, weighting):
    """pcgrad: the per-task gradients run through the heads, which stay eager (a compiled backward
    supports neither batched nor repeated backwards)."""
    train_cache, test_cache = make_cache(64, 0), make_cache(32, 1)
    config = TrainConfig(**dict(FAST, epochs=1), compile=True, weighting=weighting)
    result = train(train_cache, test_cache, tmp_path, config, crop=(32, 32))
    assert np.all(np.isfinite(result.metrics["accuracy"]))


def test_compile_is_refused_where_per_task_gradients_cross_the_backbone():
    with pytest.raises(ValueError, match="'compile' cannot be true with weighting 'gradnorm'"):
        TrainConfig(compile=True, weighting="gradnorm")
    with pytest.raises(ValueError, match="'compile' cannot be true with weighting 'mgda' with grad_space 'parameters'"):
        TrainConfig(compile=True, weighting="mgda", grad_space="parameters")
    TrainConfig(compile=True, weighting="pcgrad")  # representation space: the heads stay eager
    TrainConfig(compile=True, weighting="uw", grad_space="parameters")  # a loss weighting: one backward


def test_compile_modes_with_their_own_cuda_graphs_are_not_graphed_again():
    cuda = torch.device("cuda")
    for mode in ("reduce-overhead", "max-autotune"):
        assert TrainConfig(compile=True, compile_mode=mode).resolved(cuda)["cuda_graph"] is False
        with pytest.raises(ValueError, match=f"'cuda_graph' cannot be true with compile_mode '{mode}'"):
            TrainConfig(compile=True, compile_mode=mode, cuda_graph=True)
    assert TrainConfig(compile=True, compile_mode="max-autotune-no-cudagraphs").resolved(cuda)["cuda_graph"] is True


def test_evaluation_heads_run_in_float32_under_amp():
    """bf16 scores (8 significant bits) would tie test images in the AUC's ranking."""
    from mtlue_fast.train.victim import evaluate

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 2)

        def encode(self, x):
            return self.body(x).mean((2, 3))

        def decode(self, z, size):
            return self.head(z)

    class Recorder:
        dtypes: list = []

        def reset(self):
            pass

        def update(self, outputs, labels):
            self.dtypes.append(outputs.dtype)

        def merge_ranks(self):
            pass

        def compute(self):
            return {}

    recorder = Recorder()
    batches = [(torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8), torch.zeros(2, 1, dtype=torch.int64))]
    evaluate(Net(), batches, recorder, amp=True)
    assert recorder.dtypes == [torch.float32]
