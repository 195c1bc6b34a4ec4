"""Readers on the real sample files (labels checked by hand) and on damaged copies of them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from mtlue_fast.data import DatasetFormatError, load_records
from mtlue_fast.data.formats import nyuv2, utkface

# The real sample files come from the ``samples`` fixture (tests/conftest.py): the folder named by
# $MTLUE_SAMPLES (skipped when it is not set).


@pytest.fixture
def sample_copy(tmp_path, samples):
    """A writable copy of one sample dataset (the originals are never modified)."""

    def copy(name: str) -> Path:
        return Path(shutil.copytree(samples / name, tmp_path / name))

    return copy


def test_celeba_sample_labels(samples):
    records = load_records("celeba", samples / "celeba", "train")
    assert [Path(p).name for p in records.paths] == [f"00000{i}.jpg" for i in range(1, 7)]
    assert records.task_names[0] == "5_o_Clock_Shadow" and records.task_names[-1] == "Young"
    assert records.num_classes == [2] * 40 and records.labels.shape == (6, 40)
    first = dict(zip(records.task_names, records.labels[0]))
    # 000001.jpg: -1 1 1 -1 ... (Arched_Eyebrows, Attractive, ..., Smiling, Young positive; Male negative)
    assert (first["Arched_Eyebrows"], first["Attractive"], first["Smiling"], first["Young"]) == (1, 1, 1, 1)
    assert (first["5_o_Clock_Shadow"], first["Male"], first["Eyeglasses"]) == (0, 0, 0)
    assert records.labels[0].sum() == 13
    with pytest.raises(DatasetFormatError, match="test split .* is empty"):
        load_records("celeba", samples / "celeba", "test")


def test_celeba_damaged_copy_skips_and_counts(sample_copy):
    root = sample_copy("celeba")
    (root / "img_align_celeba" / "000003.jpg").unlink()  # listed but missing
    shutil.copy(root / "img_align_celeba" / "000001.jpg", root / "img_align_celeba" / "999999.jpg")  # unlisted
    lines = (root / "list_attr_celeba.txt").read_bytes().split(b"\r\n")
    lines[3] = lines[3].rsplit(b" ", 1)[0]  # 000002.jpg loses a value: malformed
    (root / "list_attr_celeba.txt").write_bytes(b"\r\n".join(lines))
    records = load_records("celeba", root, "train")
    assert [Path(p).name for p in records.paths] == ["000001.jpg", "000004.jpg", "000005.jpg", "000006.jpg"]
    counts = records.skipped.counts
    assert counts == {"missing_images": 1, "unlisted_images": 1, "malformed_attribute_rows": 1, "images_without_labels": 1}
    assert "1 missing images, e.g. 000003.jpg" in records.skipped.summary()
    with pytest.raises(DatasetFormatError, match="strict=True"):
        load_records("celeba", root, "train", strict=True)


def test_chestxray_sample_labels(samples):
    train = load_records("chestxray", samples / "chestxray14", "train")
    test = load_records("chestxray", samples / "chestxray14", "test")
    assert [Path(p).name for p in train.paths] == ["00000001_000.png", "00000002_000.png"]
    assert [Path(p).name for p in test.paths] == ["00000013_003.png", "00000211_000.png", "00001369_000.png"]
    assert train.task_names[1] == "Cardiomegaly" and train.task_names[12] == "Pleural_Thickening"
    assert train.labels.tolist()[0] == [0, 1] + [0] * 12  # Cardiomegaly
    assert train.labels[1].sum() == 0  # No Finding
    assert test.labels[:, 12].tolist() == [1, 0, 0] and test.labels[:, 1].tolist() == [0, 1, 1]
    assert test.labels.sum() == 3


def test_chestxray_2017_csv_nested_folders_and_missing_file(sample_copy):
    root = sample_copy("chestxray14")
    rows = (root / "Data_Entry_2017_v2020.csv").read_text().splitlines()
    header_2017 = "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
    (root / "Data_Entry_2017.csv").write_text("\n".join([header_2017, *[r + "," for r in rows[1:]]]) + "\n")
    (root / "Data_Entry_2017_v2020.csv").unlink()
    nested = root / "images_001" / "images"
    nested.mkdir(parents=True)
    shutil.move(str(root / "images" / "00000211_000.png"), nested)  # as in the official tarballs
    (root / "images" / "00000013_003.png").unlink()
    with open(root / "test_list.txt", "a") as fh:
        fh.write("\n99999999_000.png\n")  # listed, no CSV row
    test = load_records("chestxray", root, "test")
    assert [Path(p).name for p in test.paths] == ["00000211_000.png", "00001369_000.png"]
    assert test.paths[0].startswith(str(nested))
    assert test.skipped.counts == {"missing_images": 1, "images_without_labels": 1}


def test_utkface_sample_names_and_split(samples):
    assert utkface.parse_name("100_1_0_20170110183726390.jpg.chip.jpg") == (8, 0, 1)
    assert utkface.parse_name("1_0_2_20161219194721851.jpg.chip.jpg") == (0, 2, 0)
    assert utkface.parse_name("25_0_0_20170104011300160.jpg.chip.jpg") == (3, 0, 0)
    assert utkface.parse_name("14_0_0_2017011022340900.jpg.chip.jpg") == (2, 0, 0)  # 16-digit stamp: labels intact
    assert utkface.parse_name("61_1_20170109142408075.jpg.chip.jpg") is None  # no race field
    assert utkface.parse_name("30_2_0_20170109142408075.jpg") is None  # gender out of range
    assert [utkface.age_bin(a) for a in (0, 2, 3, 9, 10, 19, 20, 69, 70, 116)] == [0, 0, 1, 1, 2, 2, 3, 7, 8, 8]
    train = load_records("utkface", samples / "utkface", "train")
    test = load_records("utkface", samples / "utkface", "test")
    assert len(train) + len(test) == 8 and len(test) == 2
    assert not set(train.paths) & set(test.paths)
    assert train.skipped.counts == {"unparseable_names": 2}
    assert train.task_names == ["age", "race", "gender"] and train.num_classes == [9, 5, 2]
    by_name = {Path(p).name: tuple(l) for p, l in zip(train.paths + test.paths, np.vstack([train.labels, test.labels]))}
    assert by_name["80_0_2_20170111201008732.jpg.chip.jpg"] == (8, 2, 0)
    assert by_name["45_1_0_20170105001254581.jpg.chip.jpg"] == (5, 0, 1)


def test_nyuv2_sample_label_maps(samples):
    from PIL import Image

    for name in ("new_nyu_class13_0001.png", "new_nyu_class13_0002.png"):
        raw = np.asarray(Image.open(samples / "nyuv2" / name))
        labels = nyuv2.label_from_nyu13_png(raw)
        assert labels.shape == (480, 640) and labels.min() >= -1 and labels.max() <= 12
        assert (labels == -1).sum() == (raw == 0).sum() > 0
        assert np.array_equal(labels[raw > 0], raw[raw > 0].astype(np.int64) - 1)
    with pytest.raises(ValueError, match="expected 0..13"):
        nyuv2.label_from_nyu13_png(np.array([[14]], dtype=np.uint8))


def test_nyuv2_layout_and_missing_companion(tmp_path):
    for split_dir, count in (("train", 3), ("val", 2)):
        for i in range(count):
            for folder, shape in (("image", (4, 6, 3)), ("label", (4, 6)), ("depth", (4, 6, 1)), ("normal", (4, 6, 3))):
                (tmp_path / split_dir / folder).mkdir(parents=True, exist_ok=True)
                np.save(tmp_path / split_dir / folder / f"{i}.npy", np.zeros(shape, np.float32))
    (tmp_path / "train" / "depth" / "1.npy").unlink()
    train = load_records("nyuv2", tmp_path, "train")
    assert [Path(p).name for p in train.paths] == ["0.npy", "2.npy"]
    assert train.labels.shape == (2, 3) and train.labels[1, 2].endswith("train/normal/2.npy")
    assert train.skipped.counts == {"images_without_labels": 1}
    assert len(load_records("nyuv2", tmp_path, "test")) == 2


@pytest.mark.parametrize(
    "dataset,make,match",
    [
        ("celeba", lambda r: None, "list_attr_celeba.txt"),
        ("chestxray", lambda r: None, "Data_Entry_2017_v2020.csv or Data_Entry_2017.csv"),
        ("nyuv2", lambda r: None, r"train/image"),
        ("celeba", lambda r: [(r / f).write_text("1\nA B\n") for f in ("list_attr_celeba.txt", "list_eval_partition.txt")], "img_align_celeba"),
    ],
)
def test_missing_index_files_name_what_was_expected(tmp_path, dataset, make, match):
    make(tmp_path)
    with pytest.raises(DatasetFormatError, match=match):
        load_records(dataset, tmp_path, "train")


def test_bad_arguments(tmp_path):
    with pytest.raises(DatasetFormatError, match="does not exist"):
        load_records("celeba", tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_records("mnist", tmp_path, "train")
    with pytest.raises(ValueError, match="unknown split 'val'"):
        load_records("celeba", tmp_path, "val")
