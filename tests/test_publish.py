"""Publishing the protected dataset at the original resolution (``write_image_files(resolution="original")``):
every image of both splits at its original size, the perturbation carried back through the inverse of the
cache's geometry, the bound on every pixel of every file, names and sizes per dataset kind, the readers
on the published folder, and ``python -m mtlue_fast.run --victim-data files``."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtlue_fast.data import build_cache, load_records, open_cache, synthetic
from mtlue_fast.ue import publish
from mtlue_fast.ue.export import exported_name, write_protected
from mtlue_fast.ue.publish import (
    MARKER_FILE, carry_back, decode_original, protect_original, resize_matrix, upsample_nearest, write_image_files,
)  # fmt: skip

sys.path.insert(0, str(Path(__file__).parent))

EPS = 8 / 255
LEVELS = 8

#: name -> (train images, test images, original size (None: the format's default), cache size (None: the spec's))
KINDS = {
    "celeba": (10, 4, None, None),  # 218x178, centre crop 140x140, cache 70x70
    "chestxray": (10, 4, (64, 64), (32, 32)),  # 2x
    "utkface": (12, 4, (50, 50), (36, 36)),  # a ratio that is not a whole number
    "nyuv2": (6, 3, (48, 64), (24, 32)),  # .npy arrays, 2x
}


def sign_perturb(eps: float = EPS, scale: float = 1.0):
    """Per row a fixed pattern of {-eps, 0, +eps} (times ``scale``) drawn from the row's own seed, so
    the perturbation of a row does not depend on the batch it comes in."""

    def perturb(images, labels, indices):
        out = torch.empty(images.shape, dtype=torch.float32)
        for j, i in enumerate(indices.tolist()):
            gen = torch.Generator().manual_seed(1000 + i)
            out[j] = torch.randint(-1, 2, tuple(images.shape[1:]), generator=gen).float() * eps * scale
        return out.to(images.device)

    return perturb


def expected_delta(row: int, shape) -> np.ndarray:
    indices = torch.tensor([row])
    return sign_perturb()(torch.zeros((1, *shape), dtype=torch.uint8), None, indices)[0].numpy()


def make_kind(base: Path, name: str) -> dict:
    n_train, n_test, size, cache_size = KINDS[name]
    root = synthetic.write(name, base / name, n_train, n_test, seed=0, size=size)
    caches = base / "cache"
    kw = {"cache_dir": caches, "size": cache_size, "decoder": "pil", "progress": False}
    train = build_cache(name, root, "train", **kw)
    test = build_cache(name, root, "test", **kw)
    protected = write_protected(train, base / f"protected-{name}", sign_perturb(), method="sign", eps=EPS, progress=False)
    return {"root": root, "train": train, "test": test, "protected": protected, "cache_size": cache_size}


@pytest.fixture(scope="module")
def kinds(tmp_path_factory) -> dict:
    base = tmp_path_factory.mktemp("publish")
    out = {}
    for name in KINDS:
        kind = make_kind(base, name)
        kind["out"] = write_image_files(kind["protected"], kind["root"], base / f"published-{name}", resolution="original",
                                        perturb=sign_perturb(), test_files=kind["test"].manifest["row_files"],
                                        progress=False)  # fmt: skip
        out[name] = kind
    return out


def read_published(path: Path, channels: int) -> np.ndarray:
    return decode_original(path, channels)


@pytest.mark.parametrize("name", list(KINDS))
def test_every_file_has_its_name_size_and_the_bound(kinds, name):
    kind = kinds[name]
    root, out, train, protected = kind["root"], kind["out"], kind["train"], kind["protected"]
    channels = int(train.images.shape[1])
    crop = train.manifest.get("center_crop")
    rows = train.manifest["row_files"]
    most = 0
    for i, rel in enumerate(rows):
        target = out / (rel if name == "nyuv2" else exported_name(rel, "png"))
        assert target.is_file(), target
        if name != "nyuv2":
            assert target.suffix == ".png"
        original = decode_original(root / rel, channels)
        published = read_published(target, channels)
        assert published.shape == original.shape  # the original's size, not the cache's
        diff = np.abs(published.astype(np.int16) - original)
        assert diff.max() <= LEVELS, (rel, diff.max())
        most = max(most, int(diff.max()))
        # exactly the inverse geometry: the carried-back perturbation in the crop window, nothing outside
        delta = expected_delta(i, train.images.shape[1:])
        np.testing.assert_array_equal(published, protect_original(original, delta, crop))
        if crop:
            _, height, width = original.shape
            top, left = (height - crop[0]) // 2, (width - crop[1]) // 2
            outside = np.ones(original.shape[1:], dtype=bool)
            outside[top : top + crop[0], left : left + crop[1]] = False
            assert diff[:, outside].max() == 0 and diff[:, ~outside].max() == LEVELS
    assert most == LEVELS
    for rel in kind["test"].manifest["row_files"]:  # the test split: byte for byte, not perturbed
        assert (out / rel).read_bytes() == (root / rel).read_bytes()
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["resolution"] == "original" and marker["upsample"] == "nearest" and marker["eps_levels"] == LEVELS
    assert marker["max_abs_diff_levels"] == LEVELS and marker["splits"]["train"] == {"count": len(rows), "protected": True}
    assert marker["splits"]["test"]["count"] == len(kind["test"]) and marker["splits"]["test"]["protected"] is False
    assert "training data only" in marker["splits"]["test"]["note"]
    assert marker["geometry"]["working_size"] == list(train.images.shape[-2:])
    assert marker["source_digest"] == protected.manifest["source_digest"]
    assert not [p for p in out.parent.iterdir() if ".partial" in p.name]


@pytest.mark.parametrize("name", list(KINDS))
def test_the_readers_read_the_release_like_the_original(kinds, name):
    kind = kinds[name]
    for split in ("train", "test"):
        original = load_records(name, kind["root"], split)
        published = load_records(name, kind["out"], split)
        strip = lambda records: [str(Path(os.path.relpath(p, records.root)).with_suffix("")) for p in records.paths]  # noqa: E731
        assert strip(published) == strip(original), split
        if name != "nyuv2":
            np.testing.assert_array_equal(published.labels, original.labels)
        assert published.skipped.total == 0
    if name == "nyuv2":  # the label, depth and normal maps are copied as they are
        for rel in kind["train"].manifest["row_files"]:
            for sub in ("label", "depth", "normal"):
                rel_map = Path(rel).parent.parent / sub / Path(rel).name
                assert (kind["out"] / rel_map).read_bytes() == (kind["root"] / rel_map).read_bytes()


def test_utkface_png_names_split_as_the_original(kinds):
    out = kinds["utkface"]["out"]
    names = sorted(p.name for p in out.rglob("*") if p.is_file() and p.name != MARKER_FILE)
    train = {Path(p).name for p in load_records("utkface", out, "train").paths}
    assert train and all(n.endswith(".jpg.chip.png") for n in train)
    assert all(n.endswith(".jpg.chip.jpg") for n in set(names) - train)  # the test split keeps its names


def test_the_published_files_give_the_perturbation_back(kinds):
    """Re-caching the published ChestX-ray files (2x) with the cache's own geometry gives back the
    working-resolution perturbation, blurred by the cache's downsampling filter only."""
    kind = kinds["chestxray"]
    again = build_cache("chestxray", kind["out"], "train", cache_dir=kind["out"].parent / "recache",
                        size=kind["cache_size"], decoder="pil", progress=False)  # fmt: skip
    recovered = again.images.astype(np.float64) - kind["train"].images
    delta = np.stack([expected_delta(i, kind["train"].images.shape[1:]) for i in range(len(again))]) * 255
    correlation = np.corrcoef(recovered.ravel(), delta.ravel())[0, 1]
    assert correlation > 0.85, correlation
    assert np.abs(recovered).mean() > 0.5 * np.abs(delta).mean()


