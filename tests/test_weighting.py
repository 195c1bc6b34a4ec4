"""Task-weighting strategies against their defining properties, on small hand-made cases."""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mtlue_fast.mtl import gram_solvers, weighting
from mtlue_fast.mtl.task_grads import TaskGradients
from mtlue_fast.mtl.weighting import fairgrad_weights, min_norm_weights


class TinyMTL(nn.Module):
    """Shared ``Linear(6, 8) + ELU``, then one fused head with one output per task."""

    def __init__(self, num_tasks: int) -> None:
        super().__init__()
        self.shared = nn.Sequential(nn.Linear(6, 8), nn.ELU())
        self.head = nn.Linear(8, num_tasks)
        self.last_shared_layer = self.shared[0]

    def losses(self, x, y, detach: bool):
        encoded = self.shared(x)
        rep = encoded.detach().requires_grad_() if detach else encoded
        out = self.head(rep)
        losses = ((out - y) ** 2).mean(0)
        return losses, rep, encoded


def _step(model, strategy, x, y, space="representation"):
    detach = strategy.needs_task_grads and space == "representation"
    losses, rep, encoded = model.losses(x, y, detach)
    grads = TaskGradients(
        losses, list(model.shared.parameters()), list(model.head.parameters()),
        representation=rep if detach else None, encoded=encoded if detach else None, space=space,
    )  # fmt: skip
    model.zero_grad(set_to_none=True)
    strategy.zero_grad(set_to_none=True)
    return strategy.backward(losses, grads), losses


def _data(gen, k=3, n=16):
    return torch.randn(n, 6, generator=gen), torch.randn(n, k, generator=gen)


# ---------------------------------------------------------------------------- registry


def test_get_builds_every_strategy_and_rejects_bad_names():
    for name in weighting.STRATEGIES:
        assert weighting.get(name, 3).name == name
    with pytest.raises(ValueError, match="unknown weighting 'nope'"):
        weighting.get("nope", 3)
    with pytest.raises(ValueError, match="bad options for weighting 'dwa'"):
        weighting.get("dwa", 3, temprature=2.0)
    with pytest.raises(ValueError, match="num_tasks"):
        weighting.get("ew", 0)


@pytest.mark.parametrize("name", list(weighting.STRATEGIES))
@pytest.mark.parametrize("space", ["representation", "parameters"])
def test_every_strategy_fills_finite_gradients(name, space, gen):
    torch.manual_seed(0)
    model = TinyMTL(3)
    strategy = weighting.get(name, 3)
    if name == "gradnorm":
        strategy.attach(model)
    x, y = _data(gen)
    for _ in range(2):
        weights, _ = _step(model, strategy, x, y, space)
        if name == "dwa":
            strategy.epoch_end()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    if weights is not None:
        assert weights.shape == (3,) and torch.isfinite(weights).all()


# ---------------------------------------------------------------------------- task gradients


# "parameters-looped": one backward per task (batched=False, for backbones whose backward communicates),
# computed under no_grad as the gradient strategies call it.
@pytest.mark.parametrize("space", ["representation", "parameters", "parameters-looped"])
def test_task_grads_equal_one_backward_per_task(space, gen):
    space, looped = space.removesuffix("-looped"), space.endswith("-looped")
    model = TinyMTL(3)
    x, y = _data(gen)
    losses, rep, encoded = model.losses(x, y, detach=space == "representation")
    shared = list(model.shared.parameters())
    grads = TaskGradients(
        losses, shared, list(model.head.parameters()),
        representation=rep if space == "representation" else None,
        encoded=encoded if space == "representation" else None, space=space, batched=not looped,
    )  # fmt: skip
    with torch.no_grad():
        matrix = grads.task_grads()
    targets = [rep] if space == "representation" else shared
    for k in range(3):
        row = torch.cat([g.flatten() for g in torch.autograd.grad(losses[k], targets, retain_graph=True)])
        torch.testing.assert_close(matrix[k], row)


def test_apply_writes_the_combined_gradient_in_parameter_space(gen):
    model = TinyMTL(2)
    x, y = _data(gen, k=2)
    losses, _, _ = model.losses(x, y, detach=False)
    shared = list(model.shared.parameters())
    grads = TaskGradients(losses, shared, list(model.head.parameters()), space="parameters")
    combined = torch.randn(sum(p.numel() for p in shared), generator=gen)
    expected_head = torch.autograd.grad(losses.sum(), list(model.head.parameters()), retain_graph=True)
    grads.apply(combined)
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in shared]), combined)
    for p, g in zip(model.head.parameters(), expected_head):
        torch.testing.assert_close(p.grad, g)


