"""torch.compile(fullgraph=True) traces through the compiled ops: no graph break, same results."""

from __future__ import annotations

import pytest
import torch

from mtlue_fast import ops


def generation_step(x, raw, crop, flip, table, offsets):
    """A miniature generator step: perturb + augment, a loss on the result, the regularisers."""
    y = ops.perturb_apply(x, raw, 8 / 255, mode="clamp", crop=crop, flip=flip, out_size=(6, 6))
    intra, inter = ops.embedding_reg(table, offsets)
    return (y * y).mean() + 20 * intra + 100 * inter


def inputs(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 2, 8, 8), generator=g, dtype=torch.uint8).to(device)
    raw = (torch.randn(3, 2, 8, 8, generator=g) * 0.05).to(device)
    crop = torch.randint(0, 3, (3, 2), generator=g).to(device)
    flip = (torch.rand(3, generator=g) < 0.5).to(device)
    table = torch.randn(6, 16, generator=g).to(device)
    return x, raw, crop, flip, table, torch.tensor([0, 2, 4, 6], device=device)


def run(fn, device):
    x, raw, crop, flip, table, offsets = inputs(device)
    raw.requires_grad_(True)
    table.requires_grad_(True)
    loss = fn(x, raw, crop, flip, table, offsets)
    loss.backward()
    return loss.detach(), raw.grad, table.grad


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_fullgraph_compile_matches_eager(device, backend):
    torch._dynamo.reset()
    compiled = torch.compile(generation_step, fullgraph=True, backend=backend)
    for got, expected in zip(run(compiled, device), run(generation_step, device)):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_no_graph_break_and_ops_are_single_nodes(device):
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(generation_step)(*inputs(device))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    graph_code = explanation.graphs[0].code
    assert "mtlue.perturb_apply" in graph_code and "mtlue.embedding_reg" in graph_code


def test_quantize_export_under_compile(device):
    torch._dynamo.reset()
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8, device=device)
    delta = torch.randn(2, 3, 4, 4, device=device) * 0.02
    compiled = torch.compile(ops.quantize_export, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(x, delta), ops.quantize_export(x, delta)):
        assert torch.equal(got, expected)
