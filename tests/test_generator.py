"""The perturbation generator: stem rule and shapes, the table, fast vs straightforward paths
(forward and gradients), the eps bound, partial protection, dense (NYUv2) priors, bad arguments."""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("torchvision") is None:
    pytest.skip("torchvision is an optional dependency (extra 'vision')", allow_module_level=True)

import torch
import torch.nn.functional as F

from mtlue_fast.models import DenseGenerator, DenseLabelPrior, MTLGenerator, encoder_stride, generator_feature_size

EPS = 8 / 255
# (num_classes, in_channels, image size, batch): the three true dataset shapes
CELEBA = ((2,) * 40, 3, 70, 2)
CHESTX = ((2,) * 14, 1, 256, 2)
UTK = ((9, 5, 2), 3, 140, 2)
CONFIGS = {"celeba": CELEBA, "chestx": CHESTX, "utkface": UTK}


def _labels(num_classes, batch: int, gen: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randint(0, c, (batch,), generator=gen) for c in num_classes], dim=1)


def _image(batch: int, channels: int, size, gen: torch.Generator, uint8: bool = False) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    if uint8:
        return torch.randint(0, 256, (batch, channels, h, w), dtype=torch.uint8, generator=gen)
    return torch.rand(batch, channels, h, w, generator=gen)


def _randomize(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Fresh random table and non-zero biases (init leaves biases at 0, hiding a doubled bias)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "table" or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


# ------------------------------------------------------------------------------------------------
# stem rule and shapes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "stride", "feature"),
    [(70, 2, (35, 35)), (140, 2, (70, 70)), (191, 2, (96, 96)), (192, 8, (24, 24)), (256, 8, (32, 32)),
     ((288, 384), 8, (36, 48)), ((100, 300), 2, (50, 150))],
)
def test_stem_rule_and_feature_size(size, stride, feature):
    assert encoder_stride(size) == stride
    assert generator_feature_size(size) == feature


@pytest.mark.parametrize(
    ("size", "feature"), [(70, (35, 35)), (140, (70, 70)), (256, (32, 32)), ((288, 384), (36, 48)), (69, (35, 35))]
)
def test_encoder_and_raw_shapes(size, feature, gen):
    h, w = (size, size) if isinstance(size, int) else size
    model = MTLGenerator((3, 2), in_channels=3, image_size=size, width=0.125)
    assert model.feature_size == feature
    x = _image(1, 3, size, gen)
    assert tuple(model.encode(x).shape) == (1, round(128 * 0.125), *feature)
    raw = model.raw(x, _labels((3, 2), 1, gen))
    assert tuple(raw.shape) == (1, 3, h, w)  # 69: decoded at 70, cropped to 69


def test_decoder_upsampling_layout():
    half = MTLGenerator((2,), image_size=70, width=0.25)
    eighth = MTLGenerator((2,), image_size=256, width=0.25)
    assert [m.stride for m in half.decoder if isinstance(m, torch.nn.ConvTranspose2d)] == [(1, 1)] * 3
    assert [m.stride for m in eighth.decoder if isinstance(m, torch.nn.ConvTranspose2d)] == [(1, 1), (2, 2), (2, 2)]
    assert half.up1.in_channels == 16 * 1 + 32 and half.up1.out_channels == 16 and half.up1.stride == (2, 2)


# ------------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["celeba", "utkface"])
def test_table_layout_and_init(config):
    num_classes, channels, size, _ = CONFIGS[config]
    torch.manual_seed(0)
    model = MTLGenerator(num_classes, in_channels=channels, image_size=size)  # width 1: the true sizes
    s = size // 2
    assert tuple(model.table.shape) == (sum(num_classes), 16 * s * s)
    assert model.embedding_table() is model.table
    assert model.task_offsets.device.type == "cpu" and model.task_offsets.dtype == torch.int64
    expected = [0]
    for c in num_classes:
        expected.append(expected[-1] + c)
    assert model.task_offsets.tolist() == expected
    assert "task_offsets" not in dict(model.named_buffers())
    assert abs(model.table.mean().item()) < 0.01 and abs(model.table.std().item() - 1) < 0.01
    assert model.feature_channels == 128 and model.up1.in_channels == 16 * len(num_classes) + 128


