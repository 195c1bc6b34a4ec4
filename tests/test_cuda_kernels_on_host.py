"""The CUDA kernels and launchers of the three ops, built for the host and checked against the reference.

``csrc/cuda/*.cu`` compile with a host C++ compiler when ``MTLUE_CUDA_HOST_EMULATION`` is defined
(``csrc/cuda/runtime.cuh``): every block's threads then run as host threads, with real barriers
for ``__syncthreads`` and the warp shuffles, and one shared array per block. The launchers pick the
kernels as on a GPU (tiled or wide, 16-byte vectors or element by element), so their indexing
(tiles, 16-byte runs and their heads and tails, windows, flips, reductions, the error buffer) is
checked here on fresh random inputs without a GPU. What the emulation cannot show (speed, the
device's memory model and arithmetic, the PTX) is left to the CUDA tests and to ``.ci/check_cuda``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from mtlue_fast.ops import reference

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"
HARNESS = Path(__file__).resolve().parent / "cuda_host"
SOURCES = ["perturb_apply_host.cpp", "quantize_export_host.cpp", "embedding_reg_host.cpp", "module.cpp"]
EPS = 8 / 255
MODES = {"clamp": 0, "tanh": 1}
RAW_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Crop slots of the error buffer (csrc/common/error_slots.h).
CROP_COUNT, CROP_SAMPLE, CROP_TOP, CROP_LEFT = 0, 1, 2, 3
EXPORT_OVERFLOW, OFFSETS_COUNT, OFFSETS_INDEX = 8, 9, 10


def _digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(HARNESS.glob("*")) + sorted((CSRC / "cuda").glob("*")) + sorted((CSRC / "common").glob("*")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


@pytest.fixture(scope="module")
def kernels():
    """The harness module (tests/cuda_host/module.cpp), built once per source digest and torch."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on PATH")
    from torch.utils.cpp_extension import load

    digest = _digest()
    root = Path(os.environ.get("MTLUE_JIT_DIR", Path.home() / ".cache" / "mtlue_fast" / "jit"))
    build = root / f"host-emulation-torch{torch.__version__}-{digest}".replace("+", "_")
    build.mkdir(parents=True, exist_ok=True)
    return load(
        name=f"mtlue_cuda_host_emulation_{digest}",
        sources=[str(HARNESS / name) for name in SOURCES],
        extra_include_paths=[str(CSRC), str(HARNESS)],
        extra_cflags=["-std=c++20", "-O1", "-ffp-contract=off", "-Wno-unknown-pragmas"],
        build_directory=str(build),
        verbose=False,
    )


