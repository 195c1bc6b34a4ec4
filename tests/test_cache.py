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


def test_each_decoder_builds_its_own_entry(celeba_root, tmp_path):
    """Decoders round differently: a cache made by one is never reused, or finished, by another."""

    class OtherDecoder(CountingDecoder):
        name = "other"

    pil, other = CountingDecoder(), OtherDecoder()
    first = build_cache("celeba", celeba_root, "train", tmp_path / "cache", decoder=pil, progress=False)
    second = build_cache("celeba", celeba_root, "train", tmp_path / "cache", decoder=other, progress=False)
    assert pil.files == other.files == 10 and first.path != second.path
    assert (first.manifest["decoder"], second.manifest["decoder"]) == ("pil", "other")
    assert first.manifest["source_digest"] != second.manifest["source_digest"]
    build_cache("celeba", celeba_root, "train", tmp_path / "cache", decoder=pil, progress=False)
    assert pil.files == 10  # its own entry is reused


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


# ---------------------------------------------------------------------------- which decoder


@pytest.mark.parametrize(
    "requested, gpu, dali, gpu_jpeg, expected",
    [
        ("auto", True, True, True, "dali-gpu"),  # a GPU: DALI's mixed decoder first
        ("auto", True, True, False, "dali-gpu"),
        ("auto", True, False, True, "torchvision-gpu"),  # no DALI: nvJPEG through torchvision
        ("auto", True, False, False, "pil"),  # neither decodes on this GPU: the CPU path
        ("auto", False, True, False, "dali-cpu"),
        ("auto", False, False, False, "pil"),
        ("dali", True, True, False, "dali-gpu"),
        ("dali", False, True, False, "dali-cpu"),
        ("torchvision", True, False, True, "torchvision-gpu"),
        ("torchvision", True, True, True, "torchvision-gpu"),
        ("pil", True, True, True, "pil"),
    ],
)
def test_choose_decoder(requested, gpu, dali, gpu_jpeg, expected):
    from mtlue_fast.data.cache import choose_decoder

    assert choose_decoder(requested, gpu=gpu, dali=dali, gpu_jpeg=gpu_jpeg) == expected


@pytest.mark.parametrize(
    "requested, gpu, dali, gpu_jpeg, message",
    [
        ("dali", True, False, True, "DALI is not installed"),
        ("torchvision", False, False, False, "no CUDA GPU"),
        ("torchvision", True, True, False, "cannot decode JPEGs on this GPU"),
        ("nvjpeg", True, True, True, "decoder must be one of 'auto', 'dali', 'torchvision', 'pil'"),
    ],
)
def test_choose_decoder_refuses(requested, gpu, dali, gpu_jpeg, message):
    from mtlue_fast.data.cache import choose_decoder

    with pytest.raises((RuntimeError, ValueError), match=message):
        choose_decoder(requested, gpu=gpu, dali=dali, gpu_jpeg=gpu_jpeg)


@pytest.fixture
def machine(monkeypatch):
    """Pretend availability: ``machine(gpu=..., dali=..., gpu_jpeg=...)``; returns the probes' calls."""
    import torch

    from mtlue_fast.data import dali, gpu_decode

    probed: list[str] = []

    def pretend(gpu: bool, has_dali: bool, gpu_jpeg: bool) -> list[str]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        monkeypatch.setattr(dali, "available", lambda: probed.append("dali") or has_dali)
        monkeypatch.setattr(gpu_decode, "available", lambda: probed.append("gpu_jpeg") or gpu_jpeg)
        return probed

    return pretend


@pytest.mark.parametrize(
    "requested, gpu, has_dali, gpu_jpeg, name, probes",
    [
        ("auto", True, True, True, "dali-gpu", ["dali"]),  # DALI settles it: torchvision is not probed
        ("auto", True, False, True, "torchvision-cuda", ["dali", "gpu_jpeg"]),
        ("auto", True, False, False, "pil", ["dali", "gpu_jpeg"]),
        ("auto", False, True, True, "dali-cpu", ["dali"]),  # no GPU: nothing GPU-side is probed
        ("auto", False, False, True, "pil", ["dali"]),
        ("torchvision", True, True, True, "torchvision-cuda", ["gpu_jpeg"]),
        ("pil", True, True, True, "pil", []),
    ],
)
def test_resolve_decoder_builds_the_choice(machine, requested, gpu, has_dali, gpu_jpeg, name, probes):
    from mtlue_fast.data.cache import resolve_decoder

    probed = machine(gpu, has_dali, gpu_jpeg)
    assert resolve_decoder(requested).name == name  # constructing builds no pipeline, touches no GPU
    assert probed == probes


