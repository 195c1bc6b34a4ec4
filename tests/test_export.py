"""Export of the protected training set (docs/method.md section 6): the uint8 cache and image files in the original layout."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtlue_fast.data import DatasetFormatError, build_cache, load_records, open_cache, synthetic
from mtlue_fast.ue.export import write_protected
from mtlue_fast.ue.publish import MARKER_FILE, write_image_files

EPS = 8 / 255


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict:
    """Tiny synthetic CelebA (70x70 cache), ChestX-ray (32x32) and NYUv2 (24x32): root and clean cache."""
    base = tmp_path_factory.mktemp("data")
    out = {}
    for name, n_train, size in (("celeba", 24, None), ("chestxray", 24, (32, 32)), ("nyuv2", 6, (24, 32))):
        root = synthetic.write(name, base / name, n_train, 4, seed=0, size=size)
        out[name] = (root, build_cache(name, root, "train", cache_dir=base / "cache", size=size, progress=False))
    return out


def random_perturb(eps: float = EPS, fail_at: int | None = None, calls: list | None = None):
    """A perturb callable with uniform noise in [-eps, eps] from a seeded generator."""
    gen = torch.Generator().manual_seed(1)

    def perturb(images, labels, indices):
        if calls is not None:
            calls.append((images.clone(), labels, indices.clone()))
        if fail_at is not None and int(indices[0]) >= fail_at:
            raise RuntimeError("simulated interruption")
        return (torch.rand(images.shape, generator=gen) * 2 - 1) * eps

    return perturb


def export_random(clean, out: Path):
    return write_protected(clean, out, random_perturb(), method="random", eps=EPS, progress=False)


def strays(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if out.name in p.name)


@pytest.mark.parametrize("name", ["celeba", "chestxray"])
def test_protected_cache_is_exact(datasets, tmp_path, name):
    _, clean = datasets[name]
    calls: list = []
    out = tmp_path / "protected"
    cache = write_protected(clean, out, random_perturb(calls=calls), method="random", eps=EPS, batch_size=10,
                            settings={"seed": 1}, progress=False)  # fmt: skip
    # perturb saw every row once, in order, with its clean image and labels
    assert [c[2].tolist() for c in calls] == [list(range(s, min(s + 10, len(clean)))) for s in range(0, len(clean), 10)]
    for images, labels, indices in calls:
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64 and indices.dtype == torch.int64
        np.testing.assert_array_equal(images.numpy(), clean.images[indices.numpy()])
        np.testing.assert_array_equal(labels.numpy(), clean.labels[indices.numpy()])

    delta = np.load(out / "delta.npy")
    assert delta.dtype == np.int8 and cache.images.dtype == np.uint8
    diff = cache.images.astype(np.int16) - clean.images.astype(np.int16)
    np.testing.assert_array_equal(diff, delta.astype(np.int16))
    assert np.abs(delta).max() <= 8 and np.abs(delta).max() > 0
    np.testing.assert_array_equal(cache.labels, clean.labels)

    reopened = open_cache(out)
    m = reopened.manifest
    for key in ("dataset", "split", "task_names", "num_classes", "size", "channels", "row_files"):
        assert m[key] == clean.manifest[key], key
    assert m["method"] == "random" and m["eps"] == EPS and m["settings"] == {"seed": 1}
    assert m["clean_source_digest"] == clean.manifest["source_digest"] != m["source_digest"]
    assert m["clean_path"] == str(Path(clean.path).resolve())
    assert m["count"] == len(clean) and m["max_abs_delta_levels"] == int(np.abs(delta).max()) and m["created"]
    assert sorted(p.name for p in out.iterdir()) == ["delta.npy", "images.npy", "labels.npy", "manifest.json"]
    assert strays(out) == ["protected"]


def test_rerun_is_free_and_other_exports_are_refused(datasets, tmp_path):
    _, clean = datasets["celeba"]
    out = tmp_path / "protected"
    write_protected(clean, out, random_perturb(), method="random", eps=EPS, settings={"seed": 1}, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def never(*args):
        raise AssertionError("a rerun must not recompute")

    again = write_protected(clean, out, never, method="random", eps=EPS, settings={"seed": 1}, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    assert again.manifest["source_digest"] == open_cache(out).manifest["source_digest"]
    for kwargs in ({"method": "other", "eps": EPS, "settings": {"seed": 1}},
                   {"method": "random", "eps": 4 / 255, "settings": {"seed": 1}},
                   {"method": "random", "eps": EPS, "settings": {"seed": 2}}):  # fmt: skip
        with pytest.raises(ValueError, match="protected"):
            write_protected(clean, out, never, progress=False, **kwargs)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_user_folder_is_never_touched(datasets, tmp_path):
    _, clean = datasets["chestxray"]
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="mine"):
        write_protected(clean, out, random_perturb(), method="random", eps=EPS, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder may be filled
    assert len(write_protected(clean, empty, random_perturb(), method="random", eps=EPS, progress=False)) == len(clean)


def test_interrupted_export_leaves_nothing(datasets, tmp_path):
    _, clean = datasets["celeba"]
    out = tmp_path / "protected"
    with pytest.raises(RuntimeError, match="simulated"):
        write_protected(clean, out, random_perturb(fail_at=12), method="random", eps=EPS, batch_size=6, progress=False)
    assert not out.exists() and strays(out) == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda images: torch.full(images.shape, 9 / 255), "9 levels"),
        (lambda images: torch.full(images.shape, float("nan")), "NaN"),
        (lambda images: torch.zeros(images.shape[0], 1, 2, 2), "shape"),
        (lambda images: images, "floating"),
    ],
)
def test_bad_perturbation_raises(datasets, tmp_path, bad, match):
    _, clean = datasets["chestxray"]
    out = tmp_path / "protected"
    with pytest.raises(ValueError, match=match):
        write_protected(clean, out, lambda images, labels, indices: bad(images), method="bad", eps=EPS, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_raise(datasets, tmp_path):
    _, clean = datasets["chestxray"]
    with pytest.raises(ValueError, match="eps"):
        write_protected(clean, tmp_path / "x", random_perturb(), method="m", eps=0.6, progress=False)
    with pytest.raises(ValueError, match="JSON"):
        write_protected(clean, tmp_path / "x", random_perturb(), method="m", eps=EPS, settings={"f": object()})
    with pytest.raises(TypeError, match="Cache"):
        write_protected(clean.images, tmp_path / "x", random_perturb(), method="m", eps=EPS, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["celeba", "chestxray"])
def test_png_files_round_trip_through_the_reader(datasets, tmp_path, name):
    root, clean = datasets[name]
    protected = export_random(clean, tmp_path / "protected")
    out = write_image_files(protected, root, tmp_path / "published", progress=False)
    records = load_records(name, out, "train")
    assert len(records) == len(protected) and all(os.path.isfile(p) for p in records.paths)
    np.testing.assert_array_equal(records.labels, protected.labels)
    for i, path in enumerate(records.paths):
        assert path.endswith(".png")
        assert os.path.relpath(path, out) == str(Path(protected.manifest["row_files"][i]).with_suffix(".png"))
        with Image.open(path) as image:
            assert image.mode == ("L" if name == "chestxray" else "RGB")
            array = np.asarray(image)
        chw = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
        np.testing.assert_array_equal(chw, protected.images[i])
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["source_digest"] == protected.manifest["source_digest"] and marker["image_format"] == "png"
    assert strays(out) == ["published"]
    # a rerun is free; a different export into the same folder is refused
    stamp = (out / MARKER_FILE).stat().st_mtime_ns
    assert write_image_files(protected, root, out, progress=False) == out
    assert (out / MARKER_FILE).stat().st_mtime_ns == stamp
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="never overwritten"):
        write_image_files(protected, root, out, image_format="jpeg", progress=False)


def test_celeba_annotation_names_follow_the_new_extension(datasets, tmp_path):
    root, clean = datasets["celeba"]
    protected = export_random(clean, tmp_path / "protected")
    out = write_image_files(protected, root, tmp_path / "published", progress=False)
    original = (root / "list_attr_celeba.txt").read_bytes()
    rewritten = (out / "list_attr_celeba.txt").read_bytes()
    first = Path(protected.manifest["row_files"][0]).name
    assert first.encode() in original and first.encode() not in rewritten
    assert rewritten.replace(b".png", b".jpg") == original  # only names changed, CRLF and spacing kept
    with pytest.raises(DatasetFormatError, match="4 missing images"):  # only training images are written
        load_records("celeba", out, "test")


def test_jpeg_option_warns_and_writes_jpg(datasets, tmp_path):
    root, clean = datasets["celeba"]
    protected = export_random(clean, tmp_path / "protected")
    with pytest.warns(UserWarning, match="weakens the protection"):
        out = write_image_files(protected, root, tmp_path / "jpeg", image_format="jpeg", jpeg_quality=90)
    records = load_records("celeba", out, "train")
    assert len(records) == len(protected) and all(p.endswith(".jpg") for p in records.paths)
    with Image.open(records.paths[0]) as image:
        assert image.format == "JPEG" and image.size == (70, 70)


def test_image_files_need_row_files(datasets, tmp_path):
    root, clean = datasets["chestxray"]
    protected = export_random(clean, tmp_path / "protected")
    old = tmp_path / "old"
    shutil.copytree(protected.path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["row_files"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="row_files.*rebuild"):
        write_image_files(old, root, tmp_path / "published", progress=False)
    assert not (tmp_path / "published").exists()


def test_nyuv2_export_and_array_files(datasets, tmp_path):
    root, clean = datasets["nyuv2"]
    calls: list = []
    protected = write_protected(clean, tmp_path / "protected", random_perturb(calls=calls), method="random",
                                eps=EPS, batch_size=4, progress=False)  # fmt: skip
    assert isinstance(calls[0][1], dict) and set(calls[0][1]) == {"seg", "depth", "normal"}
    for key, maps in protected.labels.items():
        np.testing.assert_array_equal(maps, clean.labels[key])
    delta = np.load(protected.path / "delta.npy")
    np.testing.assert_array_equal(protected.images.astype(np.int16) - clean.images, delta)
    out = write_image_files(protected, root, tmp_path / "published", progress=False)
    records = load_records("nyuv2", out, "train")
    assert len(records) == len(protected)
    for i, path in enumerate(records.paths):
        array = np.load(path)
        assert array.dtype == np.uint8 and array.shape == (24, 32, 3)
        np.testing.assert_array_equal(array.transpose(2, 0, 1), protected.images[i])
        for rel_map in records.labels[i]:
            original = root / os.path.relpath(rel_map, out)
            assert Path(rel_map).read_bytes() == original.read_bytes()
    rebuilt = build_cache("nyuv2", out, "train", cache_dir=tmp_path / "cache", size=(24, 32), progress=False)
    np.testing.assert_array_equal(rebuilt.images, protected.images)
    with pytest.raises(ValueError, match="png"):
        write_image_files(protected, root, tmp_path / "jpeg", image_format="jpeg", progress=False)


def test_utkface_files_keep_their_names_with_png_extension(tmp_path):
    root = synthetic.write("utkface", tmp_path / "utk", 10, 2, seed=0, size=(32, 32))
    clean = build_cache("utkface", root, "train", cache_dir=tmp_path / "cache", size=(32, 32), progress=False)
    protected = export_random(clean, tmp_path / "protected")
    out = write_image_files(protected.path, root, tmp_path / "published", progress=False)  # a folder works too
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    expected = sorted(rel[: -len(".jpg")] + ".png" for rel in protected.manifest["row_files"])
    assert written == expected and all(name.endswith(".jpg.chip.png") for name in written)
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [MARKER_FILE]  # no annotation files
