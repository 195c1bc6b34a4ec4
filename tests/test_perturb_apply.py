"""mtlue::perturb_apply (compiled) against the pure-PyTorch reference, forward and backward."""

from __future__ import annotations

import pytest
import torch

from mtlue_fast import ops
from mtlue_fast.ops import reference

MODES = {"clamp": reference.MODE_CLAMP, "tanh": reference.MODE_TANH}


def make_inputs(gen, shape, x_dtype, raw_dtype, device, raw_scale=0.05, offset=0):
    """Random x and raw (a leaf). ``offset`` > 0: both are contiguous views that start that many
    elements into their storage, so they are not 16-byte aligned (the kernels' element-wise path)."""
    if x_dtype == torch.uint8:
        x = torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8)
    else:
        x = torch.rand(shape, generator=gen, dtype=torch.float64).to(x_dtype)
    raw = (torch.randn(shape, generator=gen, dtype=torch.float64) * raw_scale).to(raw_dtype)
    x, raw = x.to(device), raw.to(device)
    if offset:
        x, raw = shifted(x, offset), shifted(raw, offset)
    return x, raw.detach().requires_grad_(True)


def shifted(t, offset):
    """A contiguous copy of t whose data starts ``offset`` elements into its storage."""
    storage = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    view = storage[offset:].view(t.shape)
    view.copy_(t)
    return view


def random_windows(gen, batch, height, width, out_h, out_w, device):
    top = torch.randint(0, height - out_h + 1, (batch,), generator=gen)
    left = torch.randint(0, width - out_w + 1, (batch,), generator=gen)
    flip = torch.rand(batch, generator=gen) < 0.5
    return torch.stack([top, left], 1).to(device), flip.to(device)


