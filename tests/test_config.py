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
    # the published release: CelebA's perturbation goes back to its crop by the inverse of the resize
    assert (real.export_upsample, small.export_upsample) == ("inverse", "nearest")
    # the synthetic CelebA sample is protected with targeted TAP; the real dataset with the paper's untargeted TAP
    assert (real.generate.targeted, resolve("celeba", synthetic=True).generate.targeted) == (False, True)
    # the synthetic CelebA sample's victims: wider and shorter than its surrogate; the real dataset's are the surrogate's
    sample = resolve("celeba", synthetic=True)
    assert (sample.train.width, sample.train.epochs) == (0.25, 20)
    assert (sample.victim_train(1).width, sample.victim_train(1).epochs) == (0.5, 12)
    assert (real.victim_train(1).width, real.victim_train(1).epochs) == (1.0, 60)
    smoke = resolve("celeba", synthetic=True, preset="smoke").victim_train(1)
    assert (smoke.width, smoke.epochs) == (0.25, 2)  # the smoke preset's victims stay seconds long


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


@pytest.mark.parametrize(
    "key,suggestion",
    [
        ("train.lrr", "'train.lr'?"),  # a typo within the section
        ("train.epoch", "'train.epochs'?"),
        ("train.lr.x", "'train.lr'?"),  # a value key used as a section
        ("trian.lr", "'train.*' or 'train.lr'?"),  # a misspelt section
        ("gen.eps", "'generate.eps'?"),
        ("generate.lamda_intra", "'generate.lambda_intra' or 'generate.lambda_inter'?"),
        ("epochs", "'train.epochs' or 'victims.epochs'?"),  # a key outside its section
        ("devce", "'device'?"),
    ],
)
def test_unknown_set_key_suggests_close_keys(key, suggestion):
    with pytest.raises(ConfigError) as err:
        resolve("chestxray", synthetic=True, assignments=[f"{key}=1"])
    assert str(err.value) == f"unknown config key {key!r}; did you mean {suggestion}"


def test_unknown_key_suggests_at_most_three():
    with pytest.raises(ConfigError) as err:
        config.build(config.RunConfig, {"dataset": "celeba", "data": {"synthetic": 1}})
    suggested = str(err.value).split("; did you mean ", 1)[1]
    assert suggested.count("'data.synthetic_") == 3 and suggested.count("'") == 6 and " or " in suggested


@pytest.mark.parametrize("key", ["train.zzzz", "train.learning_rate", "train"])
def test_unknown_key_without_close_match_lists_its_section_only(key):
    with pytest.raises(ConfigError) as err:
        resolve("chestxray", synthetic=True, assignments=[f"{key}=1"])
    message = str(err.value)
    assert message.startswith(f"unknown config key {key!r}; valid keys in train.*: ")
    listed = message.split(": ", 1)[1].split(", ")
    assert listed == [k for k in config.valid_keys() if k.startswith("train.")]


def test_unknown_top_level_key_lists_sections_not_all_keys():
    with pytest.raises(ConfigError) as err:
        resolve("chestxray", synthetic=True, assignments=["qqq=1"])
    listed = str(err.value).split("valid keys in the top level: ", 1)[1].split(", ")
    assert {"dataset", "train.*", "generate.*", "method", "device"} <= set(listed)
    assert len(listed) == len(config.fields(config.RunConfig)) < len(config.valid_keys()) // 4


def test_unknown_yaml_keys_get_the_same_help(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"^unknown config key 'train\.lrr'; did you mean 'train\.lr'\?$"):
        resolve("chestxray", synthetic=True, overlays=[str(typo)])
    typo.write_text("trian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"^unknown config key 'trian'; did you mean 'train\.\*'"):
        resolve("chestxray", synthetic=True, overlays=[str(typo)])
    typo.write_text("data:\n  nonsense: 1\n")
    with pytest.raises(ConfigError, match=r"valid keys in data\.\*: data\.cache_size, data\.crop"):
        resolve("chestxray", synthetic=True, overlays=[str(typo)])


@pytest.mark.parametrize(
    "assignments, allowed",
    [
        ([], True),
        (["victims.width=0.25"], True),  # the smoke preset's own width, named
        (["victims.width=0.5"], False),
        (["victims.epochs=1"], False),
        (["victims.backbone=resnet50"], False),
        (["victims.weighting=uw"], False),
        (["victim=stl"], False),
        (["defense=jpeg"], False),
    ],
)
def test_the_surrogate_stands_in_for_clean_victims_only_of_its_own_recipe(assignments, allowed):
    cfg = resolve("chestxray", synthetic=True, preset="smoke", assignments=assignments)
    assert cfg.surrogate_can_be_the_clean_victim() is allowed
