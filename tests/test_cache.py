"""The uint8 cache: build, reuse, invalidation, interrupted builds, corrupt files, atomicity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from mtlue_fast.data import build_cache, load_records, open_cache
from mtlue_fast.data.dali import available as dali_available
from mtlue_fast.data.decode import PilDecoder
from mtlue_fast.data.specs import SPECS

CELEBA_RESIZE = SPECS["celeba"].resize


def write_mini_celeba(root: Path, n: int = 10, seed: int = 0) -> Path:
    """A CelebA-layout dataset of ``n`` random 178x218 JPEGs (train) plus 2 test images."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "img_align_celeba").mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, n + 3)]
    for name in names:
        pixels = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "img_align_celeba" / name, quality=95)
    attributes = [f"A{k}" for k in range(40)]
    rows = [f"{name} " + " ".join(f"{v:2d}" for v in rng.choice([-1, 1], 40)) for name in names]
    (root / "list_attr_celeba.txt").write_bytes("\r\n".join([str(len(names)), " ".join(attributes), *rows, ""]).encode())
    parts = [f"{name} {0 if i < n else 2}" for i, name in enumerate(names)]
    (root / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    return root


@pytest.fixture
def celeba_root(tmp_path):
    return write_mini_celeba(tmp_path / "celeba")


class CountingDecoder(PilDecoder):
    """PIL decoding that counts decoded files and can fail once after a number of chunks."""

    def __init__(self, fail_after_chunks: int | None = None):
        self.files, self.chunks, self.fail_after_chunks = 0, 0, fail_after_chunks

    def decode(self, paths, resize):
        if self.fail_after_chunks is not None and self.chunks == self.fail_after_chunks:
            raise KeyboardInterrupt("simulated interruption")
        self.chunks += 1
        self.files += len(paths)
        return super().decode(paths, resize)


def test_build_matches_direct_decoding_and_is_reused(celeba_root, tmp_path):
    decoder = CountingDecoder()
    cache = build_cache("celeba", celeba_root, "train", tmp_path / "cache", decoder=decoder, progress=False)
    records = load_records("celeba", celeba_root, "train")
    assert cache.images.shape == (10, 3, 70, 70) and cache.images.dtype == np.uint8
    assert np.array_equal(cache.labels, records.labels) and cache.task_names == records.task_names
    expected, _ = PilDecoder().decode(records.paths, CELEBA_RESIZE)
    assert np.array_equal(np.asarray(cache.images), expected)
    manifest = json.loads((cache.path / "manifest.json").read_text())
    assert manifest["count"] == 10 and len(manifest["sources"]) == 10 and manifest["size"] == [70, 70]
    again = build_cache("celeba", celeba_root, "train", tmp_path / "cache", decoder=decoder, progress=False)
    assert decoder.files == 10 and again.path == cache.path  # reused: nothing decoded twice
    assert not again.images.flags.writeable


def test_changed_source_or_settings_rebuild(celeba_root, tmp_path):
    decoder = CountingDecoder()
    build_cache("celeba", celeba_root, "train", tmp_path / "cache", decoder=decoder, progress=False)
    image = celeba_root / "img_align_celeba" / "000004.jpg"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: rebuild
    build_cache("celeba", celeba_root, "train", tmp_path / "cache", decoder=decoder, progress=False)
    assert decoder.files == 20
    small = build_cache("celeba", celeba_root, "train", tmp_path / "cache", size=(32, 32), decoder=decoder, progress=False)
    assert small.images.shape == (10, 3, 32, 32) and decoder.files == 30  # another entry beside it
    attr = celeba_root / "list_attr_celeba.txt"
    attr.write_bytes(attr.read_bytes().replace(b"000001.jpg -1", b"000001.jpg  1", 1).replace(b"000001.jpg  1  1", b"000001.jpg -1  1", 1))
    relabelled = build_cache("celeba", celeba_root, "train", tmp_path / "cache", decoder=decoder, progress=False)
    assert np.array_equal(relabelled.labels, load_records("celeba", celeba_root, "train").labels)


def test_interrupted_build_resumes_and_never_looks_complete(celeba_root, tmp_path):
    interrupted = CountingDecoder(fail_after_chunks=2)
    with pytest.raises(KeyboardInterrupt):
        build_cache("celeba", celeba_root, "train", tmp_path / "cache", decoder=interrupted, chunk_size=3, progress=False)
    (entry,) = (tmp_path / "cache").glob("celeba-train-*")
    assert not (entry / "manifest.json").exists() and not (entry / "images.npy").exists()
    with pytest.raises(FileNotFoundError, match="not a complete cache"):
        open_cache(entry)
    resumed = CountingDecoder()
    cache = build_cache("celeba", celeba_root, "train", tmp_path / "cache", decoder=resumed, chunk_size=3, progress=False)
    assert resumed.files == 4  # chunks 3 and 4 (3 + 1 images); the first 6 were kept
    fresh = build_cache("celeba", celeba_root, "train", tmp_path / "fresh", decoder="pil", progress=False)
    assert np.array_equal(np.asarray(cache.images), np.asarray(fresh.images))
    assert not (entry / "progress.json").exists()


def test_corrupt_and_truncated_images_are_skipped_and_counted(celeba_root, tmp_path, capsys):
    folder = celeba_root / "img_align_celeba"
    data = (folder / "000002.jpg").read_bytes()
    (folder / "000002.jpg").write_bytes(data[: len(data) // 3])  # truncated
    (folder / "000005.jpg").write_bytes(b"")  # empty
    cache = build_cache("celeba", celeba_root, "train", tmp_path / "cache", decoder="pil", progress=True)
    records = load_records("celeba", celeba_root, "train")
    keep = [i for i in range(10) if i not in (1, 4)]
    assert len(cache) == 8 and np.array_equal(cache.labels, records.labels[keep])
    reference, _ = PilDecoder().decode([records.paths[i] for i in keep], CELEBA_RESIZE)
    assert np.array_equal(np.asarray(cache.images), reference)
    assert cache.manifest["skipped"]["counts"] == {"undecodable_images": 2}
    expected_files = [os.path.relpath(records.paths[i], celeba_root) for i in keep]
    assert cache.manifest["row_files"] == expected_files  # row -> source file, failed rows dropped
    assert "2 undecodable image(s)" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="cannot decode .*strict=True"):
        build_cache("celeba", celeba_root, "train", tmp_path / "strict", decoder="pil", strict=True, progress=False)


def test_source_is_never_written(celeba_root, tmp_path):
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in celeba_root.rglob("*")}
    build_cache("celeba", celeba_root, "train", tmp_path / "cache", decoder="pil", progress=False)
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in celeba_root.rglob("*")} == before