def test_parameter_space_gradients_are_laid_out_like_their_parameters(gen):
    """Fused optimisers (the default on a GPU) require a gradient with its parameter's strides; a
    channels-last convolution's weight is not contiguous."""
    conv = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
    head = nn.Linear(4, 2)
    x = torch.randn(5, 3, 6, 6, generator=gen).to(memory_format=torch.channels_last)
    losses = (head(conv(x).mean((2, 3))) ** 2).mean(0)
    shared = list(conv.parameters())
    grads = TaskGradients(losses, shared, list(head.parameters()), space="parameters")
    combined = torch.randn(sum(p.numel() for p in shared), generator=gen)
    grads.apply(combined)
    assert not conv.weight.is_contiguous()
    for p in shared:
        assert p.grad.stride() == p.stride()
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in shared]), combined)


def test_representation_space_ew_equals_plain_backward(gen):
    torch.manual_seed(1)
    model = TinyMTL(3)
    x, y = _data(gen)
    losses, _, _ = model.losses(x, y, detach=False)
    losses.sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    losses, rep, encoded = model.losses(x, y, detach=True)
    grads = TaskGradients(losses, list(model.shared.parameters()), list(model.head.parameters()), representation=rep, encoded=encoded)
    grads.apply(grads.task_grads().sum(0))
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g)


# ---------------------------------------------------------------------------- gradient strategies


def test_pcgrad_removes_the_conflicting_component():
    g1 = torch.tensor([1.0, 0.0])
    g2 = torch.tensor([-1.0, 1.0])  # conflicts with g1 (dot -1)
    combined, _ = weighting.PCGrad(2).combine(torch.stack([g1, g2]), torch.ones(2))
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2  # projected onto g2's normal plane
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    assert abs(float(p1 @ g2)) < 1e-6 and abs(float(p2 @ g1)) < 1e-6
    torch.testing.assert_close(combined, p1 + p2)


def test_pcgrad_matches_projecting_the_vectors_directly(gen):
    k = 6
    g = torch.randn(k, 50, generator=gen, dtype=torch.float64)
    torch.manual_seed(3)
    combined, _ = weighting.PCGrad(k).combine(g, torch.ones(k))
    torch.manual_seed(3)  # the same random orders
    keys = torch.rand(k, k)
    keys.fill_diagonal_(2.0)
    order = keys.argsort(dim=1)
    expected = torch.zeros(50, dtype=torch.float64)
    for i in range(k):
        projected = g[i].clone()
        for j in order[i, : k - 1].tolist():
            dot = projected @ g[j]
            if dot < 0:
                projected -= dot / (g[j] @ g[j]) * g[j]
        expected += projected
    torch.testing.assert_close(combined, expected)


def test_pcgrad_leaves_agreeing_gradients_alone(gen):
    g = torch.rand(4, 10, generator=gen)  # all positive: no conflicts
    combined, _ = weighting.PCGrad(4).combine(g, torch.ones(4))
    torch.testing.assert_close(combined, g.sum(0))


def test_pcgrad_result_has_no_conflict_left_for_two_tasks(gen):
    for _ in range(20):
        g = torch.randn(2, 7, generator=gen)
        combined, _ = weighting.PCGrad(2).combine(g, torch.ones(2))
        # With two tasks, PCGrad's update never conflicts with either task.
        assert float(combined @ g[0]) >= -1e-5 and float(combined @ g[1]) >= -1e-5


def test_mgda_two_tasks_matches_the_closed_form(gen):
    for _ in range(20):
        g = torch.randn(2, 9, generator=gen, dtype=torch.float64)
        g1, g2 = g
        alpha = float(((g2 - g1) @ g2) / ((g1 - g2) @ (g1 - g2)))
        alpha = min(max(alpha, 0.0), 1.0)
        combined, weights = weighting.MGDA(2).combine(g.float(), torch.ones(2))
        torch.testing.assert_close(weights.double(), torch.tensor([alpha, 1 - alpha], dtype=torch.float64), atol=1e-6, rtol=0)
        torch.testing.assert_close(combined, (alpha * g1 + (1 - alpha) * g2).float(), atol=1e-5, rtol=1e-5)


