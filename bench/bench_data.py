"""Data throughput: cache decoding and building per decoder, the batch iterator, the streaming DALI loader.

Run:  pytest bench/bench_data.py --benchmark-json bench/results/<name>.json

Images/s are in ``extra_info["images"]`` / time. Test images are smooth random fields with noise
(JPEG/PNG sizes close to real photographs and radiographs), written once per pytest run; the CelebA
JPEGs are laid out as the dataset (``img_align_celeba/`` and its two annotation files), so
``test_cache_build`` times :func:`mtlue_fast.data.build_cache` itself (decode, crop, resize, the
memory-mapped arrays, the manifest) from a fresh cache folder each round.

Decoders (``extra_info["variant"]``): ``pil-1thread`` (Pillow, one file after the other), ``pil``
(Pillow on the usable cores, at most 8), ``dali-cpu`` (DALI's CPU pipeline), ``dali-gpu`` (DALI's
mixed decoder) and ``torchvision-cuda`` (nvJPEG through ``torchvision.io.decode_jpeg``). The CPU
pipeline is what ``decoder="auto"`` takes without a GPU (``dali-cpu`` where DALI is installed, else
``pil``); the GPU decoders' target is >= 3x it on the same machine (``extra_info["role"]``). The GPU
cases skip without a GPU (and without DALI / torchvision's GPU decoder).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mtlue_fast.data import build_cache, dali, gpu_decode
from mtlue_fast.data.decode import PilDecoder
from mtlue_fast.data.loader import DeviceBatches
from mtlue_fast.data.specs import SPECS

N_CELEBA, N_XRAY = 512, 32


def smooth_images(rng, n, height, width, channels):
    """Low-frequency random fields plus mild noise, uint8 [n, H, W, C]."""
    coarse = rng.random((n, height // 16 + 2, width // 16 + 2, channels)).astype(np.float32)
    fine = torch.nn.functional.interpolate(
        torch.from_numpy(coarse).permute(0, 3, 1, 2), size=(height, width), mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1).numpy()
    noisy = fine * 200 + 20 + rng.normal(0, 6, fine.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def write_celeba_layout(root: Path, pixels: np.ndarray, quality: int = 95) -> list[str]:
    """``pixels`` uint8 [n, 218, 178, 3] as CelebA (``img_align_celeba/000001.jpg``..., the attribute
    and partition files, every image in the training split); returns the image paths."""
    from PIL import Image

    folder = root / "img_align_celeba"
    folder.mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, len(pixels) + 1)]
    for name, image in zip(names, pixels):
        Image.fromarray(image).save(folder / name, quality=quality)
    rng = np.random.default_rng(1)
    rows = [f"{name} " + " ".join(f"{v:2d}" for v in rng.choice([-1, 1], 40)) for name in names]
    (root / "list_attr_celeba.txt").write_text("\n".join([str(len(names)), " ".join(f"a{k}" for k in range(40)), *rows, ""]))
    (root / "list_eval_partition.txt").write_text("".join(f"{name} 0\n" for name in names))
    return [str(folder / name) for name in names]


@pytest.fixture(scope="session")
def image_files(tmp_path_factory) -> dict[str, list[str]]:
    from PIL import Image

    root = tmp_path_factory.mktemp("bench_images")
    rng = np.random.default_rng(0)
    files: dict[str, list[str]] = {"xray_png": []}
    files["celeba_jpeg"] = write_celeba_layout(root / "celeba", smooth_images(rng, N_CELEBA, 218, 178, 3))
    for i, pixels in enumerate(smooth_images(rng, N_XRAY, 1024, 1024, 1)):
        path = root / f"{i:08d}_000.png"
        Image.fromarray(pixels[..., 0], mode="L").save(path)
        files["xray_png"].append(str(path))
    return files


_NO_GPU = not torch.cuda.is_available()
DECODERS = [
    "pil-1thread",
    "pil",
    pytest.param("dali-cpu", marks=pytest.mark.skipif(not dali.available(), reason="DALI not installed")),
    pytest.param("dali-gpu", marks=pytest.mark.skipif(_NO_GPU or not dali.available(), reason="needs a GPU and DALI")),
    pytest.param("torchvision-cuda", marks=pytest.mark.skipif(_NO_GPU, reason="needs a GPU")),
]
KINDS = {"celeba_jpeg": SPECS["celeba"].resize, "xray_png": SPECS["chestxray"].resize}


def make_decoder(name: str):
    if name == "pil-1thread":
        return PilDecoder(num_threads=1)
    if name == "pil":
        return PilDecoder()
    if name.startswith("dali"):
        return dali.DaliDecoder(name.removeprefix("dali-"))
    reason = gpu_decode.why_unavailable()
    if reason is not None:
        pytest.skip(f"torchvision cannot decode JPEGs on this GPU: {reason}")
    return gpu_decode.TorchvisionDecoder("cuda")


def _check_no_fallbacks(decoder) -> None:
    """A GPU decoder that handed its files to PIL would be timed as PIL: count the fallbacks."""
    fallbacks = getattr(decoder, "pil_fallbacks", 0)
    assert fallbacks == 0, f"{decoder.name}: {fallbacks} files went to PIL; the timing is not the GPU decoder's"


def _role(name: str) -> str:
    """``cpu-pipeline``: what decoder="auto" takes without a GPU; ``gpu``; ``reference``."""
    if name in ("dali-gpu", "torchvision-cuda"):
        return "gpu"
    return "cpu-pipeline" if name == ("dali-cpu" if dali.available() else "pil") else "reference"


@pytest.mark.parametrize("decoder_name", DECODERS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_cache_decode(benchmark, image_files, kind, decoder_name):
    """What a cache build spends per chunk: decode + crop + resize into uint8 [n,C,H,W]."""
    if decoder_name == "torchvision-cuda" and kind != "celeba_jpeg":
        pytest.skip("torchvision decodes JPEGs on the GPU; PNGs go to PIL")
    decoder = make_decoder(decoder_name)
    paths = image_files[kind]
    decoder.decode(paths[:8], KINDS[kind])  # builds the DALI pipeline / nvJPEG state outside the timing
    benchmark.group = f"cache decode {kind}"
    benchmark.extra_info.update(images=len(paths), variant=decoder_name, decoder=decoder.name, role=_role(decoder_name), kind="data")
    benchmark.pedantic(lambda: decoder.decode(paths, KINDS[kind]), rounds=3, warmup_rounds=1)
    _check_no_fallbacks(decoder)


@pytest.mark.parametrize("decoder_name", DECODERS)
def test_cache_build(benchmark, image_files, tmp_path, decoder_name):
    """``build_cache`` of the CelebA-layout JPEGs, into a fresh cache folder each round (the
    original files stay in the page cache: what a build from a local disk does after the first read)."""
    decoder = make_decoder(decoder_name)
    root = Path(image_files["celeba_jpeg"][0]).parent.parent
    decoder.decode(image_files["celeba_jpeg"][:8], KINDS["celeba_jpeg"])
    rounds = iter(range(10**6))

    def fresh():
        return (), {"cache_dir": tmp_path / f"round{next(rounds)}"}

    def build(cache_dir):
        build_cache("celeba", root, "train", cache_dir, decoder=decoder, progress=False)

    benchmark.group = "cache build celeba 70x70"
    benchmark.extra_info.update(images=len(image_files["celeba_jpeg"]), variant=decoder_name, decoder=decoder.name,
                                role=_role(decoder_name), kind="data")  # fmt: skip
    benchmark.pedantic(build, setup=fresh, rounds=3, warmup_rounds=1)
    _check_no_fallbacks(decoder)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))])
def test_batch_iterator_celeba(benchmark, device):
    """CelebA 70x70 cache, batch 512, random crop 64 + flip delivered to the device."""
    n = 16384
    images = np.random.default_rng(0).integers(0, 256, (n, 3, 70, 70), dtype=np.uint8)
    labels = np.random.default_rng(1).integers(0, 2, (n, 40))
    batches = DeviceBatches(images, labels, 512, device, crop=(64, 64), train=True)

    def epoch():
        for x, _ in batches:
            pass
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = "batch iterator celeba 70x70 b512"
    benchmark.extra_info.update(images=batches.num_samples, device=device, resident=batches.resident)
    benchmark.pedantic(epoch, rounds=3, warmup_rounds=1)


@pytest.mark.skipif(not dali.available(), reason="DALI not installed")
def test_dali_stream_celeba(benchmark, image_files):
    from mtlue_fast.data.records import Records, SkipLog

    paths = image_files["celeba_jpeg"]
    records = Records("celeba", "train", str(Path(paths[0]).parent), paths, np.zeros((len(paths), 40), np.int64),
                      [f"a{k}" for k in range(40)], [2] * 40, SkipLog("celeba"))  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    stream = dali.DaliStream(records, SPECS["celeba"].resize, 128, device, crop=(64, 64), train=True)

    def epoch():
        for x, _ in stream:
            pass
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.group = "dali stream celeba"
    benchmark.extra_info.update(images=stream.num_samples, device=device)
    benchmark.pedantic(epoch, rounds=3, warmup_rounds=1)