def test_upsample_nearest_by_pixel_centres():
    delta = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    np.testing.assert_array_equal(upsample_nearest(delta, (4, 6))[0], np.repeat(np.repeat(delta[0], 2, 0), 2, 1))
    assert upsample_nearest(delta, (2, 3)).tolist() == delta.tolist()  # identity
    up = upsample_nearest(np.arange(3, dtype=np.float32).reshape(1, 1, 3), (1, 4))  # 3 -> 4: centres
    assert up.tolist() == [[[0.0, 1.0, 1.0, 2.0]]]  # centres 0.375, 1.125, 1.875, 2.625


def test_carry_back_inverts_the_cache_resize_within_the_budget():
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.uniform(-1, 1, (1, 8, 8)), np.ones((4, 4))) * EPS  # 32x32, blocks of 4
    delta = (0.7 * smooth + 0.3 * rng.uniform(-1, 1, smooth.shape) * EPS).astype(np.float32)
    rows, cols = resize_matrix(64, 32), resize_matrix(48, 32)  # 2x and 1.5x
    np.testing.assert_allclose(rows.sum(1), 1.0, atol=1e-6)
    read_back = {}
    for mode in ("nearest", "inverse"):
        up = carry_back(delta, (64, 48), EPS, mode)
        assert up.shape == (1, 64, 48) and np.abs(up).max() <= EPS + 1e-7
        read_back[mode] = np.einsum("hH,cHW,wW->chw", rows, up, cols)
    error = {mode: np.abs(value - delta).mean() for mode, value in read_back.items()}
    assert error["inverse"] < 0.6 * error["nearest"], error
    batch = np.stack([delta, -delta])
    together = carry_back(batch, (64, 48), EPS, "inverse")
    np.testing.assert_array_equal(together[1], carry_back(-delta, (64, 48), EPS, "inverse"))  # batch-independent
    np.testing.assert_array_equal(carry_back(delta, (32, 32), EPS, "inverse"), delta)  # same size: unchanged
    with pytest.raises(ValueError, match="upsample"):
        carry_back(delta, (64, 48), EPS, "cubic")