def test_min_norm_weights_satisfy_the_optimality_conditions(gen):
    for k in (3, 5, 40):
        g = torch.randn(k, 64, generator=gen, dtype=torch.float64)
        g = g + torch.randn(1, 64, generator=gen, dtype=torch.float64)
        gram = g @ g.T
        w = min_norm_weights(gram)
        assert torch.all(w >= 0) and abs(float(w.sum()) - 1) < 1e-12
        # KKT: (gram w)_k >= w^T gram w with equality on the support.
        value = w @ gram @ w
        slack = (gram @ w - value) / torch.diagonal(gram).max()
        assert float(slack.min()) > -1e-10
        assert float((slack * (w > 0)).abs().max()) < 1e-10


def test_mgda_normalizations_are_checked():
    with pytest.raises(ValueError, match="normalize"):
        weighting.MGDA(2, normalize="l1")
    for mode in weighting.MGDA.NORMALIZATIONS:
        combined, weights = weighting.MGDA(3, normalize=mode).combine(torch.randn(3, 5), torch.rand(3) + 0.1)
        assert torch.isfinite(combined).all() and torch.isfinite(weights).all()


@pytest.mark.parametrize("scale", [1.0, 1e-4, 1e3])
def test_fairgrad_weights_satisfy_its_equation(scale, gen):
    g = scale * torch.randn(5, 30, generator=gen, dtype=torch.float64)
    gram = g @ g.T
    w = fairgrad_weights(gram)
    assert torch.all(w > 0)
    residual = gram @ w - 1 / w
    assert float(residual.abs().max()) < 1e-8 * float((1 / w).abs().max())


def test_fairgrad_general_alpha(gen):
    g = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    gram = g @ g.T
    w = fairgrad_weights(gram, alpha=2.0)
    torch.testing.assert_close(gram @ w, w ** (-0.5), rtol=1e-8, atol=0)


def test_fairgrad_combined_gradient_is_weighted_sum(gen):
    g = torch.randn(3, 8, generator=gen)
    combined, w = weighting.FairGrad(3).combine(g, torch.ones(3))
    torch.testing.assert_close(combined, w @ g)


