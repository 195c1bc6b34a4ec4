"""DALI decoding (mtlue_fast.data.dali) against the PIL reference decoder, and the DALI stream loader.

Skipped as a whole when NVIDIA DALI is not installed. Runs CPU pipelines (device_id=None).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nvidia.dali")

from PIL import Image, ImageDraw  # noqa: E402

from mtlue_fast.data.dali import DaliDecoder, DaliStream, available  # noqa: E402
from mtlue_fast.data.decode import PilDecoder  # noqa: E402
from mtlue_fast.data.records import Records, SkipLog  # noqa: E402
from mtlue_fast.data.specs import SPECS, ResizeSpec  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from decoder_tolerance import COLOUR, assert_close  # noqa: E402

# DALI vs PIL tolerances. Measured (DALI 2.4 CPU, Pillow 12/13) on these synthetic images and on
# 500 CelebA-like JPEGs / 50 1024x1024 PNGs: mean |diff| 0.08-0.4 grey levels (0.3-0.6 for grayscale
# from colour, where DALI truncates and PIL rounds); away from the image border the max is 1-2
# (fixed-point vs float filter weights); on the outermost 1-2 output pixels up to ~10 at sharp
# edges, because PIL renormalises the antialiasing kernel where it leaves the image while DALI
# clamps coordinates (repeats the edge). The bounds leave about 2x margin.
MEAN_TOL = 1.0
INTERIOR_MAX_TOL = 3
MAX_TOL = 16


def _natural(height: int, width: int, seed: int) -> Image.Image:
    """Smooth colour gradients, mild noise and a few hard-edged shapes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        a, b, phase = rng.uniform(0.5, 3.0, 3)
        wave = np.sin(x / width * a * 6 + phase) * np.cos(y / height * b * 6)
        channels.append(127 + 90 * wave + rng.normal(0, 5, (height, width)))
    image = Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        size = int(rng.integers(width // 10, width // 3))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse([x0, y0, x0 + size, y0 + size], fill=colour)
        else:
            draw.rectangle([x0, y0, x0 + size, y0 + size // 2], fill=colour)
    return image


def _rgba(image: Image.Image) -> Image.Image:
    """RGBA with an alpha ramp (PIL's convert("L") ignores alpha; so must DALI)."""
    rgba = np.asarray(image.convert("RGBA")).copy()
    rgba[..., 3] = np.linspace(0, 255, rgba.shape[1]).astype(np.uint8)[None]
    return Image.fromarray(rgba, "RGBA")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, list[str]]:
    """Small test sets, by kind: CelebA-like (178x218 JPEG), UTKFace-like (200x200 JPEG),
    ChestX-ray-like (256x256 grayscale PNG, one RGBA), RGBA PNGs, RGB PNGs and NYUv2-like .npy."""
    root = tmp_path_factory.mktemp("dali_images")
    sets: dict[str, list[str]] = {k: [] for k in ("celeba", "utkface", "chest", "rgba", "png", "npy")}
    for i in range(6):
        path = root / f"celeba_{i}.jpg"
        _natural(218, 178, i).save(path, quality=92)
        sets["celeba"].append(str(path))
    for i in range(3):
        path = root / f"utk_{i}.jpg"
        _natural(200, 200, 10 + i).save(path, quality=90)
        sets["utkface"].append(str(path))
    for i in range(3):
        path = root / f"chest_{i}.png"
        gray = _natural(256, 256, 20 + i).convert("L")
        (_rgba(gray.convert("RGB")) if i == 0 else gray).save(path)
        sets["chest"].append(str(path))
    for i in range(3):
        path = root / f"rgba_{i}.png"
        _rgba(_natural(218, 178, 30 + i)).save(path)
        sets["rgba"].append(str(path))
    for i in range(3):
        path = root / f"png_{i}.png"
        _natural(218, 178, 40 + i).save(path)
        sets["png"].append(str(path))
    for i in range(2):
        path = root / f"nyu_{i}.npy"
        np.save(path, np.asarray(_natural(96, 128, 50 + i), dtype=np.float32) / 255.0)
        sets["npy"].append(str(path))
    return sets


@pytest.fixture(scope="module")
def decoder() -> DaliDecoder:
    return DaliDecoder("cpu", batch_size=4, num_threads=2)


def _assert_close_to_pil(ours: np.ndarray, ref: np.ndarray) -> None:
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    interior = diff[..., 2:-2, 2:-2]
    assert diff.mean() < MEAN_TOL, f"mean |DALI - PIL| = {diff.mean():.3f}"
    assert interior.max() <= INTERIOR_MAX_TOL, f"max |DALI - PIL| away from the border = {interior.max()}"
    assert diff.max() <= MAX_TOL, f"max |DALI - PIL| = {diff.max()}"


def test_available():
    assert available()


def test_device_and_name():
    assert DaliDecoder("cpu").name == "dali-cpu"
    auto = DaliDecoder("auto")
    assert auto.name == ("dali-gpu" if torch.cuda.is_available() else "dali-cpu")
    with pytest.raises(ValueError):
        DaliDecoder("tpu")


@pytest.mark.parametrize(
    "dataset, kind, resize",
    [
        ("celeba", "celeba", SPECS["celeba"].resize),  # 178x218, centre crop 140 -> 70
        ("utkface", "utkface", SPECS["utkface"].resize),  # 200 -> 140
        ("chestxray", "chest", ResizeSpec(1, (64, 64))),  # grayscale 256 -> 64 (RGBA one included)
        ("chestxray-full", "chest", SPECS["chestxray"].resize),  # 256 -> 256: no resize
        ("nyuv2", "png", SPECS["nyuv2"].resize),  # 178x218 -> 288x384: upscaling
        ("celeba-gray", "celeba", ResizeSpec(1, (70, 70), center_crop=(140, 140))),
    ],
)
def test_matches_pil(decoder, images, dataset, kind, resize):
    paths = images[kind]
    ours, errors = decoder.decode(paths, resize)
    ref, ref_errors = PilDecoder().decode(paths, resize)
    assert errors == [None] * len(paths) and ref_errors == errors
    assert ours.dtype == np.uint8 and ours.shape == (len(paths), resize.channels, *resize.size)
    _assert_close_to_pil(ours, ref)
    assert decoder.pil_fallbacks == 0  # DALI decoded everything itself


def test_center_crop_offsets_exact(decoder, images):
    """Crop == size skips the resize: any offset error ((H-h)//2 vs rounding) shows as a mismatch.
    218-139 and 178-141 are odd, so floor and round differ."""
    resize = ResizeSpec(3, (139, 141), center_crop=(139, 141))
    ours, _ = decoder.decode(images["png"], resize)
    ref, _ = PilDecoder().decode(images["png"], resize)
    np.testing.assert_array_equal(ours, ref)


def test_gray_from_rgba(decoder, images):
    """RGBA -> one channel like PIL's convert("L") (alpha ignored): same size, at most 1 level off."""
    resize = ResizeSpec(1, (218, 178))
    ours, errors = decoder.decode(images["rgba"], resize)
    ref, _ = PilDecoder().decode(images["rgba"], resize)
    assert errors == [None] * 3 and ours.shape == (3, 1, 218, 178)
    assert np.abs(ours.astype(np.int16) - ref).max() <= 1
    resized, _ = decoder.decode(images["rgba"], ResizeSpec(1, (70, 70), center_crop=(140, 140)))
    resized_ref, _ = PilDecoder().decode(images["rgba"], ResizeSpec(1, (70, 70), center_crop=(140, 140)))
    _assert_close_to_pil(resized, resized_ref)


def test_npy_delegated_to_pil(decoder, images):
    paths = images["npy"] + images["png"][:1]
    ours, errors = decoder.decode(paths, SPECS["nyuv2"].resize)
    ref, _ = PilDecoder().decode(paths, SPECS["nyuv2"].resize)
    assert errors == [None] * 3
    np.testing.assert_array_equal(ours[:2], ref[:2])


def test_pipeline_reused(decoder, images):
    resize = SPECS["celeba"].resize
    decoder.decode(images["celeba"], resize)
    pipe = decoder._pipes[resize]
    decoder.decode(images["celeba"][:3], resize)  # a short batch on the same pipeline
    assert decoder._pipes[resize] is pipe


def test_corrupt_files_reported(tmp_path, images):
    good = images["celeba"]
    data = open(good[0], "rb").read()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 3])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    not_image = tmp_path / "text.png"
    not_image.write_text("not an image")
    missing = str(tmp_path / "missing.jpg")
    paths = good[:2] + [str(truncated), good[2], str(empty)] + good[3:5] + [str(not_image), missing] + good[5:]
    bad = {2, 4, 7, 8}
    resize = SPECS["celeba"].resize
    dec = DaliDecoder("cpu", batch_size=4, num_threads=2)  # bad files share batches with good ones
    ours, errors = dec.decode(paths, resize)
    assert {i for i, e in enumerate(errors) if e is not None} == bad
    assert all(isinstance(errors[i], str) and errors[i] for i in bad)
    assert dec.pil_fallbacks == 0
    clean, clean_errors = dec.decode(good, resize)  # the same pipeline is usable after the failures
    assert clean_errors == [None] * len(good)
    np.testing.assert_array_equal(ours[[i for i in range(len(paths)) if i not in bad]], clean)


def test_pil_fallback_for_formats_dali_lacks(tmp_path, images):
    """DALI has no GIF/TGA decoder: such files fail in DALI, then decode with PIL (not errors)."""
    tga = tmp_path / "image.tga"
    Image.open(images["celeba"][0]).save(tga)
    paths = images["celeba"][1:4] + [str(tga)]
    dec = DaliDecoder("cpu", batch_size=4, num_threads=2)
    ours, errors = dec.decode(paths, SPECS["celeba"].resize)
    ref, _ = PilDecoder().decode(paths, SPECS["celeba"].resize)
    assert errors == [None] * 4 and dec.pil_fallbacks == 1
    np.testing.assert_array_equal(ours[3], ref[3])
    _assert_close_to_pil(ours, ref)


# ---------------------------------------------------------------------------------------------
# DaliStream

STREAM_H, STREAM_W = 49, 41  # resized size == file size: no resize, so pixel values are exact


def _stream_image(i: int) -> np.ndarray:
    """R: the sample's id (10 + 4 i); G: 5 * column; B: 5 * row. Crops and flips are readable."""
    image = np.zeros((STREAM_H, STREAM_W, 3), dtype=np.uint8)
    image[..., 0] = 10 + 4 * i
    image[..., 1] = 5 * np.arange(STREAM_W)[None]
    image[..., 2] = 5 * np.arange(STREAM_H)[:, None]
    return image


@pytest.fixture(scope="module")
def stream_files(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("dali_stream")
    paths = []
    for i in range(51):
        path = root / f"{i:03d}.png"
        Image.fromarray(_stream_image(i)).save(path)
        paths.append(str(path))
    return paths


def _records(paths: list[str]) -> Records:
    n = len(paths)
    labels = np.stack([np.arange(n), np.arange(n) % 3], 1).astype(np.int64)
    return Records("celeba", "train", "/", list(paths), labels, ["id", "mod3"], [n, 3], SkipLog("celeba"))


def _stream(paths, n=None, **kwargs) -> DaliStream:
    args = dict(crop=(32, 32), train=True, seed=0, num_threads=2)
    args.update(kwargs)
    return DaliStream(_records(paths[:n]), ResizeSpec(3, (STREAM_H, STREAM_W)), 16, "cpu", **args)


def _collect(stream) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(stream)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def _read_geometry(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids from R, (top, left) offsets from the ramps, flipped?) of each output image."""
    x = images.long().numpy()
    ids = (x[:, 0, 0, 0] - 10) // 4
    green = x[:, 1, 0, :]
    flipped = green[:, 0] > green[:, -1]
    offsets = np.stack([x[:, 2, :, 0].min(1) // 5, green.min(1) // 5], 1)
    return ids, offsets, flipped


def test_stream_shapes_and_labels(stream_files):
    stream = _stream(stream_files, 50)
    assert stream.num_samples == 50 and len(stream) == 4
    batches = list(stream)
    assert [len(b[0]) for b in batches] == [16, 16, 16, 2]
    for images, labels in batches:
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
        assert labels.dtype == torch.int64 and labels.shape == (len(images), 2)
        assert images.device.type == labels.device.type == "cpu"
        ids, _, _ = _read_geometry(images)
        np.testing.assert_array_equal(ids, labels[:, 0].numpy())  # labels follow images
        np.testing.assert_array_equal(labels[:, 1].numpy(), labels[:, 0].numpy() % 3)
    assert stream.skipped == 0


def test_stream_train_crop_and_flip(stream_files):
    stream = _stream(stream_files, 50)
    images, labels = _collect(stream)
    ids, offsets, flipped = _read_geometry(images)
    index, plan_offsets, plan_flips = stream.epoch_plan()
    np.testing.assert_array_equal(ids, index)
    np.testing.assert_array_equal(offsets, plan_offsets)
    np.testing.assert_array_equal(flipped, plan_flips.astype(bool))
    assert 0.3 <= flipped.mean() <= 0.7  # p = 0.5 over 50 draws
    assert len(np.unique(offsets[:, 0])) > 5 and len(np.unique(offsets[:, 1])) > 3  # positions vary
    assert offsets[:, 0].max() <= STREAM_H - 32 and offsets[:, 1].max() <= STREAM_W - 32
    _assert_windows(images)
    assert stream.pil_fallbacks == 0 and stream.skipped == 0


def _assert_windows(images: torch.Tensor) -> None:
    """Each output is exactly its window of the source, maybe mirrored."""
    ids, offsets, flipped = _read_geometry(images)
    for k in range(len(images)):
        top, left = offsets[k]
        window = _stream_image(int(ids[k]))[top : top + 32, left : left + 32]
        window = torch.from_numpy(window.transpose(2, 0, 1).copy())
        expected = window.flip(-1) if flipped[k] else window
        assert torch.equal(images[k], expected)


def test_stream_pil_fallback(tmp_path, stream_files):
    """A format DALI lacks (TGA) but PIL reads goes through PIL with the same crop and flip."""
    paths = list(stream_files[:20])
    tga = tmp_path / "007.tga"
    Image.fromarray(_stream_image(7)).save(tga)
    paths[7] = str(tga)
    stream = _stream(paths, seed=2)
    images, labels = _collect(stream)
    assert stream.pil_fallbacks == 1 and stream.skipped == 0 and len(images) == 20
    ids, _, _ = _read_geometry(images)
    np.testing.assert_array_equal(ids, labels[:, 0].numpy())
    _assert_windows(images)


def test_stream_eval_center_crop(stream_files):
    stream = _stream(stream_files, 20, train=False, shuffle=False)
    images, labels = _collect(stream)
    ids, offsets, flipped = _read_geometry(images)
    np.testing.assert_array_equal(ids, np.arange(20))
    assert not flipped.any()
    assert (offsets == [(STREAM_H - 32) // 2, (STREAM_W - 32) // 2]).all()  # 8, 4 (floor of 8.5, 4.5)


def test_stream_no_crop_matches_decoder(images):
    paths = images["celeba"]
    resize = SPECS["celeba"].resize
    records = _records(paths)
    stream = DaliStream(records, resize, 4, "cpu", crop=None, train=False, shuffle=False, num_threads=2)
    streamed, _ = _collect(stream)
    decoded, _ = DaliDecoder("cpu", batch_size=4, num_threads=2).decode(paths, resize)
    np.testing.assert_array_equal(streamed.numpy(), decoded)


def test_stream_determinism(stream_files):
    first = _collect(_stream(stream_files, 50, seed=3))
    again = _collect(_stream(stream_files, 50, seed=3))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    stream = _stream(stream_files, 50, seed=3)
    stream.set_epoch(1)
    other_epoch = _collect(stream)
    assert not torch.equal(first[1][:, 0], other_epoch[1][:, 0])
    assert sorted(first[1][:, 0].tolist()) == sorted(other_epoch[1][:, 0].tolist()) == list(range(50))
    stream.set_epoch(0)
    assert torch.equal(_collect(stream)[0], first[0])
    other_seed = _collect(_stream(stream_files, 50, seed=4))
    assert not torch.equal(first[1], other_seed[1])


def test_stream_sharding(stream_files):
    seen = []
    for rank in range(2):
        stream = _stream(stream_files, 50, rank=rank, world_size=2, seed=1)
        assert stream.num_samples == 25 and len(stream) == 2
        seen.append(set(_collect(stream)[1][:, 0].tolist()))
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(50))
    # 51 samples: padded by wrapping to 26 per rank (one sample seen twice)...
    padded = [_collect(_stream(stream_files, 51, rank=r, world_size=2, seed=1))[1][:, 0].tolist() for r in range(2)]
    assert [len(p) for p in padded] == [26, 26] and set(padded[0]) | set(padded[1]) == set(range(51))
    # ... or truncated to 25 per rank with drop_last.
    dropped = [_stream(stream_files, 51, rank=r, world_size=2, seed=1, drop_last=True) for r in range(2)]
    assert [s.num_samples for s in dropped] == [25, 25]
    ids = [set(_collect(s)[1][:, 0].tolist()) for s in dropped]
    assert ids[0].isdisjoint(ids[1])


def test_stream_drop_last(stream_files):
    stream = _stream(stream_files, 50, drop_last=True)
    assert len(stream) == 3
    batches = list(stream)
    assert [len(b[0]) for b in batches] == [16, 16, 16]


def test_stream_skips_corrupt_files(tmp_path, stream_files):
    paths = list(stream_files[:20])
    data = open(paths[5], "rb").read()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    paths[5] = str(tmp_path / "truncated.png")
    paths[12] = str(tmp_path / "empty.png")
    stream = _stream(paths, shuffle=False)
    images, labels = _collect(stream)
    assert stream.skipped == 2 and len(images) == 18
    ids, _, _ = _read_geometry(images)
    np.testing.assert_array_equal(ids, labels[:, 0].numpy())
    assert set(labels[:, 0].tolist()) == set(range(20)) - {5, 12}
    assert stream.pil_fallbacks == 0 and stream.bad_paths == {paths[5], paths[12]}
    again, _ = _collect(stream)  # next pass: known-bad files are left out up front
    assert stream.skipped == 4 and torch.equal(again, images)


# ---------------------------------------------------------------------------------------------
# The mixed (GPU) decoder: the same checks against PIL


@pytest.fixture(scope="module")
def gpu_decoder() -> DaliDecoder:
    return DaliDecoder("gpu", batch_size=4, num_threads=2)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "kind, resize",
    [
        ("celeba", SPECS["celeba"].resize),
        ("utkface", SPECS["utkface"].resize),
        ("chest", ResizeSpec(1, (64, 64))),
        ("png", SPECS["nyuv2"].resize),
        ("celeba", ResizeSpec(1, (70, 70), center_crop=(140, 140))),
    ],
)
def test_gpu_matches_pil(gpu_decoder, images, kind, resize):
    assert gpu_decoder.name == "dali-gpu"
    paths = images[kind]
    ours, errors = gpu_decoder.decode(paths, resize)
    ref, _ = PilDecoder().decode(paths, resize)
    assert errors == [None] * len(paths) and ours.shape == (len(paths), resize.channels, *resize.size)
    if kind in ("celeba", "utkface"):  # JPEGs: nvJPEG's DCT and chroma upsampling (tests/decoder_tolerance.py)
        assert_close(ours, ref, COLOUR, "DALI - PIL")
    else:  # PNGs are decoded on the host; only the resize differs
        _assert_close_to_pil(ours, ref)
    assert gpu_decoder.pil_fallbacks == 0


@pytest.mark.cuda
def test_gpu_center_crop_offsets_exact(gpu_decoder, images):
    resize = ResizeSpec(3, (139, 141), center_crop=(139, 141))
    ours, _ = gpu_decoder.decode(images["png"], resize)  # PNG: lossless, so the crop alone decides
    ref, _ = PilDecoder().decode(images["png"], resize)
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.cuda
def test_gpu_corrupt_files_reported(tmp_path, images):
    good = images["celeba"]
    data = open(good[0], "rb").read()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 3])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    not_image = tmp_path / "text.png"
    not_image.write_text("not an image")
    paths = good[:2] + [str(truncated), good[2], str(empty)] + good[3:5] + [str(not_image)] + good[5:]
    bad = {2, 4, 7}
    dec = DaliDecoder("gpu", batch_size=4, num_threads=2)
    ours, errors = dec.decode(paths, SPECS["celeba"].resize)
    assert {i for i, e in enumerate(errors) if e is not None} == bad
    clean, clean_errors = dec.decode(good, SPECS["celeba"].resize)  # usable after the failures
    assert clean_errors == [None] * len(good)
    np.testing.assert_array_equal(ours[[i for i in range(len(paths)) if i not in bad]], clean)