@pytest.mark.parametrize("name", ["celeba", "utkface"])
def test_inverse_option_is_recorded_and_within_the_bound(kinds, tmp_path, name):
    kind = kinds[name]
    out = write_image_files(kind["protected"], kind["root"], tmp_path / "inv", resolution="original", upsample="inverse",
                            perturb=sign_perturb(), progress=False)  # fmt: skip
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["upsample"] == "inverse" and marker["max_abs_diff_levels"] == LEVELS
    crop = kind["train"].manifest.get("center_crop")
    for i, rel in enumerate(kind["train"].manifest["row_files"]):
        original = decode_original(kind["root"] / rel, 3)
        expected = protect_original(original, expected_delta(i, kind["train"].images.shape[1:]), crop, eps=EPS,
                                    upsample="inverse")  # fmt: skip
        np.testing.assert_array_equal(read_published(out / exported_name(rel, "png"), 3), expected)
    with pytest.raises(ValueError, match="never overwritten"):  # another upsampling is another release
        write_image_files(kind["protected"], kind["root"], out, resolution="original", perturb=sign_perturb(), progress=False)


def test_identity_geometry_gives_the_protected_cache_exactly(tmp_path):
    root = synthetic.write("chestxray", tmp_path / "x", 8, 2, seed=1, size=(32, 32))
    train = build_cache("chestxray", root, "train", cache_dir=tmp_path / "c", size=(32, 32), decoder="pil", progress=False)
    protected = write_protected(train, tmp_path / "p", sign_perturb(), method="sign", eps=EPS, progress=False)
    out = write_image_files(protected, root, tmp_path / "pub", resolution="original", progress=False)  # stored delta
    for i, rel in enumerate(train.manifest["row_files"]):
        np.testing.assert_array_equal(read_published(out / rel, 1), protected.images[i])
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["delta_source"].startswith("stored") and marker["splits"]["test"]["count"] == 0


def test_a_perturbation_beyond_the_budget_publishes_nothing(kinds, tmp_path):
    kind = kinds["celeba"]
    with pytest.raises(ValueError, match="levels"):
        write_image_files(kind["protected"], kind["root"], tmp_path / "pub", resolution="original",
                          perturb=sign_perturb(scale=1.2), progress=False)  # fmt: skip
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="NaN"):
        write_image_files(kind["protected"], kind["root"], tmp_path / "pub", resolution="original",
                          perturb=lambda images, labels, idx: torch.full(images.shape, float("nan")), progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="original"):
        write_image_files(kind["protected"], kind["root"], tmp_path / "pub", test_files=[], progress=False)
    with pytest.raises(ValueError, match="resolution"):
        write_image_files(kind["protected"], kind["root"], tmp_path / "pub", resolution="full", progress=False)