def test_a_cpu_run_decodes_on_the_cpu_where_a_gpu_is_visible(machine):
    from mtlue_fast.data.cache import resolve_decoder

    probed = machine(True, True, True)
    assert resolve_decoder("auto", gpu=False).name == "dali-cpu"
    assert resolve_decoder("dali", gpu=False).name == "dali-cpu"
    assert resolve_decoder("auto", gpu=True).name == "dali-gpu"
    with pytest.raises(RuntimeError, match="no CUDA GPU is available"):
        resolve_decoder("torchvision", gpu=False)
    assert "gpu_jpeg" not in probed


def test_resolve_decoder_passes_a_decoder_through():
    from mtlue_fast.data.cache import resolve_decoder

    decoder = PilDecoder(num_threads=1)
    assert resolve_decoder(decoder) is decoder


def test_pil_threads_give_the_same_cache_rows(celeba_root):
    records = load_records("celeba", celeba_root, "train")
    one, errors_one = PilDecoder(num_threads=1).decode(records.paths, CELEBA_RESIZE)
    many, errors_many = PilDecoder(num_threads=3).decode(records.paths, CELEBA_RESIZE)
    assert errors_one == errors_many == [None] * 10 and np.array_equal(one, many)
    with pytest.raises(ValueError, match="num_threads"):
        PilDecoder(num_threads=0)


def _pil_stand_in_for_nvjpeg(blobs):
    """``torchvision.io.decode_jpeg``'s stand-in on a CPU: PIL decodes each blob to RGB ``[3, H, W]``."""
    import io

    import torch
    from PIL import Image

    out = []
    for blob in blobs:
        with Image.open(io.BytesIO(blob.numpy().tobytes())) as image:
            image.load()
            out.append(torch.from_numpy(np.asarray(image.convert("RGB")).transpose(2, 0, 1).copy()))
    return out


def _decoder_for(path: str):
    from mtlue_fast.data import dali, gpu_decode

    if path == "pil":
        return PilDecoder(num_threads=1)
    if path == "pil-threads":
        return PilDecoder(num_threads=2)
    if path == "dali-cpu":
        if not dali.available():
            pytest.skip("DALI not installed")
        return dali.DaliDecoder("cpu", batch_size=4, num_threads=2)
    if path == "torchvision-stand-in":  # the GPU decoder's batching and routing, PIL decoding in its place
        return gpu_decode.TorchvisionDecoder("cpu", batch_size=4, num_threads=2, decode_fn=_pil_stand_in_for_nvjpeg)
    if path == "dali-gpu":
        if not dali.available():
            pytest.skip("DALI not installed")
        return dali.DaliDecoder("gpu", batch_size=4)
    if not gpu_decode.available():
        pytest.skip("torchvision cannot decode JPEGs on this GPU")
    return gpu_decode.TorchvisionDecoder("cuda", batch_size=4)


@pytest.mark.parametrize(
    "path",
    ["pil", "pil-threads", "dali-cpu", "torchvision-stand-in",
     pytest.param("dali-gpu", marks=pytest.mark.cuda), pytest.param("torchvision-cuda", marks=pytest.mark.cuda)],
)  # fmt: skip
def test_every_decoder_skips_and_counts_corrupt_images(celeba_root, tmp_path, path):
    folder = celeba_root / "img_align_celeba"
    data = (folder / "000002.jpg").read_bytes()
    (folder / "000002.jpg").write_bytes(data[: len(data) // 3])  # truncated
    (folder / "000005.jpg").write_bytes(b"")  # empty
    (folder / "000008.jpg").write_text("not an image")
    decoder = _decoder_for(path)
    cache = build_cache("celeba", celeba_root, "train", tmp_path / "cache", decoder=decoder, progress=False)
    records = load_records("celeba", celeba_root, "train")
    keep = [i for i in range(10) if i not in (1, 4, 7)]
    assert len(cache) == 7 and np.array_equal(cache.labels, records.labels[keep])
    assert cache.manifest["skipped"]["counts"] == {"undecodable_images": 3}
    assert cache.manifest["decoder"] == decoder.name
    assert getattr(decoder, "pil_fallbacks", 0) == 0
    reference, _ = PilDecoder().decode([records.paths[i] for i in keep], CELEBA_RESIZE)
    diff = np.abs(np.asarray(cache.images, dtype=np.int16) - reference)
    # Pure noise JPEGs: the worst case for decoders that differ (DALI's and nvJPEG's resize/IDCT).
    assert diff.mean() < 3.0 if path.startswith(("dali", "torchvision-cuda")) else diff.max() <= 1
