"""Task-weighting strategies against their defining properties, on small hand-made cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlue_fast.mtl import weighting
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
    for k in (3, 5):
        g = torch.randn(k, 4, generator=gen, dtype=torch.float64)
        gram = g @ g.T
        w = min_norm_weights(gram, iterations=2000)
        assert torch.all(w >= -1e-12) and abs(float(w.sum()) - 1) < 1e-9
        # KKT: (gram w)_k >= w^T gram w with equality on the support.
        value = w @ gram @ w
        slack = gram @ w - value
        assert float(slack.min()) > -1e-4 * float(torch.diagonal(gram).max())
        assert float((slack * (w > 1e-3)).abs().max()) < 1e-3 * float(torch.diagonal(gram).max())


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