def test_ctrl_c_drops_the_queued_files_and_leaves_no_partial_folder(kinds, tmp_path, monkeypatch):
    """Ctrl-C while a block's files are being written: the files still queued are never written
    (before, the writer's threads went through the whole queue first) and nothing is left behind."""
    import threading

    kind = kinds["chestxray"]  # 10 training rows: one block
    started, release = [], threading.Event()
    write_row = publish._OriginalJob._write_row

    def slow_write_row(self, *args):
        started.append(args[0])
        release.wait(timeout=1.0)
        return write_row(self, *args)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(publish._OriginalJob, "_write_row", slow_write_row)
    monkeypatch.setattr(publish._OriginalJob, "_add", staticmethod(interrupted))
    with pytest.raises(KeyboardInterrupt):
        write_image_files(kind["protected"], kind["root"], tmp_path / "pub", resolution="original", perturb=sign_perturb(),
                          test_files=kind["test"].manifest["row_files"], progress=False, workers=2)  # fmt: skip
    assert 1 <= len(started) <= 4, started  # those two threads were on, not all 10
    assert list(tmp_path.iterdir()) == []


def test_rerun_is_free_and_another_release_is_refused(kinds):
    kind = kinds["chestxray"]
    out = kind["out"]
    stamp = (out / MARKER_FILE).stat().st_mtime_ns
    again = write_image_files(kind["protected"], kind["root"], out, resolution="original", perturb=sign_perturb(),
                              test_files=kind["test"].manifest["row_files"], progress=False)  # fmt: skip
    assert again == out and (out / MARKER_FILE).stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="never overwritten"):
        write_image_files(kind["protected"], kind["root"], out, progress=False)  # working resolution
    with pytest.raises(ValueError, match="never overwritten"):
        write_image_files(kind["protected"], kind["root"], out, resolution="original", progress=False)  # stored delta


@pytest.mark.parametrize("name", ["celeba", "chestxray"])
def test_jpeg_release_warns_and_records_its_effect(kinds, tmp_path, name):
    kind = kinds[name]
    with pytest.warns(UserWarning, match="weakens the protection"):
        out = write_image_files(kind["protected"], kind["root"], tmp_path / "jpeg", image_format="jpeg", jpeg_quality=90,
                                resolution="original", perturb=sign_perturb(),
                                test_files=kind["test"].manifest["row_files"], progress=False)  # fmt: skip
    marker = json.loads((out / MARKER_FILE).read_text())
    effect = marker["jpeg"]
    assert effect["max_abs_change_after_decode"] > 0 and effect["max_abs_diff_from_original_after_decode"] > 0
    assert marker["max_abs_diff_levels"] == LEVELS  # the bound holds before encoding
    records = load_records(name, out, "train")
    assert len(records) == len(kind["train"]) and all(p.endswith(".jpg") for p in records.paths)
    with Image.open(records.paths[0]) as image:
        assert image.format == "JPEG" and image.size == Image.open(kind["root"] / kind["train"].manifest["row_files"][0]).size
    assert len(load_records(name, out, "test")) == len(kind["test"])


def _release_job(rank: int, protected: str, root: str, out: str, test: list[str]) -> None:
    publish.FILE_BLOCK = 3  # several blocks per rank with this small set
    write_image_files(protected, root, out, resolution="original", perturb=sign_perturb(), test_files=test,
                      progress=False)  # fmt: skip


def test_release_written_by_two_ranks_equals_one_process(kinds, tmp_path):
    from test_dist import spawn

    kind = kinds["celeba"]
    many = tmp_path / "many"
    spawn(_release_job, str(kind["protected"].path), str(kind["root"]), str(many), kind["test"].manifest["row_files"])
    one = kind["out"]
    names = sorted(str(p.relative_to(one)) for p in one.rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(many)) for p in many.rglob("*") if p.is_file())
    for name in names:
        if name != MARKER_FILE:
            assert (one / name).read_bytes() == (many / name).read_bytes(), name
    marker = json.loads((many / MARKER_FILE).read_text())
    assert marker["max_abs_diff_levels"] == LEVELS and not list(many.glob(".stats-*"))


# ---------------------------------------------------------------------------- the real sample files