@pytest.mark.parametrize("k,p", [(3, 10), (4, 3)])  # (4, 3): rank-deficient, one component dropped
def test_aligned_mtl_has_equal_projections(k, p, gen):
    g = torch.randn(k, p, generator=gen)
    combined, weights = weighting.AlignedMTL(k).combine(g, torch.ones(k))
    gram = g.double() @ g.double().T
    values, vectors = torch.linalg.eigh(gram)
    kept = values > values.max() * k * torch.finfo(torch.float64).eps
    values, vectors = values[kept], vectors[:, kept]
    balance = values.min().sqrt() * (vectors * values.rsqrt()) @ vectors.T
    aligned = balance @ g.double()  # [K, P]
    # The aligned gradients span the same space with a condition number of 1 ...
    singular = torch.linalg.svdvals(aligned)[: int(kept.sum())]
    torch.testing.assert_close(singular, torch.full_like(singular, float(singular[0])), rtol=1e-6, atol=1e-9)
    if p >= k:  # full rank: the combined gradient projects equally on every aligned gradient
        projections = aligned @ combined.double()
        torch.testing.assert_close(projections, torch.full_like(projections, float(projections.mean())), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(combined, weights @ g)


# ---------------------------------------------------------------------------- loss strategies


def test_uw_weights_move_the_right_way(gen):
    strategy = weighting.UW(2)
    assert torch.equal(strategy.log_vars.detach(), torch.full((2,), -0.5))
    optimizer = torch.optim.SGD(strategy.parameters(), lr=0.1)
    losses = torch.tensor([4.0, 0.05], requires_grad=True)  # task 0 hard, task 1 easy
    for _ in range(5):
        optimizer.zero_grad()
        grads = TaskGradients(losses, [], [losses])
        strategy.backward(losses, grads)
        optimizer.step()
    s = strategy.log_vars.detach()
    assert s[0] > -0.5 > s[1]  # the hard task's variance grows (its weight shrinks), the easy one's falls
    w = strategy.weights(losses).detach()
    assert w[0] < w[1]


def test_rlw_weights_sum_to_k_and_change_each_step():
    strategy = weighting.RLW(4)
    losses = torch.ones(4)
    first, second = strategy.weights(losses), strategy.weights(losses)
    for w in (first, second):
        assert torch.all(w > 0)
        torch.testing.assert_close(w.sum(), torch.tensor(4.0))
    assert not torch.equal(first, second)


def test_dwa_uses_the_ratio_of_the_last_two_epochs():
    strategy = weighting.DWA(2, temperature=2.0)
    for epoch_losses in ([1.0, 1.0], [1.0, 1.0]):
        torch.testing.assert_close(strategy.weights(torch.tensor(epoch_losses)), torch.ones(2))
        strategy.epoch_end()
    strategy.weights(torch.tensor([0.5, 2.0]))  # epoch 3: task 0 falls, task 1 rises
    strategy.epoch_end()
    w = strategy.weights(torch.tensor([0.5, 2.0]))
    expected = 2 * torch.softmax(torch.tensor([0.5, 2.0]) / 2.0, 0)
    torch.testing.assert_close(w, expected)
    restored = weighting.DWA(2)
    restored.load_state_dict(strategy.state_dict())
    torch.testing.assert_close(restored.weights(torch.ones(2)), w)


def test_gradnorm_lowers_the_weight_of_the_task_with_the_larger_gradient(gen):
    torch.manual_seed(0)
    model = TinyMTL(2)
    strategy = weighting.GradNorm(2)
    strategy.attach(model)
    optimizer = torch.optim.SGD(strategy.parameters(), lr=0.05)
    x = torch.randn(32, 6, generator=gen)
    y = torch.randn(32, 2, generator=gen) * torch.tensor([10.0, 0.1])  # task 0: much larger gradients
    for _ in range(3):
        _step(model, strategy, x, y)
        optimizer.step()
    w = strategy.weights(torch.ones(2)).detach()
    torch.testing.assert_close(w.sum(), torch.tensor(2.0))
    assert w[0] < 1.0 < w[1]
    assert not any("layer" in key for key in strategy.state_dict())


# ---------------------------------------------------------------------------- host reads


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")


@contextlib.contextmanager
def counted_host_reads():
    """Count every call of a value-reading tensor method (by anyone) within the block."""
    calls: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def wrap(name, original):
        def counted(self, *args, **kwargs):
            calls[name] += 1
            return original(self, *args, **kwargs)

        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, wrap(name, original))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("space", ["representation", "parameters"])
def test_no_strategy_reads_tensor_values_on_the_host(space, gen):
    x, y = _data(gen, k=4)
    for name in weighting.STRATEGIES:
        torch.manual_seed(0)
        model = TinyMTL(4)
        strategy = weighting.get(name, 4)
        strategy.attach(model)
        with counted_host_reads() as calls:
            for _ in range(3):
                _step(model, strategy, x, y, space)
        assert not calls, f"{name}: host reads in backward: {dict(calls)}"


# ---------------------------------------------------------------------------- Gram solvers vs the loops they replace
#
# The references below are the straightforward algorithms the solvers replaced (loops over tiny
# tensors, an eigendecomposition) and an exact active-set solve of the min-norm problem on the host.


def _reference_pcgrad(gram, order):
    """Project every task against its partners one at a time, on the [K, K] coefficients."""
    k = gram.shape[0]
    rows = torch.arange(k)
    coefficients = torch.eye(k, dtype=gram.dtype)
    for step in range(k - 1):
        partner = order[:, step]
        dot = (coefficients @ gram)[rows, partner]
        scale = torch.where(dot < 0, dot / torch.diagonal(gram)[partner].clamp_min(1e-30), torch.zeros_like(dot))
        coefficients[rows, partner] -= scale
    return coefficients.sum(0)


