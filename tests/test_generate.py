"""The generator loop on learnable synthetic data: EM reaches its stop error and the export protects;
TAP resumes after an interruption; SEP's shared generator pass equals one pass per checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlue_fast.data import open_cache
from mtlue_fast.models import build_model
from mtlue_fast.train import TrainConfig, train
from mtlue_fast.ue.export import export_generator
from mtlue_fast.ue.generate import GeneratorStep, generate, load_generator
from mtlue_fast.ue.settings import GenerateConfig
from mtlue_fast.ue.objectives import Objective

sys.path.insert(0, str(Path(__file__).parent))
from test_train import CLASSES, TASKS, make_cache  # noqa: E402

CROP = (32, 32)
VICTIM = TrainConfig(width=0.25, batch_size=32, epochs=6, lr=2e-3, progress=False)


def cache_dir(root: Path, n: int, seed: int, strength: float = 1.0) -> Path:
    """A cache folder (the on-disk format ``open_cache`` reads) holding ``make_cache``'s arrays."""
    fake = make_cache(n, seed, strength=strength)
    root.mkdir(parents=True)
    np.save(root / "images.npy", fake.images)
    np.save(root / "labels.npy", fake.labels)
    manifest = {
        "dataset": "celeba", "split": "train", "task_names": list(TASKS), "num_classes": list(CLASSES),
        "source_digest": f"test-{n}-{seed}-{strength}", "count": n, "channels": 3, "size": list(fake.images.shape[-2:]),
        "row_files": [f"img/{i:05d}.png" for i in range(n)],
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def surrogate():
    torch.manual_seed(0)
    return build_model(list(CLASSES), backbone="resnet18", in_channels=3, crop=CROP, width=0.25)


FAST_GEN = GenerateConfig(width=0.25, batch_size=64, crop=CROP, table_lr=2e-2, progress=False)


@pytest.mark.slow
def test_em_reaches_its_stop_error_and_the_export_protects(tmp_path):
    # Subtle patterns (as real features are): a clean victim still learns every task perfectly.
    clean = open_cache(cache_dir(tmp_path / "clean", 384, 0, strength=0.2))
    test = open_cache(cache_dir(tmp_path / "test", 160, 1, strength=0.2))
    config = FAST_GEN.replace(base="em", max_passes=8, stop_error=0.02, train_steps=2)
    result = generate(clean, tmp_path / "generator", config, surrogates=surrogate())
    assert result.stopped == "stop_error", result.history
    protected = export_generator(result.load_generator(), clean, tmp_path / "protected", progress=False)
    delta = np.asarray(protected.images).astype(np.int16) - np.asarray(clean.images)
    assert np.abs(delta).max() <= 8
    clean_victim = train(clean, test, tmp_path / "victim_clean", VICTIM, crop=CROP)
    protected_victim = train(protected, test, tmp_path / "victim_protected", VICTIM, crop=CROP)
    drop = clean_victim.metrics["mean_accuracy"] - protected_victim.metrics["mean_accuracy"]
    assert drop > 0.1, (clean_victim.metrics, protected_victim.metrics)


def test_tap_generation_resumes_after_interruption(tmp_path):
    clean = open_cache(cache_dir(tmp_path / "clean", 96, 0))
    config = FAST_GEN.replace(base="tap", max_passes=3, stop_error=1.0, batch_size=32)
    straight = generate(clean, tmp_path / "straight", config, surrogates=surrogate())

    class Interrupt(Exception):
        pass

    def stop(record):
        if record["pass"] == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        generate(clean, tmp_path / "resumed", config, surrogates=surrogate(), on_pass_end=stop)
    assert not (tmp_path / "resumed" / "generator.pt").exists()
    resumed = generate(clean, tmp_path / "resumed", config, surrogates=surrogate())
    assert [r["pass"] for r in resumed.history] == [1, 2, 3] and resumed.stopped == "max_passes"
    a = torch.load(tmp_path / "straight" / "generator.pt")["generator"]
    b = torch.load(tmp_path / "resumed" / "generator.pt")["generator"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    again = generate(clean, tmp_path / "resumed", config, surrogates=surrogate())  # finished: not redone
    assert again.passes == 3
    generator = load_generator(tmp_path / "straight" / "generator.pt")
    x = torch.from_numpy(np.array(clean.images[:4]))
    y = torch.from_numpy(np.asarray(clean.labels[:4]))
    with torch.no_grad():
        delta = generator.delta(generator.raw(x.float() / 255, y))
    assert delta.abs().max() <= 8 / 255 + 1e-7
    assert straight.passes == 3


def test_sep_shared_pass_equals_one_pass_per_checkpoint():
    fake = make_cache(16, 0)
    images, labels = torch.from_numpy(fake.images), torch.from_numpy(fake.labels)
    checkpoints = [surrogate() for _ in range(3)]
    for i, model in enumerate(checkpoints):
        torch.manual_seed(i)
        model.head.weight.data.normal_()
        model.eval().requires_grad_(False)
    results = []
    for shared in (True, False):
        torch.manual_seed(0)
        config = FAST_GEN.replace(base="sep", shared_pass=shared, amp=False)
        from mtlue_fast.models.generator import MTLGenerator

        generator = MTLGenerator(list(CLASSES), in_channels=3, image_size=(36, 36), task_names=list(TASKS), width=0.25)
        optimizer = torch.optim.SGD(generator.parameters(), lr=0.1)
        step = GeneratorStep(generator, Objective("sep", CLASSES), checkpoints, optimizer, config, CROP, amp=False)
        results.append((step(images, labels), [p.detach().clone() for p in generator.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b)


def test_dense_generation_and_export(tmp_path):
    from test_train import make_dense_cache

    fake = make_dense_cache(16, 0)
    root = tmp_path / "clean"
    root.mkdir()
    np.save(root / "images.npy", fake.images)
    for name, array in fake.labels.items():
        np.save(root / f"{name}.npy", array)
    manifest = {
        "dataset": "nyuv2", "split": "train", "task_names": fake.task_names, "num_classes": fake.num_classes,
        "source_digest": "dense-test", "count": 16, "channels": 3, "size": [32, 32],
        "row_files": [f"train/image/{i}.npy" for i in range(16)],
    }  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    clean = open_cache(root)
    torch.manual_seed(0)
    model = build_model({"segmentation": 13, "depth": 1, "normal": 3}, dense=True, backbone="resnet18", width=0.25)
    config = FAST_GEN.replace(base="tap", max_passes=2, batch_size=8, crop=None)
    result = generate(clean, tmp_path / "generator", config, surrogates=model)
    assert result.passes == 2 and result.stopped == "max_passes"
    assert all(np.isnan(r["stop_error"]) for r in result.history)
    protected = export_generator(result.load_generator(), clean, tmp_path / "protected", progress=False)
    delta = np.asarray(protected.images).astype(np.int16) - np.asarray(clean.images)
    assert 0 < np.abs(delta).max() <= 8
    assert np.array_equal(np.asarray(protected.labels["seg"]), fake.labels["seg"])


def test_prepared_surrogate_matches_the_autocast_one():
    """A frozen surrogate cast once to bf16 (and NHWC) gives what autocast gives the fp32 one; the
    caller's module keeps its fp32 weights."""
    from mtlue_fast.ue.generate import _surrogate_outputs, prepare_surrogate

    model = surrogate().eval().requires_grad_(False)
    x = torch.rand(4, 3, *CROP)
    prepared = prepare_surrogate(model, channels_last=True, bf16=True)
    assert next(model.parameters()).dtype == torch.float32
    assert next(prepared.parameters()).dtype == torch.bfloat16
    (reference,) = _surrogate_outputs([model], x, amp=True)
    (fast,) = _surrogate_outputs([prepared], x, amp=True)
    torch.testing.assert_close(fast.float(), reference.float(), rtol=0.1, atol=0.1)
    assert GenerateConfig().use_surrogate_bf16("cuda", amp=True) and not GenerateConfig().use_surrogate_bf16("cuda", amp=False)
    assert not GenerateConfig(base="em").use_surrogate_bf16("cuda", amp=True)
    assert GenerateConfig().use_channels_last("cpu") and GenerateConfig().use_channels_last("cuda")
    assert not GenerateConfig(channels_last=False).use_channels_last("cpu")