@pytest.mark.parametrize("folder, name", [("celeba", "celeba"), ("chestxray14", "chestxray"), ("utkface", "utkface")])
def test_real_samples_publish_at_their_original_size(samples, tmp_path, folder, name):
    root = samples / folder
    train = build_cache(name, root, "train", cache_dir=tmp_path / "cache", decoder="pil", progress=False)
    try:
        test = [os.path.relpath(p, root) for p in load_records(name, root, "test").paths]
    except ValueError:  # the CelebA sample has no test rows
        test = []
    protected = write_protected(train, tmp_path / "p", sign_perturb(), method="sign", eps=EPS, progress=False)
    out = write_image_files(protected, root, tmp_path / "pub", resolution="original", perturb=sign_perturb(),
                            test_files=test, progress=False)  # fmt: skip
    channels = int(train.images.shape[1])
    for i, rel in enumerate(train.manifest["row_files"]):
        original = decode_original(root / rel, channels)
        published = read_published(out / exported_name(rel, "png"), channels)
        assert published.shape == original.shape and published.shape[1:] != train.images.shape[2:]
        assert np.abs(published.astype(np.int16) - original).max() == LEVELS
    for rel in test:
        assert (out / rel).read_bytes() == (root / rel).read_bytes()  # e.g. ChestX-ray's RGBA file, as it is
    assert len(load_records(name, out, "train")) == len(train)
    marker = json.loads((out / MARKER_FILE).read_text())
    if name == "utkface":  # the names the reader cannot parse are not published, and counted
        assert marker["omitted"]["count"] == load_records(name, root, "train").skipped.counts["unparseable_names"] == 2
        for split in ("train", "test"):  # the published folder splits as the release does
            stems = [Path(p).name.rsplit(".", 1)[0] for p in load_records(name, out, split).paths]
            assert stems == [Path(p).name.rsplit(".", 1)[0] for p in load_records(name, root, split).paths]


# ---------------------------------------------------------------------------- python -m mtlue_fast.run


@pytest.fixture
def cache_root(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.mktemp("mtlue-cache")
    monkeypatch.setenv("MTLUE_CACHE", str(root))
    return root


def smoke(out, *extra):
    from mtlue_fast.run import main

    return main(["--dataset", "chestxray", "--preset", "smoke", "--device", "cpu", "--out", str(out), "--quiet", *extra])


def test_victims_on_the_published_files(cache_root, tmp_path, capsys):
    out = tmp_path / "run"
    assert smoke(out, "--victim-data", "files") == 2
    assert "--export-images" in capsys.readouterr().err
    assert smoke(out) == 0
    cache_report = json.loads((out / "report.json").read_text())
    assert cache_report["victim_data"] == "cache" and "published" not in cache_report
    stamps = {p: p.stat().st_mtime_ns for p in (out / "generator" / "generator.pt", out / "protected" / "images.npy")}
    assert smoke(out, "--victim-data", "files", "--export-images", "--resume") == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # surrogate, generator and protected cache reused
    report = json.loads((out / "report.json").read_text())
    assert report["victim_data"] == "files"
    published = report["published"]
    assert published["count"] == published["protected_count"] and published["delta_correlation"] > 0.99
    marker = json.loads((out / "protected" / "images" / MARKER_FILE).read_text())
    assert marker["resolution"] == "original" and marker["delta_source"].startswith("recomputed")
    # the smoke sample's images are the cache's size: the files give the protected cache back exactly
    assert published["max_abs_diff_vs_protected_cache"] == 0
    assert report["drop"] == pytest.approx(cache_report["drop"], abs=1e-6)
    assert smoke(out, "--export-images", "--export-resolution", "working", "--resume") == 0
    marker = json.loads((out / "protected" / "images" / MARKER_FILE).read_text())
    assert "resolution" not in marker and marker["count"] == len(open_cache(out / "protected"))
    assert stamps[out / "protected" / "images.npy"] == (out / "protected" / "images.npy").stat().st_mtime_ns
    assert smoke(out, "--export-images", "--export-upsample", "inverse", "--resume") == 0
    marker = json.loads((out / "protected" / "images" / MARKER_FILE).read_text())
    assert marker["resolution"] == "original" and marker["upsample"] == "inverse"
    assert stamps[out / "protected" / "images.npy"] == (out / "protected" / "images.npy").stat().st_mtime_ns
    shutil.rmtree(out)


def test_export_upsample_is_checked():
    from mtlue_fast.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="export_upsample must be one of nearest, inverse"):
        RunConfig(dataset="chestxray", export_upsample="bicubic")
