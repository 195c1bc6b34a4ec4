"""mtlue::embedding_reg (compiled) against the reference and a naive per-pair definition."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from mtlue_fast import ops
from mtlue_fast.ops import _checks as checks
from mtlue_fast.ops import reference

TASK_LAYOUTS = {
    "binary_x5": [2, 2, 2, 2, 2],
    "mixed": [9, 5, 2],  # UTKFace: age bins, race, gender
    "with_single_class": [1, 3, 1, 4],
    "single_task": [6],
}


def offsets_of(sizes):
    return torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.int64)


def naive_pairs(table, sizes):
    """The definition written out pair by pair with F.cosine_similarity (float64)."""
    offsets = offsets_of(sizes).tolist()
    task = [k for k, c in enumerate(sizes) for _ in range(c)]
    within, cross = [], []
    for m in range(table.shape[0]):
        for n in range(m + 1, table.shape[0]):
            cos = F.cosine_similarity(table[m], table[n], dim=0, eps=1e-8)
            (within if task[m] == task[n] else cross).append(cos if task[m] == task[n] else cos.abs())
    zero = table.new_zeros(())
    assert offsets[-1] == table.shape[0]
    return (torch.stack(within).mean() if within else zero, torch.stack(cross).mean() if cross else zero)


def run_both(table, sizes, grads):
    offsets = offsets_of(sizes)
    intra, inter = ops.embedding_reg(table, offsets)
    leaf = table.detach().clone().requires_grad_(True)
    intra_ref, inter_ref = reference.embedding_reg(leaf, offsets)
    (grad,) = torch.autograd.grad(grads[0] * intra + grads[1] * inter, table)
    (grad_ref,) = torch.autograd.grad(grads[0] * intra_ref + grads[1] * inter_ref, leaf)
    return (intra, inter, grad), (intra_ref, inter_ref, grad_ref)


@pytest.mark.parametrize("layout", list(TASK_LAYOUTS))
def test_matches_reference_and_naive_float64(device, gen, layout):
    sizes = TASK_LAYOUTS[layout]
    table = torch.randn(sum(sizes), 37, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    grads = torch.randn(2, generator=gen, dtype=torch.float64).tolist()
    got, expected = run_both(table, sizes, grads)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    naive = naive_pairs(table.detach().cpu(), sizes)
    torch.testing.assert_close(got[0].cpu(), naive[0], atol=1e-12, rtol=0)
    torch.testing.assert_close(got[1].cpu(), naive[1], atol=1e-12, rtol=0)
    if len(sizes) == 1:
        assert got[1].item() == 0.0


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_matches_reference_low_precision(device, gen, dtype, tol):
    sizes = [2] * 40  # CelebA layout
    table = torch.randn(80, 300, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    got, expected = run_both(table, sizes, [20.0, 100.0])
    for a, b in zip(got, expected):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def test_gradcheck(device, gen):
    table = torch.randn(8, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    offsets = offsets_of([3, 2, 3]).to(device)

    def fn(t):
        intra, inter = ops.embedding_reg(t, offsets)
        return intra, inter

    assert torch.autograd.gradcheck(fn, (table,))


def test_zero_row_uses_clamped_norm(device, gen):
    table = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    table[1] = 0.0
    table = table.to(device).requires_grad_(True)
    got, expected = run_both(table, [2, 3], [1.0, 1.0])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
        assert torch.isfinite(a).all()


def test_only_one_output_used(device, gen):
    table = torch.randn(6, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_(True)
    intra, _ = ops.embedding_reg(table, [0, 2, 6])
    (grad,) = torch.autograd.grad(intra, table)
    leaf = table.detach().clone().requires_grad_(True)
    (grad_ref,) = torch.autograd.grad(reference.embedding_reg(leaf, offsets_of([2, 4]))[0], leaf)
    torch.testing.assert_close(grad, grad_ref, atol=1e-12, rtol=1e-10)


def test_optimising_drives_regularisers_to_their_targets(gen):
    """docs/method.md section 5: minimising intra + inter pushes class embeddings apart within a task (binary pairs
    towards cos -1) and makes tasks orthogonal (|cos| towards 0)."""
    table = torch.randn(8, 64, generator=gen).requires_grad_(True)
    opt = torch.optim.Adam([table], lr=2e-2)
    for _ in range(200):
        intra, inter = ops.embedding_reg(table, [0, 2, 4, 6, 8])
        opt.zero_grad()
        (intra + inter).backward()
        opt.step()
    assert intra.item() < -0.95 and inter.item() < 0.05


@pytest.mark.parametrize(
    "table,offsets,match",
    [
        (torch.zeros(4, 3), [0, 2, 2, 4], "strictly increasing"),
        (torch.zeros(4, 3), [1, 2, 4], "strictly increasing from 0"),
        (torch.zeros(4, 3), [0, 2, 5], "to R=4"),
        (torch.zeros(4, 3), [0, 3, 2, 4], "strictly increasing"),
        (torch.zeros(4, 3), [0], r"\[K\+1\] with K >= 1"),
        (torch.zeros(4, 3), torch.tensor([0.0, 4.0]), "task_offsets must be an integer tensor"),
        (torch.zeros(4), [0, 4], r"table must have shape \[R, D\]"),
        (torch.zeros(4, 3, dtype=torch.int64), [0, 4], "table must be floating"),
        (torch.zeros(4, 3, device="meta"), torch.tensor([0, 4]).to("meta"), None),
    ],
)
def test_bad_input_names_the_argument(table, offsets, match):
    if match is None:  # offsets on another non-CPU device than the table
        table = torch.zeros(4, 3)
        with pytest.raises(ValueError, match="task_offsets is on meta but table is on cpu"):
            ops.embedding_reg(table, offsets)
        return
    with pytest.raises((ValueError, TypeError), match=match):
        ops.embedding_reg(table, offsets)


def test_compiled_op_rejects_bad_offsets_directly():
    if ops.backend_for("cpu") != "compiled":
        pytest.skip("no compiled CPU kernels")
    with pytest.raises(RuntimeError, match="strictly increasing"):
        torch.ops.mtlue.embedding_reg(torch.zeros(4, 3), torch.tensor([0, 3, 3, 4]))


@pytest.mark.parametrize("offsets", [[0, 3, 3, 4], [0, 3, 2, 4], [1, 2, 4], [0, 2, 5]])
def test_bad_offsets_tensor_raises_at_once_on_the_cpu(offsets):
    """Offsets in a CPU tensor are checked by the CPU kernel itself (no read back in Python)."""
    with pytest.raises(ValueError, match=r"embedding_reg: task_offsets must be strictly increasing"):
        ops.embedding_reg(torch.randn(4, 3), torch.tensor(offsets))


def test_compiled_path_reads_no_values_back(gen, monkeypatch):
    if ops.backend_for("cpu") != "compiled":
        pytest.skip("no compiled CPU kernels")
    table = torch.randn(6, 5, generator=gen).requires_grad_(True)
    offsets = offsets_of([2, 3, 1])

    def forbidden(self, *args, **kwargs):
        raise AssertionError("a tensor value was read back to the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    intra, inter = ops.embedding_reg(table, offsets)
    (intra + inter).backward()


@pytest.mark.cuda
def test_cpu_offsets_for_a_cuda_table_are_checked_and_copied_once(gen):
    table = torch.randn(6, 5, generator=gen).to("cuda")  # gen is a CPU generator
    offsets = offsets_of([2, 3, 1])
    first = ops.embedding_reg(table, offsets)
    copies = {key: entry[2] for key, entry in checks._copies.items()}
    second = ops.embedding_reg(table, offsets)
    # The same device copy: no second check or copy.
    assert {key: entry[2] for key, entry in checks._copies.items()}.keys() == copies.keys()
    assert all(checks._copies[key][2] is copy for key, copy in copies.items())
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    offsets[1] = 5  # [0, 5, 5, 6]: an in-place change is seen, checked again, and refused
    with pytest.raises(ValueError, match="strictly increasing"):
        ops.embedding_reg(table, offsets)


@pytest.mark.cuda
def test_bad_offsets_on_the_gpu_are_raised_later():
    device = torch.device("cuda")
    ops.raise_pending_errors(device)
    table = torch.randn(4, 3, device=device)
    ops.embedding_reg(table, torch.tensor([0, 3, 3, 4], device=device))  # no read back here
    with pytest.raises(ValueError, match=r"strictly increasing from 0 to R=4.*got 3 then 3 at index 1"):
        ops.raise_pending_errors(device)
    ops.embedding_reg(table, torch.tensor([0, 2, 4], device=device))
    ops.raise_pending_errors(device)
    ops.embedding_reg(table, torch.tensor([0, 2, 5], device=device))
    with pytest.raises(ValueError, match=r"got first 0 and last 5"):
        ops.raise_pending_errors(device)
