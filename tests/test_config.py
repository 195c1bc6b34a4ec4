"""Run configuration: shipped YAMLs resolve, overlays and --set apply, bad keys and values are named."""

from __future__ import annotations

import pytest
import yaml

from mtlue_fast import config
from mtlue_fast.config import ConfigError, resolve
from mtlue_fast.data.specs import DATASETS


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("synthetic", [True, False])
@pytest.mark.parametrize("preset", ["default", "smoke"])
def test_shipped_configs_resolve(dataset, synthetic, preset):
    cfg = resolve(dataset, synthetic=synthetic, preset=preset)
    assert cfg.dataset == dataset and cfg.generate.eps == pytest.approx(8 / 255)
    again = config.build(config.RunConfig, yaml.safe_load(config.dump(cfg)))  # config.yaml round trip
    assert again == cfg


def test_spec_defaults_and_the_synthetic_overlay():
    real = resolve("celeba", synthetic=False)
    assert (real.train.epochs, real.train.batch_size, real.train.lr, real.train.milestone_epochs()) == (60, 512, 1e-3, [36, 48])
    assert (real.generate.lambda_intra, real.generate.lambda_inter, real.generate.base) == (20.0, 100.0, "tap")
    assert resolve("chestxray", synthetic=False).train.batch_size == 128
    nyu = resolve("nyuv2", synthetic=False).train
    assert (nyu.backbone, nyu.epochs, nyu.lr, nyu.schedule, nyu.step_size) == ("resnet50", 200, 1e-4, "step", 100)
    small = resolve("chestxray", synthetic=True)
    assert small.data.cache_size == (64, 64) and small.train.width == 0.25


def test_overrides_overlays_and_set_apply_in_order():
    cfg = resolve(
        "chestxray", synthetic=True, overlays=["base-sep", "backbone-vit_b_16"],
        overrides={"train": {"epochs": 3}}, assignments=["train.epochs=5", "generate.protect=[Mass, 2]"],
    )  # fmt: skip
    assert cfg.generate.base == "sep" and cfg.train.backbone == "vit_b_16" and cfg.train.lr == 5e-4
    assert cfg.train.epochs == 5 and cfg.generate.protect == ("Mass", 2)


@pytest.mark.parametrize(
    "assignment,message",
    [
        ("train.epoch=3", "unknown config key 'train.epoch'"),
        ("train.epochs=three", "train.epochs must be an integer"),
        ("train.epochs=0", "'epochs' must be >= 1"),
        ("method=magic", "method must be one of"),
        ("generate.base=pgd", "'base' must be one of"),
        ("data.crop=[0, 4]", "data.crop must be"),
        ("notakey", "--set expects key=value"),
    ],
)
def test_bad_values_name_the_key(assignment, message):
    with pytest.raises(ConfigError, match=message):
        resolve("chestxray", synthetic=True, assignments=[assignment])


def test_bad_files(tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text("dataset: celeba\n")
    with pytest.raises(ConfigError, match="is for dataset 'celeba'"):
        resolve("chestxray", synthetic=True, config_file=other)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve("chestxray", synthetic=True, config_file=broken)
    with pytest.raises(ConfigError, match="does not exist"):
        resolve("chestxray", synthetic=True, config_file=tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        resolve("chestxray", synthetic=True, preset="huge")
    with pytest.raises(ConfigError, match="overlay 'nope'"):
        resolve("chestxray", synthetic=True, overlays=["nope"])
    with pytest.raises(ConfigError, match="unknown dataset"):
        resolve("mnist", synthetic=True)