def _reference_min_norm_frank_wolfe(gram, iterations):
    """Best pair, then pairwise Frank-Wolfe steps with exact line search."""
    k = gram.shape[0]
    if k == 1:
        return torch.ones(1, dtype=gram.dtype)
    diag = torch.diagonal(gram)
    diff = diag[:, None] + diag[None, :] - 2 * gram
    a_pair = ((diag[None, :] - gram) / diff.clamp_min(1e-30)).clamp(0, 1)
    a_pair = torch.where(diff > 1e-30, a_pair, torch.full_like(a_pair, 0.5))
    cost = a_pair**2 * diag[:, None] + (1 - a_pair) ** 2 * diag[None, :] + 2 * a_pair * (1 - a_pair) * gram
    best = int(cost.flatten().argmin())
    i, j, a = best // k, best % k, a_pair.flatten()[best]
    onehot = torch.eye(k, dtype=gram.dtype)
    weights = a * onehot[i] + (1 - a) * onehot[j]
    for _ in range(iterations):
        gradient = gram @ weights
        best = gradient.argmin()
        worst = torch.where(weights > 0, gradient, torch.full_like(gradient, -float("inf"))).argmax()
        direction = onehot[best] - onehot[worst]
        curvature = direction @ gram @ direction
        step = torch.minimum((-(direction @ gradient) / curvature.clamp_min(1e-30)).clamp_min(0), weights[worst])
        weights = (weights + torch.where(curvature > 1e-30, step, torch.zeros_like(step)) * direction).clamp_min(0)
    return weights


def _exact_min_norm(gram):
    """Wolfe's min-norm-point active-set method on the host (float64): exact up to rounding."""
    k = gram.shape[0]
    scale = float(torch.diagonal(gram).max())
    first = int(torch.diagonal(gram).argmin())
    support, weights = [first], torch.zeros(k, dtype=torch.float64)
    weights[first] = 1
    for _ in range(10 * k):
        gradient = gram @ weights
        entering = int(gradient.argmin())
        if float(gradient[entering]) >= float(weights @ gradient) - 1e-14 * scale or entering in support:
            break
        support.append(entering)
        while True:  # min-norm point of the affine hull of the support, stepping back into the simplex
            n = len(support)
            system = torch.zeros(n + 1, n + 1, dtype=torch.float64)
            system[:n, :n], system[:n, n], system[n, :n] = gram[support][:, support], -1, 1
            rhs = torch.zeros(n + 1, dtype=torch.float64)
            rhs[n] = 1
            affine = torch.linalg.lstsq(system, rhs).solution[:n]
            current = weights[support]
            if bool((affine > 0).all()):
                weights = torch.zeros(k, dtype=torch.float64)
                weights[support] = affine
                break
            negative = affine <= 0
            theta = torch.min(current[negative] / (current[negative] - affine[negative]))
            moved = current + theta * (affine - current)
            keep = moved > 1e-15
            support = [t for t, kept in zip(support, keep.tolist()) if kept]
            weights = torch.zeros(k, dtype=torch.float64)
            weights[support] = moved[keep] / moved[keep].sum()
    return weights


def _reference_fairgrad(gram, alpha=1.0, iterations=30):
    """Damped Newton on ``gram w = w^(-1/alpha)``, the best of 12 step lengths per step."""
    k = gram.shape[0]
    scale = torch.diagonal(gram).mean().clamp_min(1e-30)
    a, p = gram / scale, 1.0 / alpha
    lengths = 0.5 ** torch.arange(12, dtype=a.dtype)

    def phi(w):
        barrier = torch.log(w).sum(-1) if p == 1.0 else (w ** (1 - p) / (1 - p)).sum(-1)
        return 0.5 * ((w @ a) * w).sum(-1) - barrier

    def residual_norm(w):
        return (a @ w - w.clamp_min(1e-300) ** (-p)).abs().max()

    w = torch.ones(k, dtype=a.dtype)
    for _ in range(iterations):
        residual = a @ w - w ** (-p)
        step = -torch.linalg.solve(a + torch.diag(p * w ** (-p - 1)), residual)
        candidates = w[None, :] + lengths[:, None] * step[None, :]
        feasible = (candidates > 0).all(-1)
        values = torch.where(feasible, phi(candidates.clamp_min(1e-300)), torch.full_like(lengths, float("inf")))
        best = values.argmin()
        damped = candidates[best] if values[best] < phi(w) else w
        full = candidates[0]
        w = full if bool(feasible[0]) and residual_norm(full) < residual_norm(w) else damped
    return w * scale ** (-alpha / (1 + alpha))