def reference_of(x, raw, eps, mode, crop, flip, out_size):
    """The reference on a detached copy of raw, returning (out, leaf) for gradient comparison.
    A centre crop is spelled out as an explicit window, independently of the op's own default."""
    leaf = raw.detach().clone().requires_grad_(True)
    h, w = out_size or x.shape[-2:]
    if crop is None and out_size is not None:
        crop = torch.tensor([(x.shape[2] - h) // 2, (x.shape[3] - w) // 2], device=x.device).expand(x.shape[0], 2)
    return reference.perturb_apply(x, leaf, eps, MODES[mode], crop, flip, (h, w)), leaf


def assert_matches(x, raw, eps, mode, crop, flip, out_size, gen, atol, rtol=0.0):
    out = ops.perturb_apply(x, raw, eps, mode=mode, crop=crop, flip=flip, out_size=out_size)
    expected, leaf = reference_of(x, raw, eps, mode, crop, flip, out_size)
    assert out.dtype == raw.dtype and out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    (grad,) = torch.autograd.grad(out, raw, grad_out)
    (grad_expected,) = torch.autograd.grad(expected, leaf, grad_out)
    torch.testing.assert_close(grad, grad_expected, atol=atol, rtol=rtol)
    return out, grad


@pytest.mark.parametrize("mode", ["clamp", "tanh"])
@pytest.mark.parametrize("x_dtype", [torch.uint8, torch.float64, torch.float32])
@pytest.mark.parametrize("windowed", [False, True])
def test_matches_reference_float64(device, gen, mode, x_dtype, windowed):
    shape = (5, 3, 13, 17)
    x, raw = make_inputs(gen, shape, x_dtype, torch.float64, device, raw_scale=0.1)
    crop = flip = out_size = None
    if windowed:
        out_size = (9, 11)
        crop, flip = random_windows(gen, 5, 13, 17, 9, 11, device)
    assert_matches(x, raw, 8 / 255, mode, crop, flip, out_size, gen, atol=1e-12)


@pytest.mark.parametrize("raw_dtype,atol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)])
@pytest.mark.parametrize("mode", ["clamp", "tanh"])
def test_matches_reference_low_precision(device, gen, raw_dtype, atol, mode):
    x, raw = make_inputs(gen, (4, 1, 32, 30), torch.uint8, raw_dtype, device)
    crop, flip = random_windows(gen, 4, 32, 30, 24, 24, device)
    assert_matches(x, raw, 8 / 255, mode, crop, flip, (24, 24), gen, atol=atol)


@pytest.mark.parametrize("raw_dtype", [torch.bfloat16, torch.float16])
def test_16bit_raw_in_tanh_mode_is_the_float32_result_rounded(gen, raw_dtype):
    """The CPU kernels look a 16-bit raw's tanh up in a table of std::tanh instead of calling it per
    element: over every one of the 65,536 values, forward and backward must be bit for bit the
    float32 kernels' results (which call std::tanh on the same values) rounded to raw's dtype."""
    if ops.backend_for("cpu") != "compiled":
        pytest.skip("no compiled CPU kernels")
    every_value = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(raw_dtype)
    raw = every_value[torch.randperm(every_value.numel(), generator=gen)].reshape(16, 1, 64, 64)
    x = torch.randint(0, 256, raw.shape, generator=gen, dtype=torch.uint8)
    flip = torch.rand(16, generator=gen) < 0.5  # the whole image as the window: every value is used
    grad_out = torch.randn(raw.shape, generator=gen).to(raw_dtype)

    def kernels(raw_in, grad_in):
        out = torch.ops.mtlue.perturb_apply(x, raw_in, 8 / 255, MODES["tanh"], None, flip, 64, 64)
        return out, torch.ops.mtlue.perturb_apply_backward(grad_in, x, raw_in, 8 / 255, MODES["tanh"], None, flip)

    looked_up, in_float = kernels(raw, grad_out), kernels(raw.float(), grad_out.float())
    for tabulated, computed in zip(looked_up, in_float):
        assert tabulated.dtype == raw_dtype
        torch.testing.assert_close(tabulated, computed.to(raw_dtype), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("mode", ["clamp", "tanh"])
def test_gradcheck(device, gen, mode):
    # Keep x + delta away from 0 and 1 and raw away from +-eps, where the clamps are not
    # differentiable; saturated elements elsewhere are covered by the reference comparisons.
    x = (0.2 + 0.6 * torch.rand(2, 2, 6, 7, generator=gen, dtype=torch.float64)).to(device)
    raw = (torch.rand(2, 2, 6, 7, generator=gen, dtype=torch.float64) * 0.16 - 0.08).to(device)
    raw = torch.where(raw.abs() > 0.045, raw.sign() * 0.07, raw * 0.9).requires_grad_(True)
    crop = torch.tensor([[1, 0], [0, 3]], device=device)
    flip = torch.tensor([True, False], device=device)

    def fn(r):
        return ops.perturb_apply(x, r, 0.05, mode=mode, crop=crop, flip=flip, out_size=(5, 4))

    assert torch.autograd.gradcheck(fn, (raw,), eps=1e-6, atol=1e-7)


def test_crop_at_borders_and_flip_route_gradient_exactly(device, gen):
    x, raw = make_inputs(gen, (4, 2, 8, 9), torch.uint8, torch.float64, device, raw_scale=0.01)
    crop = torch.tensor([[0, 0], [3, 4], [0, 4], [3, 0]], device=device)  # all four corners
    flip = torch.tensor([False, True, True, False], device=device)
    out, grad = assert_matches(x, raw, 0.5, "clamp", crop, flip, (5, 5), gen, atol=1e-12)
    # Independent check of the window and flip: with a huge eps and mid-range values nothing
    # saturates, so the output is x/255 + raw read through the window.
    xf = x.double() * reference.UINT8_SCALE + raw.detach()
    for b, (top, left) in enumerate(crop.tolist()):
        window = xf[b, :, top : top + 5, left : left + 5].clamp(0, 1)
        if flip[b]:
            window = window.flip(-1)
        torch.testing.assert_close(out[b], window, atol=1e-12, rtol=0)
        outside = torch.ones(8, 9, dtype=torch.bool, device=device)
        outside[top : top + 5, left : left + 5] = False
        assert (grad[b][:, outside] == 0).all()


def test_eps_zero_gives_clean_image_and_no_gradient(device, gen):
    x, raw = make_inputs(gen, (3, 3, 10, 10), torch.uint8, torch.float32, device, raw_scale=1.0)
    out, grad = assert_matches(x, raw, 0.0, "clamp", None, None, None, gen, atol=0)
    torch.testing.assert_close(out, x.float() * reference.UINT8_SCALE, atol=0, rtol=0)
    assert (grad == 0).all()
    out_tanh, grad_tanh = assert_matches(x, raw, 0.0, "tanh", None, None, None, gen, atol=0)
    torch.testing.assert_close(out_tanh, x.float() * reference.UINT8_SCALE, atol=0, rtol=0)
    assert (grad_tanh == 0).all()


def test_fully_saturated_raw_has_zero_gradient(device, gen):
    x, _ = make_inputs(gen, (2, 3, 9, 9), torch.uint8, torch.float32, device)
    raw = (torch.randint(0, 2, (2, 3, 9, 9), generator=gen).float() * 20 - 10).to(device).requires_grad_(True)
    out, grad = assert_matches(x, raw, 8 / 255, "clamp", None, None, None, gen, atol=1e-6)
    expected = (x.float() * reference.UINT8_SCALE + raw.detach().sign() * (8 / 255)).clamp(0, 1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert (grad == 0).all()


def test_batch_of_one_with_centre_crop(device, gen):
    x, raw = make_inputs(gen, (1, 3, 70, 70), torch.uint8, torch.float32, device)
    out, _ = assert_matches(x, raw, 8 / 255, "tanh", None, None, (64, 64), gen, atol=1e-6)
    assert out.shape == (1, 3, 64, 64)


def test_nan_propagates_like_torch_clamp(device, gen):
    x, raw = make_inputs(gen, (2, 1, 5, 5), torch.uint8, torch.float32, device)
    raw = raw.detach().clone()
    raw[0, 0, 2, 2] = float("nan")
    raw.requires_grad_(True)
    out = ops.perturb_apply(x, raw, 0.1)
    assert torch.isnan(out[0, 0, 2, 2]) and torch.isfinite(out[1]).all()
    (grad,) = torch.autograd.grad(out.nansum(), raw)
    assert grad[0, 0, 2, 2] == 0


def test_noncontiguous_and_channels_last_inputs(device, gen):
    x, raw = make_inputs(gen, (4, 3, 12, 14), torch.uint8, torch.float32, device)
    crop, flip = random_windows(gen, 4, 12, 14, 8, 8, device)
    expected, _ = reference_of(x, raw, 0.03, "clamp", crop, flip, (8, 8))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    raw_cl = raw.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    out = ops.perturb_apply(x_cl, raw_cl, 0.03, crop=crop, flip=flip, out_size=(8, 8))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad(out.sum(), raw_cl)
    assert grad.shape == raw_cl.shape
    # Transposed views and a crop tensor that is a strided slice.
    x_t = x.transpose(2, 3).contiguous().transpose(2, 3)
    raw_t = raw.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_(True)
    crop_strided = torch.stack([crop, crop], 2)[:, :, 0]
    assert not x_t.is_contiguous() and not crop_strided.is_contiguous()
    out_t = ops.perturb_apply(x_t, raw_t, 0.03, crop=crop_strided, flip=flip, out_size=(8, 8))
    torch.testing.assert_close(out_t, expected, atol=1e-6, rtol=0)


WIDTHS = [63, 64, 70, 224, 256]
LOW_PRECISION = [(torch.float32, 1e-6), (torch.bfloat16, 1e-2), (torch.float16, 1e-3)]


@pytest.mark.parametrize("mode", ["clamp", "tanh"])
@pytest.mark.parametrize("raw_dtype,atol", LOW_PRECISION)
@pytest.mark.parametrize("width", WIDTHS)
def test_row_widths_and_raw_dtypes(device, gen, width, raw_dtype, atol, mode):
    """Rows that are and are not whole 16-byte vectors, windows starting at any column, flips: the
    vector path of every raw dtype with its element-wise head and tail, forward and backward."""
    x_dtype = torch.uint8 if width % 2 else torch.float32
    height = 7
    x, raw = make_inputs(gen, (3, 2, height, width), x_dtype, raw_dtype, device)
    out_w = width - int(torch.randint(0, 8, (), generator=gen))
    crop, flip = random_windows(gen, 3, height, width, 5, out_w, device)
    out, _ = assert_matches(x, raw, 8 / 255, mode, crop, flip, (5, out_w), gen, atol=atol)
    assert out.dtype == raw_dtype and out.is_contiguous()


@pytest.mark.parametrize("x_dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("raw_dtype,atol", LOW_PRECISION)
def test_centre_crop_matches_an_explicit_window(device, gen, x_dtype, raw_dtype, atol):
    """Without crop the op takes the centred window ((H-h)//2, (W-w)//2) itself: no window tensor."""
    x, raw = make_inputs(gen, (4, 3, 13, 70), x_dtype, raw_dtype, device)
    flip = (torch.rand(4, generator=gen) < 0.5).to(device)
    assert_matches(x, raw, 8 / 255, "clamp", None, flip, (8, 63), gen, atol=atol)
    assert_matches(x, raw, 8 / 255, "tanh", None, None, (13, 64), gen, atol=atol)


@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("raw_dtype,atol", LOW_PRECISION)
def test_misaligned_tensors(device, gen, offset, raw_dtype, atol):
    """x and raw starting off a 16-byte boundary: the kernels fall back to element-wise moves."""
    x, raw = make_inputs(gen, (4, 3, 10, 64), torch.uint8, raw_dtype, device, offset=offset)
    assert raw.is_contiguous() and raw.storage_offset() == offset
    crop, flip = random_windows(gen, 4, 10, 64, 7, 61, device)
    assert_matches(x, raw, 8 / 255, "tanh", crop, flip, (7, 61), gen, atol=atol)
    x_f, raw_f = make_inputs(gen, (2, 1, 9, 33), torch.float32, raw_dtype, device, offset=offset)
    crop, flip = random_windows(gen, 2, 9, 33, 9, 30, device)
    assert_matches(x_f, raw_f, 8 / 255, "clamp", crop, flip, (9, 30), gen, atol=atol)


@pytest.mark.parametrize("raw_dtype,atol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_images_wider_than_a_tile(device, gen, raw_dtype, atol):
    """Rows longer than the kernels' shared-memory tile take their element-wise kernel."""
    x, raw = make_inputs(gen, (2, 1, 3, 4500), torch.uint8, raw_dtype, device)
    crop, flip = random_windows(gen, 2, 3, 4500, 2, 4400, device)
    assert_matches(x, raw, 8 / 255, "clamp", crop, flip, (2, 4400), gen, atol=atol)


def test_cpu_window_outside_the_image_raises_at_once(gen):
    x, raw = make_inputs(gen, (3, 2, 10, 70), torch.uint8, torch.float32, "cpu")
    crop = torch.tensor([[0, 0], [2, 7], [5, 3]])
    with pytest.raises(ValueError, match=r"5x64 window outside the 10x70 image.*0 <= top <= 5 and 0 <= left <= 6"):
        ops.perturb_apply(x, raw, 8 / 255, crop=crop, out_size=(5, 64))


def _no_host_reads(monkeypatch):
    def forbidden(self, *args, **kwargs):
        raise AssertionError("a tensor value was read back to the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)


def test_compiled_path_reads_no_values_back(gen, monkeypatch):
    """Windows are checked by the kernel, and a centre crop makes no window tensor: a call (and its
    backward) reads nothing back, so on a GPU it never waits for the device."""
    if ops.backend_for("cpu") != "compiled":
        pytest.skip("no compiled CPU kernels")
    x, raw = make_inputs(gen, (2, 1, 8, 8), torch.uint8, torch.bfloat16, "cpu")
    crop, flip = random_windows(gen, 2, 8, 8, 5, 5, "cpu")
    _no_host_reads(monkeypatch)
    ops.perturb_apply(x, raw, 0.03, crop=crop, flip=flip, out_size=(5, 5)).sum().backward()
    ops.perturb_apply(x, raw, 0.03, mode="tanh", out_size=(6, 6)).sum().backward()


@pytest.mark.cuda
def test_cuda_window_outside_the_image_is_clamped_and_raised_later(gen):
    device = torch.device("cuda")
    ops.raise_pending_errors(device)  # start clean
    x, raw = make_inputs(gen, (3, 2, 10, 70), torch.uint8, torch.float32, device)
    crop = torch.tensor([[0, 0], [2, 10], [5, 3]], device=device)  # crop[1]: left 10 > 70 - 64
    flip = torch.tensor([False, True, False], device=device)
    out = ops.perturb_apply(x, raw, 8 / 255, crop=crop, flip=flip, out_size=(5, 64))  # no error yet
    grad_out = torch.randn(out.shape, generator=gen).to(device)
    (grad,) = torch.autograd.grad(out, raw, grad_out)
    clamped = torch.tensor([[0, 0], [2, 6], [5, 3]], device=device)
    expected, leaf = reference_of(x, raw, 8 / 255, "clamp", clamped, flip, (5, 64))
    (grad_expected,) = torch.autograd.grad(expected, leaf, grad_out)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, grad_expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"perturb_apply: crop\[1\] = \(2, 10\) put the 5x64 window outside the 10x70 image"):
        ops.raise_pending_errors(device)
    ops.raise_pending_errors(device)  # the record was cleared
    ops.perturb_apply(x, raw, 8 / 255, crop=clamped, flip=flip, out_size=(5, 64)).sum().backward()
    ops.raise_pending_errors(0)  # valid windows record nothing


@pytest.mark.cuda
@pytest.mark.parametrize("raw_dtype", [torch.float32, torch.bfloat16])
def test_cuda_far_out_windows_read_only_inside_the_image(gen, raw_dtype):
    """Windows far outside the image (offsets that would overflow 32-bit arithmetic) are clamped to
    the nearest valid window, forward and backward, and reported."""
    device = torch.device("cuda")
    ops.raise_pending_errors(device)
    x, raw = make_inputs(gen, (4, 3, 70, 70), torch.uint8, raw_dtype, device)
    crop = torch.tensor([[10**12, -(10**12)], [-5, 3], [2, 2**40], [-(2**62), 2**62]], device=device)
    flip = torch.tensor([True, False, True, False], device=device)
    clamped = torch.tensor([[6, 0], [0, 3], [2, 6], [0, 6]], device=device)
    out = ops.perturb_apply(x, raw, 8 / 255, crop=crop, flip=flip, out_size=(64, 64))
    grad_out = torch.randn(out.shape, generator=gen).to(device=device, dtype=raw_dtype)
    (grad,) = torch.autograd.grad(out, raw, grad_out)
    expected, leaf = reference_of(x, raw, 8 / 255, "clamp", clamped, flip, (64, 64))
    (grad_expected,) = torch.autograd.grad(expected, leaf, grad_out)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, grad_expected, atol=1e-6, rtol=0)
    # Every sample's window is out: which one is described first depends on the blocks' order.
    with pytest.raises(ValueError, match=r"crop\[\d\] = \(-?\d+, -?\d+\) put the 64x64 window outside the 70x70 image"):
        ops.raise_pending_errors(device)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"x": torch.zeros(2, 3, 8, 8, dtype=torch.int32)}, "x must be uint8"),
        ({"raw": torch.zeros(2, 3, 8, 8, dtype=torch.int64)}, "raw must be"),
        ({"x": torch.zeros(3, 8, 8, dtype=torch.uint8)}, r"x must have shape \[B,C,H,W\]"),
        ({"raw": torch.zeros(2, 3, 8, 7)}, "must have the same shape"),
        ({"eps": -0.1}, "eps must be a finite float >= 0"),
        ({"eps": float("nan")}, "eps must be a finite float >= 0"),
        ({"mode": "sigmoid"}, "mode must be one of"),
        ({"crop": torch.tensor([[0, 0], [1, 1]]), "out_size": (7, 7), "extra": None}, None),
        ({"crop": torch.tensor([[0, 0], [1, 3]]), "out_size": (6, 6)}, r"6x6 window outside the 8x8 image.*0 <= left <= 2"),
        ({"crop": torch.tensor([[-1, 0], [0, 0]]), "out_size": (6, 6)}, r"6x6 window outside the 8x8 image.*0 <= top <= 2"),
        ({"crop": torch.tensor([[0, 0]]), "out_size": (6, 6)}, r"crop must have shape \[B,2\]"),
        ({"crop": torch.zeros(2, 2), "out_size": (6, 6)}, "crop must be an integer tensor"),
        ({"crop": torch.zeros(2, 2, dtype=torch.int64)}, "crop requires out_size"),
        ({"out_size": (9, 8)}, "out_size"),
        ({"flip": torch.tensor([1, 0])}, "flip must be a bool tensor"),
        ({"flip": torch.tensor([True])}, r"flip must have shape \[B\]"),
        ({"raw": torch.zeros(2, 3, 8, 8, device="meta")}, "raw is on meta but x is on cpu"),
        ({"flip": torch.zeros(2, dtype=torch.bool, device="meta")}, "flip is on meta"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = {"x": torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "raw": torch.zeros(2, 3, 8, 8), "eps": 0.1}
    args.update({k: v for k, v in kwargs.items() if k != "extra"})
    if match is None:  # a valid call (window exactly at the border) for contrast
        ops.perturb_apply(args.pop("x"), args.pop("raw"), args.pop("eps"), **args)
        return
    with pytest.raises((ValueError, TypeError), match=match):
        ops.perturb_apply(args.pop("x"), args.pop("raw"), args.pop("eps"), **args)


def test_compiled_op_rejects_out_of_image_crop_directly():
    """The C++ CPU kernel checks windows itself, for callers of torch.ops.mtlue directly."""
    if ops.backend_for("cpu") != "compiled":
        pytest.skip("no compiled CPU kernels")
    x = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"crop\[0\] = \(3, 0\)"):
        torch.ops.mtlue.perturb_apply(x, torch.zeros(1, 1, 4, 4), 0.1, 0, torch.tensor([[3, 0]]), None, 2, 2)
