"""GPU JPEG decoding through torchvision (mtlue_fast.data.gpu_decode) against the PIL path.

CPU tests check everything but the nvJPEG call itself: the device-side geometry (grayscale, centre
crop, antialiased resize) on PIL-decoded pixels, the routing of files (JPEG to the device, the rest to
PIL), the batching, and that corrupt files are skipped and reported; the decoder then runs with
``decode_fn`` standing in for ``torchvision.io.decode_jpeg``. The CUDA tests decode with nvJPEG.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from mtlue_fast.data import build_cache, load_records
from mtlue_fast.data import gpu_decode
from mtlue_fast.data.decode import PilDecoder, is_complete_jpeg, is_gpu_jpeg, jpeg_components
from mtlue_fast.data.gpu_decode import TorchvisionDecoder, crop_resize, to_gray
from mtlue_fast.data.specs import SPECS, ResizeSpec

sys.path.insert(0, str(Path(__file__).parent))
from decoder_tolerance import COLOUR, LUMA, assert_close  # noqa: E402

CELEBA = SPECS["celeba"].resize  # 178x218, centre 140 -> 70
UTKFACE = SPECS["utkface"].resize  # 200 -> 140


def _natural(height: int, width: int, seed: int) -> Image.Image:
    """Smooth colour gradients, mild noise and a few hard-edged shapes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        a, b, phase = rng.uniform(0.5, 3.0, 3)
        channels.append(127 + 90 * np.sin(x / width * a * 6 + phase) * np.cos(y / height * b * 6) + rng.normal(0, 5, (height, width)))
    image = Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        size = int(rng.integers(width // 10, width // 3))
        draw.rectangle([x0, y0, x0 + size, y0 + size // 2], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("gpu_decode")
    sets: dict[str, list[str]] = {"celeba": [], "utkface": [], "png": [], "gray_jpeg": [], "cmyk_jpeg": [], "progressive": []}
    for i in range(7):
        path = root / f"celeba_{i}.jpg"
        _natural(218, 178, i).save(path, quality=92)
        sets["celeba"].append(str(path))
    for i in range(3):
        path = root / f"utk_{i}.jpg"
        _natural(200, 200, 10 + i).save(path, quality=90)
        sets["utkface"].append(str(path))
    for i in range(2):
        path = root / f"png_{i}.png"
        _natural(218, 178, 20 + i).save(path)
        sets["png"].append(str(path))
    for i in range(2):
        path = root / f"gray_{i}.jpg"
        _natural(218, 178, 30 + i).convert("L").save(path, quality=90)
        sets["gray_jpeg"].append(str(path))
    for i in range(2):
        path = root / f"cmyk_{i}.jpg"
        _natural(218, 178, 40 + i).convert("CMYK").save(path, quality=90)
        sets["cmyk_jpeg"].append(str(path))
    for i in range(2):
        path = root / f"progressive_{i}.jpg"
        _natural(218, 178, 50 + i).save(path, quality=90, progressive=True)
        sets["progressive"].append(str(path))
    return sets


def pil_decode_fn(blobs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``decode_jpeg``'s stand-in: PIL decodes every blob to RGB ``[3, H, W]``; any failure raises."""
    out = []
    for blob in blobs:
        with Image.open(io.BytesIO(blob.numpy().tobytes())) as image:
            image.load()
            out.append(torch.from_numpy(np.asarray(image.convert("RGB")).transpose(2, 0, 1).copy()))
    return out


def _pil_full(path: str) -> torch.Tensor:
    return pil_decode_fn([torch.from_numpy(np.fromfile(path, dtype=np.uint8))])[0]


def _diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


# ---------------------------------------------------------------------------- geometry (CPU)


@pytest.mark.parametrize(
    "kind, resize",
    [
        ("celeba", CELEBA),
        ("utkface", UTKFACE),
        ("celeba", ResizeSpec(1, (70, 70), center_crop=(140, 140))),  # grayscale from colour
        ("celeba", ResizeSpec(3, (288, 384))),  # upscaling (NYUv2's size)
        ("gray_jpeg", CELEBA),
    ],
)
def test_crop_resize_matches_pil_on_the_same_pixels(files, kind, resize):
    """Only the resize's float arithmetic differs from PIL's fixed point: at most one grey level."""
    paths = files[kind]
    ours = crop_resize(torch.stack([_pil_full(p) for p in paths]), resize).numpy()
    ref, errors = PilDecoder(num_threads=1).decode(paths, resize)
    assert errors == [None] * len(paths) and ours.shape == ref.shape and ours.dtype == np.uint8
    diff = _diff(ours, ref)
    assert diff.max() <= 1 and diff.mean() < 0.3, (diff.max(), diff.mean())


def test_crop_offsets_exact(files):
    """Crop == size skips the resize; odd margins (218-139, 178-141) tell floor from rounding."""
    resize = ResizeSpec(3, (139, 141), center_crop=(139, 141))
    ours = crop_resize(torch.stack([_pil_full(p) for p in files["celeba"][:2]]), resize).numpy()
    ref, _ = PilDecoder().decode(files["celeba"][:2], resize)
    np.testing.assert_array_equal(ours, ref)


def test_crop_larger_than_image_raises():
    with pytest.raises(ValueError, match="larger than the 20x30 image"):
        crop_resize(torch.zeros(1, 3, 20, 30, dtype=torch.uint8), ResizeSpec(3, (8, 8), center_crop=(24, 24)))


def test_to_gray_is_pils_convert():
    rgb = np.random.default_rng(0).integers(0, 256, (31, 17, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(rgb).convert("L"))
    ours = to_gray(torch.from_numpy(rgb.transpose(2, 0, 1).copy()))[0].numpy()
    np.testing.assert_array_equal(ours, ref)


def test_is_complete_jpeg(files, tmp_path):
    data = np.fromfile(files["celeba"][0], dtype=np.uint8)
    assert is_complete_jpeg(data)
    assert not is_complete_jpeg(data[: len(data) // 3])  # cut short: no end-of-image marker
    assert not is_complete_jpeg(np.fromfile(files["png"][0], dtype=np.uint8))
    assert not is_complete_jpeg(np.zeros(0, np.uint8)) and not is_complete_jpeg(np.array([0xFF, 0xD8], np.uint8))


@pytest.mark.parametrize("kind, components", [("celeba", 3), ("gray_jpeg", 1), ("cmyk_jpeg", 4), ("progressive", 3)])
def test_jpeg_components(files, kind, components):
    data = np.fromfile(files[kind][0], dtype=np.uint8)
    assert jpeg_components(data) == components
    assert is_gpu_jpeg(data) == (components in (1, 3))


def test_jpeg_components_of_other_bytes(files):
    data = np.fromfile(files["celeba"][0], dtype=np.uint8)
    assert jpeg_components(np.fromfile(files["png"][0], dtype=np.uint8)) is None
    assert jpeg_components(data[:20]) is None  # ends before the frame header
    assert jpeg_components(np.array([0xFF, 0xD8, 0xFF, 0xD9], np.uint8)) is None  # no frame header
    garbage = np.concatenate([data[:2], np.full(1, 0xFF, np.uint8), np.zeros(200, np.uint8), data[-2:]])
    assert jpeg_components(garbage) is None and not is_gpu_jpeg(garbage)
    # fill bytes before a marker, and a restart marker, are stepped over
    padded = np.concatenate([data[:2], np.array([0xFF, 0xFF, 0xFF, 0xD0], np.uint8), data[2:]])
    assert jpeg_components(padded) == 3


# ---------------------------------------------------------------------------- the decoder (CPU, decode_fn)


def _decoder(**kwargs) -> TorchvisionDecoder:
    return TorchvisionDecoder("cpu", batch_size=kwargs.pop("batch_size", 4), num_threads=2, decode_fn=kwargs.pop("decode_fn", pil_decode_fn))


def test_decoder_matches_pil_mixed_sizes_and_formats(files):
    """JPEGs of two sizes share batches (grouped by size for the resize); PNGs go to PIL unchanged."""
    paths = files["celeba"][:3] + files["utkface"][:2] + files["png"] + files["celeba"][3:] + files["gray_jpeg"]
    resize = ResizeSpec(3, (70, 70), center_crop=(140, 140))
    calls = []

    def counting(blobs):
        calls.append(len(blobs))
        return pil_decode_fn(blobs)

    decoder = _decoder(decode_fn=counting)
    ours, errors = decoder.decode(paths, resize)
    ref, ref_errors = PilDecoder().decode(paths, resize)
    assert errors == ref_errors == [None] * len(paths)
    assert decoder.name == "torchvision-cpu" and decoder.pil_fallbacks == 0
    assert sum(calls) == len(paths) - len(files["png"]) and max(calls) <= 4  # every JPEG once, in batches
    assert _diff(ours, ref).max() <= 1
    png_rows = [paths.index(p) for p in files["png"]]
    np.testing.assert_array_equal(ours[png_rows], ref[png_rows])


def test_cmyk_jpegs_go_to_pil(files):
    """CMYK JPEGs never reach the device decoder; PIL converts them to RGB as the CPU cache does."""
    seen = []

    def recording(blobs):
        seen.extend(len(b) for b in blobs)
        return pil_decode_fn(blobs)

    paths = files["cmyk_jpeg"] + files["celeba"][:2] + files["progressive"]
    decoder = _decoder(decode_fn=recording)
    ours, errors = decoder.decode(paths, CELEBA)
    ref, _ = PilDecoder().decode(paths, CELEBA)
    assert errors == [None] * len(paths) and decoder.pil_fallbacks == 0
    cmyk_sizes = {len(np.fromfile(p, dtype=np.uint8)) for p in files["cmyk_jpeg"]}
    assert len(seen) == len(paths) - len(files["cmyk_jpeg"]) and not cmyk_sizes & set(seen)
    np.testing.assert_array_equal(ours[: len(files["cmyk_jpeg"])], ref[: len(files["cmyk_jpeg"])])
    assert _diff(ours, ref).max() <= 1


def test_files_are_read_in_batches_and_routed(tmp_path, files):
    """What both device decoders read through: bytes for the device, the rest for PIL, unreadable
    files named, batch by batch in order."""
    from concurrent.futures import ThreadPoolExecutor

    from mtlue_fast.data.decode import read_batches

    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    npy = tmp_path / "0.npy"
    np.save(npy, np.zeros((4, 4, 3), dtype=np.float32))
    paths = [files["celeba"][0], files["png"][0], str(empty), str(npy), files["cmyk_jpeg"][0],
             str(tmp_path / "missing.jpg"), files["gray_jpeg"][0]]  # fmt: skip
    with ThreadPoolExecutor(max_workers=3) as pool:
        batches = list(read_batches(paths, 3, is_gpu_jpeg, pool))
    assert [(b.device, b.host, sorted(b.errors)) for b in batches] == [([0], [1], [2]), ([], [3, 4], [5]), ([6], [], [])]
    assert "empty file" in batches[0].errors[2] and "FileNotFoundError" in batches[1].errors[5]
    np.testing.assert_array_equal(batches[0].blobs[0], np.fromfile(paths[0], dtype=np.uint8))
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert list(read_batches([], 3, is_gpu_jpeg, pool)) == []


def test_npy_images_go_to_pil(tmp_path, files):
    npy = tmp_path / "0.npy"
    np.save(npy, np.asarray(_natural(96, 128, 5), dtype=np.float32) / 255.0)
    paths = [str(npy), files["celeba"][0]]
    resize = SPECS["nyuv2"].resize
    ours, errors = _decoder().decode(paths, resize)
    ref, _ = PilDecoder().decode(paths, resize)
    assert errors == [None, None]
    np.testing.assert_array_equal(ours[0], ref[0])


def test_corrupt_files_are_reported(tmp_path, files):
    good = files["celeba"]
    data = open(good[0], "rb").read()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 3])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    not_image = tmp_path / "text.jpg"
    not_image.write_text("not an image")
    missing = str(tmp_path / "missing.jpg")
    paths = good[:2] + [str(truncated), good[2], str(empty)] + good[3:5] + [str(not_image), missing] + good[5:]
    bad = {2, 4, 7, 8}
    decoder = _decoder()
    ours, errors = decoder.decode(paths, CELEBA)
    assert {i for i, e in enumerate(errors) if e is not None} == bad
    assert all(isinstance(errors[i], str) and errors[i] for i in bad)
    assert decoder.pil_fallbacks == 0
    clean, _ = decoder.decode(good, CELEBA)
    np.testing.assert_array_equal(ours[[i for i in range(len(paths)) if i not in bad]], clean)


def test_rejected_jpeg_falls_back_to_pil(files):
    """A JPEG the device decoder rejects fails its batch; the batch is redone file by file and that
    file decoded by PIL (counted); when PIL fails too it is reported."""
    rejected = files["celeba"][1]
    size = len(np.fromfile(rejected, dtype=np.uint8))

    def picky(blobs):
        if any(len(b) == size for b in blobs):
            raise RuntimeError("nvJPEG: unsupported")
        return pil_decode_fn(blobs)

    decoder = _decoder(decode_fn=picky)
    paths = files["celeba"][:4]
    ours, errors = decoder.decode(paths, CELEBA)
    ref, _ = PilDecoder().decode(paths, CELEBA)
    assert errors == [None] * 4 and decoder.pil_fallbacks == 1
    np.testing.assert_array_equal(ours[1], ref[1])
    assert _diff(ours, ref).max() <= 1


def test_cuda_device_needs_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA"):
        TorchvisionDecoder("cuda")
    assert "no CUDA device" in gpu_decode.probe()  # the probe says no without a GPU, and why


# ---------------------------------------------------------------------------- nvJPEG (CUDA)


def _need_gpu_jpeg():
    reason = gpu_decode.why_unavailable()
    if reason is not None:
        pytest.skip(f"torchvision cannot decode JPEGs on this GPU: {reason}")


def _tolerance(kind: str, resize: ResizeSpec):
    return LUMA if resize.channels == 1 or kind == "gray_jpeg" else COLOUR


def _nvjpeg_one_by_one(paths: list[str], resize: ResizeSpec) -> np.ndarray:
    """Each file decoded alone by ``decode_jpeg(device="cuda")`` at full size, then ``crop_resize``:
    what the decoder's batching, grouping and copies must reproduce."""
    from torchvision.io import ImageReadMode, decode_jpeg

    rows = []
    for path in paths:
        blob = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
        (image,) = decode_jpeg([blob], mode=ImageReadMode.RGB, device="cuda")
        rows.append(crop_resize(image[None], resize)[0].cpu().numpy())
    return np.stack(rows)


@pytest.mark.cuda
@pytest.mark.parametrize(
    "kind, resize",
    [
        ("celeba", CELEBA),
        ("utkface", UTKFACE),
        ("celeba", ResizeSpec(1, (70, 70), center_crop=(140, 140))),
        ("gray_jpeg", CELEBA),
        ("progressive", CELEBA),
    ],
)
def test_nvjpeg_matches_pil(files, kind, resize):
    _need_gpu_jpeg()
    decoder = TorchvisionDecoder("cuda", batch_size=4)
    ours, errors = decoder.decode(files[kind], resize)
    ref, _ = PilDecoder().decode(files[kind], resize)
    assert errors == [None] * len(files[kind]) and decoder.pil_fallbacks == 0
    alone = _diff(ours, _nvjpeg_one_by_one(files[kind], resize)).max()
    assert alone <= 1, f"max |batched - each file alone| = {alone}"
    assert_close(ours, ref, _tolerance(kind, resize))


@pytest.mark.cuda
def test_nvjpeg_leaves_cmyk_to_pil(files):
    _need_gpu_jpeg()
    decoder = TorchvisionDecoder("cuda", batch_size=4)
    paths = files["cmyk_jpeg"] + files["celeba"][:2]
    ours, errors = decoder.decode(paths, CELEBA)
    ref, _ = PilDecoder().decode(paths, CELEBA)
    assert errors == [None] * len(paths) and decoder.pil_fallbacks == 0
    np.testing.assert_array_equal(ours[:2], ref[:2])
    assert_close(ours[2:], ref[2:], COLOUR)


@pytest.mark.cuda
def test_nvjpeg_corrupt_files_reported(tmp_path, files):
    _need_gpu_jpeg()
    good = files["celeba"]
    data = open(good[0], "rb").read()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(data[: len(data) // 3])
    garbled = tmp_path / "garbled.jpg"  # JPEG markers around garbage: nvJPEG must reject it, PIL too
    garbled.write_bytes(data[:2] + b"\xff" + bytes(200) + data[-2:])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    paths = good[:2] + [str(truncated), good[2], str(garbled), str(empty)] + good[3:]
    bad = {2, 4, 5}
    ours, errors = TorchvisionDecoder("cuda", batch_size=4).decode(paths, CELEBA)
    assert {i for i, e in enumerate(errors) if e is not None} == bad
    ref, _ = PilDecoder().decode(good, CELEBA)
    assert_close(ours[[i for i in range(len(paths)) if i not in bad]], ref, COLOUR)


@pytest.mark.cuda
def test_nvjpeg_cache_matches_cpu_cache(tmp_path):
    """The CelebA-format synthetic sample cached by nvJPEG and by PIL: same rows, close pixels."""
    _need_gpu_jpeg()
    from mtlue_fast.data import synthetic

    root = synthetic.write("celeba", tmp_path / "celeba", 40, 4, seed=0)
    gpu = build_cache("celeba", root, "train", tmp_path / "gpu", decoder="torchvision", progress=False)
    cpu = build_cache("celeba", root, "train", tmp_path / "cpu", decoder="pil", progress=False)
    assert gpu.manifest["decoder"] == "torchvision-cuda" and isinstance(gpu.images, np.memmap)
    assert np.array_equal(gpu.labels, cpu.labels) and gpu.images.shape == cpu.images.shape
    assert_close(np.asarray(gpu.images), np.asarray(cpu.images), COLOUR)


@pytest.mark.cuda
def test_nvjpeg_real_celeba_samples(samples):
    _need_gpu_jpeg()
    records = load_records("celeba", samples / "celeba", "train")
    ours, errors = TorchvisionDecoder("cuda").decode(records.paths, CELEBA)
    ref, _ = PilDecoder().decode(records.paths, CELEBA)
    assert errors == [None] * len(records.paths)
    assert_close(ours, ref, COLOUR)


@pytest.mark.cuda
def test_auto_decodes_on_the_gpu():
    from mtlue_fast.data import dali
    from mtlue_fast.data.cache import resolve_decoder

    if not (dali.available() or gpu_decode.available()):
        pytest.skip("neither DALI nor torchvision decodes on this GPU")
    assert resolve_decoder("auto").name in ("dali-gpu", "torchvision-cuda")
