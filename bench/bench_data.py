"""Data throughput: cache build (DALI vs PIL), the batch iterator, the streaming DALI loader.

Run:  pytest bench/bench_data.py --benchmark-json bench/results/<name>.json

Images/s are in ``extra_info["images"]`` / time. Test images are smooth random fields with noise
(JPEG/PNG sizes close to real photographs and radiographs), written once per session.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mtlue_fast.data import dali
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


@pytest.fixture(scope="session")
def image_files(tmp_path_factory) -> dict[str, list[str]]:
    from PIL import Image

    root = tmp_path_factory.mktemp("bench_images")
    rng = np.random.default_rng(0)
    files: dict[str, list[str]] = {"celeba_jpeg": [], "xray_png": []}
    for i, pixels in enumerate(smooth_images(rng, N_CELEBA, 218, 178, 3)):
        path = root / f"{i:06d}.jpg"
        Image.fromarray(pixels).save(path, quality=95)
        files["celeba_jpeg"].append(str(path))
    for i, pixels in enumerate(smooth_images(rng, N_XRAY, 1024, 1024, 1)):
        path = root / f"{i:08d}_000.png"
        Image.fromarray(pixels[..., 0], mode="L").save(path)
        files["xray_png"].append(str(path))
    return files


DECODERS = ["pil", pytest.param("dali", marks=pytest.mark.skipif(not dali.available(), reason="DALI not installed"))]
KINDS = {"celeba_jpeg": SPECS["celeba"].resize, "xray_png": SPECS["chestxray"].resize}


@pytest.mark.parametrize("decoder_name", DECODERS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_cache_decode(benchmark, image_files, kind, decoder_name):
    """What a cache build spends per chunk: decode + crop + resize into uint8 [n,C,H,W]."""
    decoder = PilDecoder() if decoder_name == "pil" else dali.DaliDecoder()
    paths = image_files[kind]
    decoder.decode(paths[:8], KINDS[kind])  # builds the DALI pipeline outside the timing
    benchmark.group = f"cache decode {kind}"
    benchmark.extra_info.update(images=len(paths), decoder=decoder.name)
    benchmark.pedantic(lambda: decoder.decode(paths, KINDS[kind]), rounds=3, warmup_rounds=1)


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

    benchmark.group = "dali stream celeba"
    benchmark.extra_info.update(images=stream.num_samples, device=device)
    benchmark.pedantic(epoch, rounds=3, warmup_rounds=1)
