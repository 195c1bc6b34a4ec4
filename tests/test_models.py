"""Multi-task victim/surrogate networks: shapes, stems, ViT sizing, fused heads, init, dense net."""

from __future__ import annotations

import importlib.util

import pytest

if importlib.util.find_spec("torchvision") is None:
    pytest.skip("torchvision is an optional dependency (extra 'vision')", allow_module_level=True)

import torch
from torch import nn

from mtlue_fast.compat import import_torchvision
from mtlue_fast.models import (
    BACKBONES,
    DenseMultiTaskNet,
    MultiTaskNet,
    build_backbone,
    build_model,
    uses_small_stem,
    vit_patch_size,
)
from mtlue_fast.models.backbones import StemMaxPool

W = 0.25  # cheap variants throughout


def _count(params) -> int:
    return sum(p.numel() for p in params)


@pytest.mark.parametrize("crop", [32, 64])
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_forward_backward(backbone, in_channels, crop):
    torch.manual_seed(0)
    net = MultiTaskNet((9, 5, 2), backbone=backbone, in_channels=in_channels, crop=(crop, crop), width=W)
    x = torch.rand(2, in_channels, crop, crop)
    y = net(x)
    assert y.shape == (2, sum(net.num_outputs)) == (2, 15)
    assert torch.isfinite(y).all()
    y.square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert net.last_shared_layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backbone", BACKBONES)
def test_build_backbone_feature_size(backbone):
    net, features = build_backbone(backbone, 3, (32, 32), width=W)
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, features)


def test_width_one_resnet18_is_torchvision():
    tv = import_torchvision()
    ref = tv.models.resnet18(weights=None)
    net, features = build_backbone("resnet18", 3, (64, 64))
    assert features == 512
    assert _count(net.parameters()) == _count(ref.parameters()) - _count(ref.fc.parameters())
    shapes = {n: p.shape for n, p in ref.named_parameters() if not n.startswith("fc.")}
    assert {n: p.shape for n, p in net.named_parameters()} == shapes
    assert isinstance(net.fc, nn.Identity)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("backbone", "crop", "tv_name", "drop"),
    [
        ("resnet50", 64, "resnet50", "fc"),
        ("vgg16_bn", 64, "vgg16_bn", "classifier"),
        ("densenet121", 64, "densenet121", "classifier"),
        ("vit_b_16", 224, "vit_b_16", "heads"),
    ],
)
def test_width_one_matches_torchvision_size(backbone, crop, tv_name, drop):
    ref = getattr(import_torchvision().models, tv_name)(weights=None)
    net, _ = build_backbone(backbone, 3, (crop, crop))
    assert _count(net.parameters()) == _count(ref.parameters()) - _count(getattr(ref, drop).parameters())


def test_width_scales_resnet_channels():
    net, features = build_backbone("resnet18", 3, (32, 32), width=0.25)
    assert features == 128
    assert [net.conv1.out_channels] + [getattr(net, f"layer{i}")[-1].conv2.out_channels for i in range(1, 5)] == [
        16, 16, 32, 64, 128,
    ]  # fmt: skip
    assert build_backbone("resnet50", 3, (32, 32), width=0.25)[1] == 512
    assert build_backbone("vgg16_bn", 3, (32, 32), width=0.25)[1] == 128


def test_stem_rule():
    assert uses_small_stem((32, 32)) and uses_small_stem((64, 32)) and uses_small_stem((47, 64))
    assert not uses_small_stem((64, 64)) and not uses_small_stem((48, 56))
    small, _ = build_backbone("resnet18", 1, (32, 32), width=W)
    assert (small.conv1.kernel_size, small.conv1.stride, small.conv1.in_channels) == ((3, 3), (1, 1), 1)
    assert isinstance(small.maxpool, nn.Identity)
    std, _ = build_backbone("resnet18", 3, (64, 64), width=W)
    assert (std.conv1.kernel_size, std.conv1.stride) == ((7, 7), (2, 2))
    assert isinstance(std.maxpool, nn.MaxPool2d)
    dense_small, _ = build_backbone("densenet121", 1, (32, 32), width=W)
    f = dense_small.features
    assert (f.conv0.kernel_size, f.conv0.stride, f.conv0.in_channels) == ((3, 3), (1, 1), 1)
    assert isinstance(f.pool0, nn.Identity)
    assert build_backbone("densenet121", 3, (64, 64), width=W)[0].features.conv0.kernel_size == (7, 7)