def test_default_location_honours_env(celeba_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MTLUE_CACHE", str(tmp_path / "envcache"))
    cache = build_cache("celeba", celeba_root, "train", decoder="pil", progress=False)
    assert cache.path.parent == tmp_path / "envcache"


def test_bad_decoder_name(celeba_root, tmp_path):
    with pytest.raises(ValueError, match="decoder must be"):
        build_cache("celeba", celeba_root, "train", tmp_path / "c", decoder="opencv", progress=False)


def test_nyuv2_dense_maps(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "nyuv2"
    for i in range(3):
        arrays = {
            "image": rng.random((24, 32, 3), dtype=np.float32),
            "label": rng.integers(-1, 13, (24, 32)).astype(np.float32),
            "depth": rng.random((24, 32, 1), dtype=np.float32) * 10,
            "normal": rng.standard_normal((24, 32, 3)).astype(np.float32),
        }
        for folder, array in arrays.items():
            (root / "train" / folder).mkdir(parents=True, exist_ok=True)
            np.save(root / "train" / folder / f"{i}.npy", array)
    np.save(root / "train" / "label" / "2.npy", np.full((24, 32), 40.0, np.float32))  # out of range: skipped
    cache = build_cache("nyuv2", root, "train", tmp_path / "cache", size=(12, 16), decoder="pil", progress=False)
    assert cache.images.shape == (2, 3, 12, 16)
    assert set(cache.labels) == {"seg", "depth", "normal"}
    seg = np.load(root / "train" / "label" / "0.npy")
    assert np.array_equal(cache.labels["seg"][0], seg[::2, ::2].astype(np.int8))  # nearest neighbour
    assert cache.labels["depth"].shape == (2, 1, 12, 16) and cache.labels["normal"].dtype == np.float16
    assert cache.manifest["skipped"]["counts"] == {"undecodable_images": 1}


@pytest.mark.skipif(not dali_available(), reason="DALI not installed")
@pytest.mark.parametrize("dataset,size", [("celeba", None), ("chestxray", (64, 64)), ("utkface", (70, 70))])
def test_dali_and_pil_caches_agree_within_resize_tolerance(tmp_path, dataset, size):
    from mtlue_fast.data import synthetic

    root = synthetic.write(dataset, tmp_path / dataset, 24, 4, seed=0)
    pil = build_cache(dataset, root, "train", tmp_path / "pil", size=size, decoder="pil", progress=False)
    via_dali = build_cache(dataset, root, "train", tmp_path / "dali", size=size, decoder="dali", progress=False)
    assert via_dali.manifest["decoder"].startswith("dali") and pil.manifest["decoder"] == "pil"
    assert np.array_equal(pil.labels, via_dali.labels) and pil.images.shape == via_dali.images.shape
    diff = np.abs(np.asarray(pil.images, dtype=np.int16) - np.asarray(via_dali.images, dtype=np.int16))
    inner = diff[..., 2:-2, 2:-2]  # the resamplers treat the outermost pixels differently
    assert diff.mean() < 1.0 and inner.max() <= 3 and diff.max() <= 16