def _reference_aligned(gram):
    """``sqrt(lambda_min) V diag(lambda^-1/2) V^T 1`` from ``torch.linalg.eigh``."""
    eigenvalues, vectors = torch.linalg.eigh(gram)
    kept = eigenvalues > eigenvalues.max() * gram.shape[0] * torch.finfo(gram.dtype).eps
    if not bool(kept.any()):
        return torch.zeros(gram.shape[0], dtype=gram.dtype)
    values, vectors = eigenvalues[kept], vectors[:, kept]
    return values.min().sqrt() * (vectors * values.rsqrt()) @ vectors.T @ torch.ones(gram.shape[0], dtype=gram.dtype)


# Well-conditioned kinds, where the references are exact to rounding; "scaled" (gradient norms over
# four orders of magnitude) and "clustered" (five directions plus 5% noise) are badly conditioned;
# the last three are singular.
WELL = ("random", "shared", "conflicting")
BADLY = ("scaled", "clustered")
SINGULAR = ("low_rank", "zero_task", "duplicate")


def _gram(kind: str, k: int, gen: torch.Generator) -> torch.Tensor:
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    p = 64
    g = randn(k, p)
    if kind == "shared":
        g = g + 2 * randn(1, p)
    elif kind == "conflicting":
        g = g + randn(1, p) * torch.where(torch.rand(k, 1, generator=gen) < 0.5, -1.0, 1.0).double()
    elif kind == "scaled":
        g = g * torch.logspace(-2, 2, k, dtype=torch.float64)[torch.randperm(k, generator=gen)][:, None]
    elif kind == "clustered":
        g = randn(k, 5) @ randn(5, p) + 0.05 * g
    elif kind == "low_rank":
        g = randn(k, 3) @ randn(3, p)
    elif kind == "zero_task":
        g[torch.randint(k, (), generator=gen)] = 0
    elif kind == "duplicate" and k > 1:
        g[-1] = g[0]
    g = g.float().double()  # float32 gradients, as the strategies get them
    scale = (0.5 + float(torch.rand((), generator=gen))) * 10.0 ** int(torch.randint(-4, 4, (), generator=gen))
    return scale * (g @ g.T)


SIZES = (1, 2, 3, 7, 40)


@pytest.mark.parametrize("kind", WELL + BADLY + SINGULAR)
@pytest.mark.parametrize("k", SIZES)
def test_pcgrad_solver_equals_the_projection_loop(kind, k, gen):
    gram = _gram(kind, k, gen)
    keys = torch.rand(k, k, generator=gen)
    keys.fill_diagonal_(2.0)
    order = keys.argsort(dim=1)
    expected = _reference_pcgrad(gram, order)
    torch.testing.assert_close(gram_solvers.pcgrad_weights(gram, order[:, : k - 1]), expected, rtol=1e-10, atol=1e-10)