@pytest.mark.parametrize(("crop", "patch"), [(32, 4), (64, 4), (96, 8), (192, 16), (224, 16)])
def test_vit_sized_to_crop(crop, patch):
    assert vit_patch_size((crop, crop)) == patch
    if crop > 64:
        return  # sizing only; building large ViTs is the slow part
    vit, hidden = build_backbone("vit_b_16", 1, (crop, crop), width=W)
    seq = (crop // patch) ** 2 + 1
    assert hidden == 64 * 3 and vit.hidden_dim == hidden and vit.patch_size == patch
    assert vit.conv_proj.kernel_size == (patch, patch) and vit.conv_proj.in_channels == 1
    assert vit.seq_length == seq and vit.encoder.pos_embedding.shape == (1, seq, hidden)
    assert len(vit.encoder.layers) == 12 and vit.encoder.layers[0].self_attention.num_heads == 3
    assert vit(torch.rand(2, 1, crop, crop)).shape == (2, hidden)


def test_vit_rejects_non_square_crop():
    with pytest.raises(ValueError, match="square"):
        build_backbone("vit_b_16", 3, (32, 64), width=W)


def test_fused_head_split():
    net = MultiTaskNet((9, 5, 2), crop=32, width=W, rep_dim=16)
    assert net.num_classes == (9, 5, 2) and net.num_outputs == (9, 5, 1)
    assert isinstance(net.head, nn.Linear) and net.head.out_features == 15
    logits = torch.arange(4 * 15.0).view(4, 15)
    a, b, c = net.split(logits)
    assert a.shape == (4, 9) and b.shape == (4, 5) and c.shape == (4,)
    assert torch.equal(a, logits[:, :9]) and torch.equal(b, logits[:, 9:14]) and torch.equal(c, logits[:, 14])
    assert c.data_ptr() == logits[:, 14].data_ptr()  # a view, no copy
    z = net.encode(torch.rand(4, 3, 32, 32))
    assert z.shape == (4, 16) and (z > -1).all()  # ELU output
    assert torch.equal(net.decode(z), net.head(z))


def test_parameters_partition():
    for net in (MultiTaskNet((2, 3), crop=32, width=W), DenseMultiTaskNet(backbone="resnet18", width=W)):
        shared = [id(p) for p in net.shared_parameters()]
        task = [id(p) for p in net.task_parameters()]
        assert len(set(shared)) == len(shared) and len(set(task)) == len(task)
        assert not set(shared) & set(task)
        assert set(shared) | set(task) == {id(p) for p in net.parameters()}
        assert id(net.last_shared_layer.weight) in set(shared)


@pytest.mark.parametrize("backbone", ["resnet50", "vgg16_bn", "densenet121"])
def test_init(backbone):
    torch.manual_seed(0)
    net, _ = build_backbone(backbone, 3, (32, 32), width=W)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert bns and convs
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
    assert all(m.bias is None or torch.all(m.bias == 0) for m in convs)
    for m in convs:
        assert m.weight.std() > 0
        fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
        if m.weight.numel() >= 1000:  # Kaiming-normal, fan_out mode: std sqrt(2 / fan_out)
            assert m.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.2)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_dense_net(backbone):
    torch.manual_seed(0)
    net = DenseMultiTaskNet(backbone=backbone, width=W)
    assert net.task_names == ("segmentation", "depth", "normal") and net.num_outputs == (13, 1, 3)
    x = torch.rand(2, 3, 64, 48)
    feat = net.encode(x)
    assert feat.shape == (2, net.feature_channels, 8, 6)  # output stride 8
    out = net(x)
    assert list(out) == list(net.task_names)
    for name, c in zip(net.task_names, net.num_outputs):
        assert out[name].shape == (2, c, 64, 48) and torch.isfinite(out[name]).all()
    assert torch.allclose(out["normal"].norm(dim=1), torch.ones(2, 64, 48), atol=1e-5)
    sum(o.mean() for o in out.values()).backward()
    assert net.last_shared_layer.weight.grad is not None
    assert net.last_shared_layer is [m for m in net.encoder[-1].modules() if isinstance(m, nn.Conv2d)][-1]


def test_dense_resnet50_uses_dilation():
    net = DenseMultiTaskNet(tasks={"depth": 1}, backbone="resnet50", width=W, in_channels=1)
    layer4 = net.encoder[-1]
    assert layer4[0].conv2.dilation == (2, 2) and layer4[1].conv2.dilation == (4, 4)
    assert net.encoder[0].in_channels == 1


def test_build_model():
    assert isinstance(build_model((2, 2), dense=False, crop=32, width=W), MultiTaskNet)
    dense = build_model({"segmentation": 4}, dense=True, backbone="resnet18", width=W)
    assert isinstance(dense, DenseMultiTaskNet) and dense.num_outputs == (4,)


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"backbone": "resnet101"}, "backbone"),
        ({"in_channels": 2}, "in_channels"),
        ({"in_channels": 0}, "in_channels"),
        ({"width": 0.0}, "width"),
    ],
)
def test_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        MultiTaskNet((2, 3), crop=32, **{"width": W, **kwargs})
    with pytest.raises(ValueError, match=arg):
        DenseMultiTaskNet(**{"backbone": "resnet18", "width": W, **kwargs})


def test_unknown_backbone_lists_known_names():
    with pytest.raises(ValueError, match="resnet18, resnet50, vgg16_bn, densenet121, vit_b_16"):
        build_backbone("alexnet", 3, (32, 32))


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        MultiTaskNet((9, 1), crop=32, width=W)


# bf16 exercises the channels-last pooling; fp32 now passes straight through (the layout change
# pays in bf16 only) and stays here so that widening that rule is checked too.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stem_max_pool_is_bit_exact(dtype):
    """The stem's channels-last pooling gives nn.MaxPool2d's values and gradients bit for bit, ties
    (zeros after a ReLU, repeated bf16 values) included, in whatever layout the input came."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x = torch.randn(6, 5, 17, 18, generator=g).relu().mul(4).round().div(4).to(dtype)  # many ties
    grad = torch.randn(6, 5, 9, 9, generator=g).to(dtype)
    ours, plain = StemMaxPool(3, 2, 1), nn.MaxPool2d(3, 2, 1)
    for layout in (torch.contiguous_format, torch.channels_last):
        a = x.contiguous(memory_format=layout).requires_grad_()
        b = x.contiguous(memory_format=layout).requires_grad_()
        out_a, out_b = ours(a), plain(b)
        assert out_a.is_contiguous(memory_format=layout)
        assert torch.equal(out_a, out_b)
        (grad_a,) = torch.autograd.grad(out_a, a, grad)
        (grad_b,) = torch.autograd.grad(out_b, b, grad)
        assert torch.equal(grad_a, grad_b)