def test_label_matrix():
    model = MTLGenerator((3, 2, 4), image_size=32, width=0.125, task_names=("a", "b", "c"), protect=["a", 2])
    labels = torch.tensor([[0, 1, 3], [2, 0, 0]])
    mat = model.label_matrix(labels)
    expected = torch.tensor(
        [[1, 0, 0, 0.5, 0.5, 0, 0, 0, 1], [0, 0, 1, 0.5, 0.5, 1, 0, 0, 0]], dtype=mat.dtype
    )
    torch.testing.assert_close(mat, expected)
    model.set_protect(None)
    assert model.label_matrix(labels).sum(1).tolist() == [3.0, 3.0]


def test_class_responses_use_each_tasks_weight_slice(gen):
    """The grouped ConvT: row offset_k + c equals ConvT(e^k_c, weight[16k:16k+16]) without bias."""
    model = MTLGenerator((3, 2, 4), image_size=20, width=0.125).double()
    _randomize(model, gen)
    responses = model.class_responses()
    maps, w, offsets = model.class_maps(), model.up1.weight, model.task_offsets.tolist()
    assert tuple(responses.shape) == (9, model.up1.out_channels, 20, 20)
    for k in range(3):
        for r in range(offsets[k], offsets[k + 1]):
            one = F.conv_transpose2d(maps[r : r + 1], w[16 * k : 16 * k + 16], None, stride=2, padding=1)
            torch.testing.assert_close(responses[r : r + 1], one, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# fast == straightforward, forward and gradients
# ------------------------------------------------------------------------------------------------


def _raw_and_grads(model, x, labels, weight, fast: bool):
    model.zero_grad(set_to_none=True)
    raw = model.raw(x, labels, fast=fast)
    (raw * weight).sum().backward()
    return raw.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("partial", [False, True], ids=["all", "partial"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_fast_path_matches_straightforward(config, partial, gen):
    num_classes, channels, size, batch = CONFIGS[config]
    protect = None
    if partial:  # names for one config, indices for the others; some tasks unprotected
        protect = ["task0", "task2"] if config == "utkface" else list(range(0, len(num_classes), 3))
    model = MTLGenerator(num_classes, in_channels=channels, image_size=size, width=0.25, protect=protect).double()
    _randomize(model, gen)
    x = _image(batch, channels, size, gen).double()
    labels = _labels(num_classes, batch, gen)
    weight = torch.randn(batch, channels, size, size, generator=gen, dtype=torch.float64)
    raw_fast, grads_fast = _raw_and_grads(model, x, labels, weight, fast=True)
    raw_slow, grads_slow = _raw_and_grads(model, x, labels, weight, fast=False)
    torch.testing.assert_close(raw_fast, raw_slow, rtol=1e-10, atol=1e-10)
    assert grads_fast.keys() == grads_slow.keys() == {n for n, _ in model.named_parameters()}
    for name in grads_fast:
        torch.testing.assert_close(grads_fast[name], grads_slow[name], rtol=1e-9, atol=1e-9, msg=name)
    if partial:  # no gradient reaches unprotected rows from labels, only through the mean
        assert grads_fast["table"].abs().sum() > 0


def test_fast_path_matches_through_perturb_apply(gen):
    """Gradients through the output mapping (tanh mode: no saturation), with crop and flip."""
    num_classes, channels, size, batch = UTK
    model = MTLGenerator(num_classes, in_channels=channels, image_size=size, width=0.125, mode="tanh").double()
    _randomize(model, gen)
    x = _image(batch, channels, size, gen, uint8=True)
    labels = _labels(num_classes, batch, gen)
    crop, flip = torch.tensor([[0, 5], [12, 3]]), torch.tensor([True, False])
    results = []
    for fast in (True, False):
        model.fast = fast
        model.zero_grad(set_to_none=True)
        out = model(x, labels, crop=crop, flip=flip, out_size=(128, 128))
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-10)
    for name, g in results[0][1].items():
        torch.testing.assert_close(g, results[1][1][name], rtol=1e-9, atol=1e-9, msg=name)


# ------------------------------------------------------------------------------------------------
# output mapping
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["clamp", "tanh"])
def test_output_within_eps(mode, gen):
    num_classes, channels, size, batch = CELEBA
    model = MTLGenerator(num_classes, in_channels=channels, image_size=size, width=0.25, mode=mode)
    x = _image(batch, channels, size, gen)
    x[0, :, :10] = 0.0  # the [0, 1] clamp must act at both ends
    x[1, :, :10] = 1.0
    labels = _labels(num_classes, batch, gen)
    with torch.no_grad():
        raw = model.raw(x, labels)
        out = model(x, labels)
        delta = model.delta(raw)
    assert (out - x).abs().max() <= EPS + 1e-6
    assert out.min() >= 0 and out.max() <= 1
    assert delta.abs().max() <= EPS + 1e-7
    torch.testing.assert_close(out, (x + delta).clamp(0, 1))
    # uint8 input: same thing on the /255 scale
    xq = _image(batch, channels, size, gen, uint8=True)
    with torch.no_grad():
        outq = model(xq, labels)
    assert (outq - xq.float() / 255).abs().max() <= EPS + 1e-6
    # crop and flip
    crop, flip = torch.tensor([[0, 0], [6, 6]]), torch.tensor([False, True])
    with torch.no_grad():
        assert tuple(model(x, labels, crop=crop, flip=flip, out_size=(64, 64)).shape) == (batch, channels, 64, 64)
        assert tuple(model(x, labels, out_size=(60, 62)).shape) == (batch, channels, 60, 62)


def test_chestx_true_shape_forward_backward(gen):
    num_classes, channels, size, batch = CHESTX
    model = MTLGenerator(num_classes, in_channels=channels, image_size=size)  # width 1
    x = _image(batch, channels, size, gen, uint8=True)
    out = model(x, _labels(num_classes, batch, gen), out_size=(224, 224))
    assert tuple(out.shape) == (batch, 1, 224, 224)
    out.sum().backward()
    assert model.table.grad is not None and model.encoder[0].weight.grad is not None


# ------------------------------------------------------------------------------------------------
# partial protection
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False])
def test_partial_protection(fast, gen):
    num_classes, channels, size, batch = UTK
    names = ("age", "race", "gender")
    model = MTLGenerator(
        num_classes, in_channels=channels, image_size=size, width=0.125, task_names=names, protect=["age", "gender"],
        fast=fast,
    ).eval()
    assert model.protected == (True, False, True) and model.protected_tasks == (0, 2)
    x = _image(batch, channels, size, gen)
    labels = torch.tensor([[3, 0, 1], [7, 2, 0]])
    with torch.no_grad():
        base = model.raw(x, labels)
        other_race = labels.clone()
        other_race[:, 1] = torch.tensor([4, 1])
        torch.testing.assert_close(model.raw(x, other_race), base, rtol=0, atol=1e-6)
        other_age = labels.clone()
        other_age[:, 0] = torch.tensor([5, 1])
        assert (model.raw(x, other_age) - base).abs().max() > 1e-3
        model.set_protect(None)  # race protected again: now its label matters
        assert (model.raw(x, other_race) - model.raw(x, labels)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# autocast, channels-last
# ------------------------------------------------------------------------------------------------


def test_channels_last_and_bf16_autocast(gen):
    num_classes, channels, size, batch = (9, 5, 2), 3, 40, 2
    model = MTLGenerator(num_classes, in_channels=channels, image_size=size, width=0.25).eval()
    x = _image(batch, channels, size, gen)
    labels = _labels(num_classes, batch, gen)
    with torch.no_grad():
        ref = model.raw(x, labels, fast=False)
        model_cl = model.to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        for fast in (True, False):
            torch.testing.assert_close(model_cl.raw(x_cl, labels, fast=fast), ref, rtol=1e-4, atol=1e-4)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = model_cl.raw(x_cl, labels, fast=fast)
                out = model_cl(x_cl, labels)
            assert low.dtype == torch.bfloat16 and out.shape == x.shape
            assert (low.float() - ref).abs().mean() < 0.05 * ref.abs().mean()


# ------------------------------------------------------------------------------------------------
# dense (NYUv2)
# ------------------------------------------------------------------------------------------------


def _nyu_labels(batch: int, size, gen: torch.Generator) -> dict[str, torch.Tensor]:
    h, w = size
    seg = torch.randint(-1, 13, (batch, h, w), generator=gen).to(torch.int8)
    depth = (torch.rand(batch, 1, h, w, generator=gen) * 10).half()
    normal = F.normalize(torch.randn(batch, 3, h, w, generator=gen), dim=1).half()
    return {"seg": seg, "depth": depth, "normal": normal}


def test_dense_generator_true_shape(gen):
    model = DenseGenerator(width=0.25)  # NYUv2: 3 x 288 x 384, segmentation/depth/normal
    assert model.feature_size == (36, 48) and model.stride == 8
    x = _image(2, 3, (288, 384), gen, uint8=True)
    labels = _nyu_labels(2, (288, 384), gen)
    assert tuple(model.priors["segmentation"](labels["seg"]).shape) == (2, 16, 36, 48)
    out = model(x, labels)
    assert tuple(out.shape) == (2, 3, 288, 384)
    assert (out - x.float() / 255).abs().max() <= EPS + 1e-6
    out.sum().backward()
    for name in ("segmentation", "depth", "normal"):
        assert all(p.grad is not None for p in model.priors[name].parameters()), name


def test_dense_partial_protection_and_small_image(gen):
    size = (64, 96)  # stride-2 encoder: same code path, cheap
    model = DenseGenerator(image_size=size, width=0.125, protect=["segmentation"]).eval()
    assert model.stride == 2 and model.feature_size == (32, 48)
    x = _image(2, 3, size, gen)
    labels = _nyu_labels(2, size, gen)
    with torch.no_grad():
        base = model.raw(x, labels)
        changed = dict(labels, depth=labels["depth"] * 2, normal=-labels["normal"])
        torch.testing.assert_close(model.raw(x, changed), base, rtol=0, atol=0)
        changed_seg = dict(labels, seg=(labels["seg"] + 1).clamp(max=12))
        assert (model.raw(x, changed_seg) - base).abs().max() > 1e-4
    with pytest.raises(ValueError, match="labels"):
        model.raw(x, {"depth": labels["depth"]})


def test_dense_label_prior_void_class():
    prior = DenseLabelPrior(13, stride=2, categorical=True)
    seg = torch.full((1, 8, 8), -1, dtype=torch.int8)
    void = prior.embed.weight[13]
    torch.testing.assert_close(prior.embed(torch.where(seg.long() < 0, 13, seg.long()))[0, 0, 0], void)
    assert tuple(prior(seg).shape) == (1, 16, 4, 4)
    with pytest.raises(ValueError, match="stride"):
        DenseLabelPrior(1, stride=3)


# ------------------------------------------------------------------------------------------------
# bad arguments
# ------------------------------------------------------------------------------------------------


def test_bad_arguments(gen):
    kw = dict(image_size=32, width=0.125)
    with pytest.raises(ValueError, match="protect"):
        MTLGenerator((2, 3), task_names=("a", "b"), protect=["c"], **kw)
    with pytest.raises(ValueError, match="protect"):
        MTLGenerator((2, 3), protect=[2], **kw)
    with pytest.raises(ValueError, match="protect"):
        DenseGenerator(image_size=32, width=0.125, protect=["sky"])
    with pytest.raises(ValueError, match="num_classes"):
        MTLGenerator((2, 1), **kw)
    with pytest.raises(ValueError, match="task_names"):
        MTLGenerator((2, 3), task_names=("a",), **kw)
    with pytest.raises(ValueError, match="mode"):
        MTLGenerator((2, 3), mode="sigmoid", **kw)
    with pytest.raises(ValueError, match="eps"):
        MTLGenerator((2, 3), eps=-1.0, **kw)
    with pytest.raises(ValueError, match="width"):
        MTLGenerator((2, 3), image_size=32, width=0)
    with pytest.raises(ValueError, match="image_size"):
        MTLGenerator((2, 3), image_size=(32, 0), width=0.125)
    model = MTLGenerator((2, 3), **kw)
    x = _image(2, 3, 32, gen)
    with pytest.raises(ValueError, match="labels"):
        model.raw(x, torch.tensor([[0, 3], [1, 0]]))  # task 1 has classes 0..2
    with pytest.raises(ValueError, match="labels"):
        model.raw(x, torch.tensor([[0, -1], [1, 0]]))
    with pytest.raises(ValueError, match="labels"):
        model.raw(x, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels"):
        model.raw(x, torch.zeros(2, 2))
    with pytest.raises(ValueError, match="x must"):
        model.raw(_image(2, 3, 40, gen), torch.zeros(2, 2, dtype=torch.int64))