def test_pcgrad_strategy_draws_the_orders_on_the_device_generator(gen):
    gram = _gram("conflicting", 7, gen)
    torch.manual_seed(5)
    weights = weighting.PCGrad(7).weights_from_gram(gram, torch.ones(7))
    torch.manual_seed(5)
    keys = torch.rand(7, 7)
    keys.fill_diagonal_(2.0)
    torch.testing.assert_close(weights, _reference_pcgrad(gram, keys.argsort(dim=1)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", WELL + BADLY + SINGULAR)
@pytest.mark.parametrize("k", SIZES)
def test_min_norm_solver_finds_the_exact_minimum(kind, k, gen):
    gram = _gram(kind, k, gen)
    weights = min_norm_weights(gram)
    assert torch.all(weights >= 0) and abs(float(weights.sum()) - 1) < 1e-12
    exact = _exact_min_norm(gram)
    scale = float(torch.diagonal(gram).mean()) or 1.0
    value, optimum = float(weights @ gram @ weights) / scale, float(exact @ gram @ exact) / scale
    if kind in SINGULAR and kind != "zero_task":
        # Weights need not be unique; the objective is within the ridged runs' reach of the optimum.
        assert value - optimum < 1e-5
        return
    assert value - optimum < 1e-12
    if kind in WELL:
        torch.testing.assert_close(weights, exact, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", WELL)
@pytest.mark.parametrize("k", (2, 3, 7))
def test_min_norm_solver_equals_converged_frank_wolfe(kind, k, gen):
    gram = _gram(kind, k, gen)
    torch.testing.assert_close(min_norm_weights(gram), _reference_min_norm_frank_wolfe(gram, 2000), rtol=0, atol=1e-8)


@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("kind", WELL + BADLY + ("duplicate",))
@pytest.mark.parametrize("k", SIZES)
def test_fairgrad_solver_equals_damped_newton(alpha, kind, k, gen):
    gram = _gram(kind, k, gen)
    weights = fairgrad_weights(gram, alpha)
    torch.testing.assert_close(weights, _reference_fairgrad(gram, alpha), rtol=1e-9, atol=0)
    torch.testing.assert_close(gram @ weights, weights ** (-1 / alpha), rtol=1e-9, atol=0)


@pytest.mark.parametrize("kind", WELL + BADLY + SINGULAR)
@pytest.mark.parametrize("k", SIZES)
def test_aligned_solver_equals_the_eigendecomposition(kind, k, gen):
    gram = _gram(kind, k, gen)
    expected = _reference_aligned(gram)
    # eigh's own error on a small eigenvalue is about eps * lambda_max: the badly conditioned
    # kinds agree to that accuracy only.
    tolerance = 1e-5 if kind in BADLY else 1e-11
    got = gram_solvers.aligned_weights(gram)
    assert float((got - expected).abs().max()) <= tolerance * max(float(expected.abs().max()), 1e-300)


def test_aligned_solver_of_a_zero_gram_is_zero():
    zero = torch.zeros(3, 3, dtype=torch.float64)
    assert torch.equal(gram_solvers.aligned_weights(zero), torch.zeros(3, dtype=torch.float64))


def test_solver_iterations_are_checked():
    for name in ("mgda", "fairgrad"):
        for bad in (0, -1, 2.5, True):
            with pytest.raises(ValueError, match=f"{name} iterations"):
                weighting.get(name, 3, iterations=bad)


# ---------------------------------------------------------------------------- fixed operation sequences


class RecordOps(TorchDispatchMode):
    """The ATen operations run (views left out): what a GPU would launch, in order."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _solve_ops(name: str, gram: torch.Tensor) -> list[str]:
    torch.manual_seed(0)
    with RecordOps() as record:
        weighting.get(name, gram.shape[0]).weights_from_gram(gram, torch.ones(gram.shape[0], dtype=torch.float64))
    return record.ops


# At K = 40 the loops these solvers replaced ran 514 (pcgrad), 2,943 (mgda), 1,780 (fairgrad) operations.
OP_BUDGET = {"pcgrad": 2 * 40 + 16, "mgda": 175, "fairgrad": 130, "aligned_mtl": 200}


@pytest.mark.parametrize("name", list(OP_BUDGET))
def test_solvers_run_the_same_bounded_operations_whatever_the_data(name, gen):
    """A fixed sequence (a CUDA graph replays it) of a bounded length (the launches per step)."""
    sequences = [_solve_ops(name, _gram(kind, 40, gen)) for kind in ("random", "scaled", "low_rank", "zero_task")]
    assert all(ops == sequences[0] for ops in sequences[1:])
    # No tensor made from Python data: on a GPU that is a copy from the host, which a graph cannot hold.
    assert not {"aten.lift_fresh.default", "aten._to_copy.default"} & set(sequences[0])
    assert len(sequences[0]) <= OP_BUDGET[name], f"{name}: {len(sequences[0])} operations"


# ---------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(OP_BUDGET))
def test_solvers_on_cuda_match_the_cpu_without_syncs_and_replay_in_a_graph(name, gen):
    gram = _gram("shared", 40, gen)
    strategy = weighting.get(name, 40)
    losses = torch.ones(40, dtype=torch.float64)
    torch.manual_seed(0)
    expected = strategy.weights_from_gram(gram, losses)
    device_gram, device_losses = gram.cuda(), losses.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.manual_seed(0)
        eager = strategy.weights_from_gram(device_gram, device_losses)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    if name != "pcgrad":  # pcgrad's orders come from the CUDA generator: a different draw
        torch.testing.assert_close(eager.cpu(), expected, rtol=1e-9, atol=1e-12)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        strategy.weights_from_gram(device_gram, device_losses)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = strategy.weights_from_gram(device_gram, device_losses)
    device_gram.mul_(2.0)  # new values in place: the replay recomputes
    graph.replay()
    torch.cuda.synchronize()
    if name != "pcgrad":
        expected = strategy.weights_from_gram(gram * 2.0, losses)
        torch.testing.assert_close(captured.cpu(), expected, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(captured).all()