def _inputs(gen, batch, channels, height, width, raw_dtype, offset=0):
    """uint8 x and a raw of ``raw_dtype`` starting ``offset`` elements into its buffer (an offset
    that breaks 16-byte alignment sends the launcher to the element-by-element kernels)."""
    x = torch.randint(0, 256, (batch, channels, height, width), generator=gen, dtype=torch.uint8)
    buffer = (torch.randn(batch * channels * height * width + offset, generator=gen) * 0.05).to(raw_dtype)
    # a few values beyond eps and beyond the image range, so the clamps' masks matter
    buffer[torch.randint(0, buffer.numel(), (buffer.numel() // 20,), generator=gen)] *= 8
    return x, buffer[offset:].view(batch, channels, height, width)


def _windows(gen, batch, height, width, out_h, out_w):
    crop = torch.stack([torch.randint(0, height - out_h + 1, (batch,), generator=gen),
                        torch.randint(0, width - out_w + 1, (batch,), generator=gen)], 1)  # fmt: skip
    return crop, torch.rand(batch, generator=gen) < 0.5


def _reference(x, raw, mode, crop, flip, out_size, grad_out):
    r = raw.detach().clone().requires_grad_(True)
    y = reference.perturb_apply(x, r, EPS, MODES[mode], crop, flip, out_size)
    y.backward(grad_out)
    return y.detach(), r.grad


def _check(kernels, gen, x, raw, mode, crop, flip, out_size):
    grad_out = torch.randn(x.shape[0], x.shape[1], *out_size, generator=gen).to(raw.dtype)
    out, errors = kernels.perturb_forward(x, raw, EPS, MODES[mode], crop, flip, *out_size)
    grad_raw, errors_back = kernels.perturb_backward(grad_out, x, raw, EPS, MODES[mode], crop, flip)
    want_out, want_grad = _reference(x, raw, mode, crop, flip, out_size, grad_out)
    # outputs start as NaN: an element no thread wrote fails here
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(grad_raw, want_grad)
    return errors, errors_back


# (batch, channels, H, W, out h, w, raw offset): CelebA's 70x70 cache cropped to 64 (two tiles per
# plane), ChestX-ray-like grey images, a window as wide as the image, windows whose rows start off
# the 16-byte grid, the same unaligned (element-by-element kernels), and an image wider than a tile
# (the wide kernels).
LAYOUTS = {
    "celeba-tiles": (3, 3, 70, 70, 64, 64, 0),
    "grey": (2, 1, 40, 36, 32, 28, 0),
    "full-width": (2, 3, 18, 20, 12, 20, 0),
    "odd-sizes": (2, 2, 23, 29, 17, 13, 0),
    "unaligned": (2, 3, 23, 29, 17, 13, 1),
    "wider-than-a-tile": (1, 1, 3, 4200, 2, 4100, 0),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("raw_dtype", RAW_DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_perturb_apply_matches_the_reference(kernels, gen, layout, raw_dtype, mode):
    batch, channels, height, width, out_h, out_w, offset = LAYOUTS[layout]
    x, raw = _inputs(gen, batch, channels, height, width, raw_dtype, offset)
    crop, flip = _windows(gen, batch, height, width, out_h, out_w)
    errors, errors_back = _check(kernels, gen, x, raw, mode, crop, flip, (out_h, out_w))
    assert not errors.any() and not errors_back.any()


@pytest.mark.parametrize("raw_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_centre_window_and_no_window(kernels, gen, raw_dtype):
    """No crop tensor: the centred window; no flip tensor: no flip; out size = the image: no crop."""
    x, raw = _inputs(gen, 2, 3, 70, 70, raw_dtype)
    _check(kernels, gen, x, raw, "tanh", None, None, (64, 64))
    _check(kernels, gen, x, raw, "clamp", None, None, (70, 70))


@pytest.mark.parametrize("raw_dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_a_window_outside_the_image_is_clamped_and_recorded(kernels, gen, raw_dtype):
    """Sample 1's window starts beyond the image: the kernels use the window clamped into it (as the
    reference does with the clamped crop) and record the first such sample in the error buffer."""
    x, raw = _inputs(gen, 3, 3, 20, 24, raw_dtype)
    crop, flip = _windows(gen, 3, 20, 24, 16, 16)
    bad = crop.clone()
    bad[1] = torch.tensor([9, 30])
    grad_out = torch.randn(3, 3, 16, 16, generator=gen).to(raw_dtype)
    out, errors = kernels.perturb_forward(x, raw, EPS, 0, bad, flip, 16, 16)
    grad_raw, errors_back = kernels.perturb_backward(grad_out, x, raw, EPS, 0, bad, flip)
    clamped = bad.clone()
    clamped[1] = torch.tensor([4, 8])  # top <= 20 - 16, left <= 24 - 16
    want_out, want_grad = _reference(x, raw, "clamp", clamped, flip, (16, 16), grad_out)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(grad_raw, want_grad)
    for buffer in (errors, errors_back):
        assert buffer[CROP_COUNT] >= 1 and buffer[CROP_SAMPLE] == 1
        assert (buffer[CROP_TOP], buffer[CROP_LEFT]) == (9, 30)


# ----------------------------------------------------------------------------- quantize_export


@pytest.mark.parametrize("numel", [3 * 70 * 70 * 4, 16 * 33 + 5], ids=["vectors", "with-a-tail"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=lambda d: str(d).removeprefix("torch."))  # fmt: skip
def test_quantize_export_matches_the_reference(kernels, gen, dtype, numel):
    """Every element written (outputs start at a marker), equal to the reference, NaN deltas as 0."""
    x = torch.randint(0, 256, (numel,), generator=gen, dtype=torch.uint8).view(1, 1, 1, numel)
    delta = ((torch.rand(x.shape, generator=gen) * 2 - 1) * 8 / 255).to(dtype)
    delta.view(-1)[:: 97] = float("nan")
    protected, delta_q, errors = kernels.quantize(x, delta)
    want_protected, want_q = reference.quantize_export(x, delta)
    assert torch.equal(protected, want_protected) and torch.equal(delta_q, want_q)
    assert not errors.any()


def test_quantize_export_counts_what_int8_cannot_hold(kernels, gen):
    x = torch.full((1, 1, 4, 64), 10, dtype=torch.uint8)
    delta = torch.zeros(x.shape)
    delta[0, 0, 1, :7] = 200 / 255  # moves 7 pixels by 200
    protected, delta_q, errors = kernels.quantize(x, delta)
    assert errors[EXPORT_OVERFLOW] == 7
    assert (delta_q[0, 0, 1, :7] == 127).all() and (protected[0, 0, 1, :7] == 210).all()


# ----------------------------------------------------------------------------- embedding_reg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("sizes", [[2] * 40, [3, 1, 5, 2], [7]], ids=["celeba-40x2", "uneven", "one-task"])
def test_embedding_reg_matches_the_reference(kernels, gen, dtype, sizes):
    """intra, inter and the table's gradient of the host-built pair kernels behind the driver the
    CUDA registration uses, against the reference's autograd."""
    rows = sum(sizes)
    offsets = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)
    table = torch.randn(rows, 300, generator=gen, dtype=dtype)
    table[0] *= 1e-12  # a norm under the 1e-8 floor
    intra, inter, cos, norms, errors = kernels.embedding_forward(table, offsets)
    grad_intra, grad_inter = torch.randn((), generator=gen, dtype=dtype), torch.randn((), generator=gen, dtype=dtype)
    grad = kernels.embedding_backward(grad_intra, grad_inter, table, offsets, cos, norms)
    t = table.clone().requires_grad_(True)
    want_intra, want_inter = reference.embedding_reg(t, offsets)
    (grad_intra * want_intra + grad_inter * want_inter).backward()
    tol = {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-9}
    torch.testing.assert_close(intra, want_intra.detach(), **tol)
    torch.testing.assert_close(inter, want_inter.detach(), **tol)
    # The floored row's gradient is 1/1e-8 times its unit vector's: rounding there is relative to
    # that row's largest element, not to each element (they cancel to any size). Other rows: scale 1.
    scale = t.grad.abs().amax(dim=1, keepdim=True).clamp_min(1)
    torch.testing.assert_close(grad / scale, t.grad / scale, **tol)
    assert not errors.any() and not cos.isnan().any()


def test_embedding_reg_records_offsets_that_do_not_increase(kernels, gen):
    table = torch.randn(6, 16, generator=gen)
    *_, errors = kernels.embedding_forward(table, torch.tensor([0, 3, 3, 6]))
    assert errors[OFFSETS_COUNT] == 1 and errors[OFFSETS_INDEX] == 1
