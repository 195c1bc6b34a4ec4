"""The small solves of the gradient-weighting strategies, on the Gram matrix of the task gradients.

Each function takes ``gram = G G^T`` (``[K, K]``, float64 in practice) and returns per-task weights
``[K]``. Each is a fixed sequence of tensor operations: no host reads, no Python control flow that
depends on values, and the same operations, in the same order, whatever the data. A CUDA graph can
capture them, and a step costs a bounded number of kernel launches: about ``2K`` for PCGrad and
between 120 and 200 for the others at ``K = 40``, where loops over tiny tensors used to launch
500 to 3,000. Iterative solves run a fixed number of rounds, sized so that the random, correlated,
badly scaled and rank-deficient Gram matrices of the tests converge with rounds to spare; where a
solve could stop early, the rounds left over leave the result as it is.
"""

from __future__ import annotations

import torch

__all__ = ["aligned_weights", "fairgrad_weights", "min_norm_weights", "pcgrad_weights"]


# ---------------------------------------------------------------------------- PCGrad


def pcgrad_weights(gram: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """PCGrad's combination weights: ``sum_i`` of task i's projected gradient ``sum_j C_ij g_j``.

    ``order [K, K-1]`` (int64) lists, for each task i, the other tasks in the order task i is
    projected against them. Every projection changes one coefficient: at step t, with ``p_t`` the
    t-th partner, ``s_t = min(0, (g_i - sum_{u<t} s_u g_{p_u}) . g_{p_t} / |g_{p_t}|^2)`` and task i's
    projected gradient is ``g_i - sum_t s_t g_{p_t}``. The K rows' recurrences run together, each
    step a batched dot product (``baddbmm``) and a clamp: ``2 (K - 1)`` operations in all, on the
    Gram matrix only.
    """
    k = gram.shape[0]
    if k == 1:
        return torch.ones(1, dtype=gram.dtype, device=gram.device)
    # scaled[a, b] = g_a . g_b / |g_b|^2 (a zero partner has zero dot products and is never used)
    scaled = gram / torch.diagonal(gram).clamp_min(1e-30)
    # Step-major layouts, so that every step reads contiguous slices:
    # first[t, i] = g_i . g_p_t / |g_p_t|^2 and cross[t, i, u] = g_p_u . g_p_t / |g_p_t|^2 for task
    # i's partners p (u >= t meets s_u = 0 below).
    first = scaled.gather(1, order).T.contiguous()
    cross = scaled[order[None, :, :], order.T[:, :, None]].contiguous()
    s = gram.new_zeros(k, 1, k - 1)  # s[i, 0, t]: s_t of task i
    dot = gram.new_empty(k, 1, 1)
    for t in range(k - 1):
        torch.baddbmm(first[t, :, None, None], s, cross[t, :, :, None], alpha=-1, out=dot)
        torch.clamp(dot, max=0, out=s[:, :, t : t + 1])
    weights = torch.ones(k, dtype=gram.dtype, device=gram.device)
    return weights.scatter_add_(0, order.flatten(), s.flatten().neg())


# ---------------------------------------------------------------------------- MGDA


def min_norm_weights(gram: torch.Tensor, iterations: int = 8, rounds: int = 4) -> torch.Tensor:
    """Weights ``a`` on the simplex minimising ``a^T gram a``: the min-norm point of the tasks'
    convex hull (Sener & Koltun 2018). ``gram [K, K]``; returns ``[K]`` in gram's dtype.

    The nonnegative program ``min_{a >= 0} a^T gram a / 2 - 1^T a`` has a multiple of ``a`` as its
    solution, so the simplex constraint can go. With ``n_k = |g_k|`` and ``b = n a`` it reads
    ``min_{b >= 0} f(b) = b^T Q b / 2 - c^T b``, ``Q = gram / (n n^T)`` (unit diagonal), ``c = 1 / n``
    (up to a scale); normalising ``b / n`` gives ``a``.

    1. ``iterations`` rounds of the primal-dual active-set method, three runs batched together: guess
       the free set F, solve ``(Q + r I)_FF b_F = c_F`` (``b = 0`` elsewhere), free every task with
       ``b_k > 0`` or a negative multiplier ``(Q b - c)_k``. The runs use the ridges ``r = 1e-13``
       (exact for a nonsingular Gram matrix, in at most 6 rounds in the tests), ``1e-1`` down to
       ``1e-13`` (for badly conditioned ones, where the first can cycle) and ``1e-2``.
    2. From the best point found, ``rounds`` rounds of Wolfe's method, which cannot cycle: free the
       support and the task with the most negative multiplier, solve, and step towards the solution
       until a weight reaches 0 (rank-deficient Gram matrices: more tasks than gradient dimensions).
    """
    k = gram.shape[0]
    dtype, device = gram.dtype, gram.device
    if k == 1:
        return torch.ones(1, dtype=dtype, device=device)
    diag = torch.diagonal(gram)
    inv_norm = diag.clamp_min(diag.amax() * 1e-24 + 1e-300).rsqrt()  # a zero task: huge, finite
    q = gram * (inv_norm[:, None] * inv_norm[None, :])
    c = inv_norm / inv_norm.amax()
    eye = torch.eye(k, dtype=dtype, device=device)
    # [iterations, 3] ridges, made on the device (a tensor from Python data is a copy from the host).
    smallest = torch.full((iterations,), 1e-13, dtype=dtype, device=device)
    decreasing = torch.logspace(-1, -13, iterations, dtype=dtype, device=device)
    ridges = torch.stack((smallest, decreasing, smallest * 1e11), 1)
    shifted = torch.addcmul(q, ridges[:, :, None, None], eye)  # [iterations, 3, K, K]
    free = torch.ones(3, k, dtype=torch.bool, device=device)
    points = []
    for i in range(iterations):
        system = torch.where(free[:, :, None] & free[:, None, :], shifted[i], eye)
        b = torch.linalg.solve_ex(system, free * c)[0]  # [3, K]; _ex: no host-side error check
        points.append(b)
        # Free where b_k > 0 (on F) or the multiplier (Q b - c)_k < 0 (off F, where b_k = 0).
        free = torch.gt(b + c, torch.matmul(shifted[i], b[:, :, None])[..., 0])
    points = torch.cat(points).clamp_min_(0)
    points = points / (points @ c)[:, None]  # c^T b = 1: b^T Q b is a^T gram a of the normalised a
    value = ((points @ q) * points).sum(1) * ridges.flatten().mul(1e-6).add_(1)  # ties: smaller ridge
    x = points.index_select(0, value.nan_to_num(float("inf")).argmin().reshape(1))[0]
    x = x / (x @ q @ x).clamp_min(1e-30)  # the multiple with the smallest f (0 in the hull: any)
    exact = shifted[0, 0]
    for _ in range(rounds):
        entering = torch.addmv(c, exact, x, beta=-1).argmin().reshape(1)  # most negative multiplier
        free = (x > 0).index_fill_(0, entering, True)
        y = torch.linalg.solve_ex(torch.where(free[:, None] & free[None, :], exact, eye), free * c)[0]
        # The longest step towards y keeping x >= 0: 1 / (1 + max_k -y_k / x_k), at most 1.
        step = torch.rsub((y / x.clamp_min(1e-300)).amin().clamp_max(0), 1).reciprocal()
        x = torch.lerp(x, y, step).clamp_min_(0)
    weights = x * inv_norm
    return weights / weights.sum()


# ---------------------------------------------------------------------------- FairGrad


def fairgrad_weights(gram: torch.Tensor, alpha: float = 1.0, iterations: int = 12) -> torch.Tensor:
    """Positive ``w [K]`` solving ``gram @ w = w ** (-1 / alpha)`` (FairGrad).

    The system is the stationarity condition of the strictly convex
    ``phi(w) = w^T gram w / 2 - sum_k f(w_k)`` with ``f' = w^(-1/alpha)``. Newton steps are taken
    in ``log w`` (``w <- w exp(H^-1 r / w)``, ``r = w^(-1/alpha) - gram w``, ``H`` the Jacobian of
    ``-r``, each component's factor within ``e^-3`` and ``e^3``), which
    keeps ``w`` positive and lets components that must grow by orders of magnitude (nearly
    dependent gradients) do so in a few steps; near the solution they are Newton steps. ``gram`` is
    scaled to unit mean diagonal first (the solution scales as ``c^(-alpha/(1+alpha))`` when gram
    is scaled by c), and the start is the diagonal problem's solution, moved along its ray to the
    best multiple. ``iterations`` steps (the tests' hardest cases need 10).
    """
    k = gram.shape[0]
    gram = gram.double()
    scale = torch.diagonal(gram).mean().clamp_min(1e-30)
    a = gram / scale
    p = 1.0 / alpha
    eye = torch.eye(k, dtype=a.dtype, device=a.device)
    w = torch.diagonal(a).clamp_min(1e-12).pow(-1 / (1 + p))
    # phi along the ray c w is smallest where c^(1+p) w^T a w = sum w^(1-p). Bounded: with a zero
    # gradient there is no solution (its weight grows without end), and w stays finite.
    w = w * (w.pow(1 - p).sum() / (w @ a @ w).clamp_min(1e-300)).clamp(1e-12, 1e12).pow(1 / (1 + p))
    for _ in range(iterations):
        v = w.reciprocal() if p == 1.0 else w.pow(-p)
        residual = torch.addmv(v, a, w, alpha=-1)  # w^-p - a w
        curvature = v / w if p == 1.0 else (v / w).mul_(p)  # d(w^-p)/dw = -p w^(-p-1)
        step = torch.linalg.solve_ex(torch.addcmul(a, eye, curvature), residual)[0]
        w = w * step.div_(w).clamp_(-3.0, 3.0).exp_()
    return w * scale ** (-alpha / (1 + alpha))


# ---------------------------------------------------------------------------- Aligned-MTL


def _sign_direction(x: torch.Tensor, iterations: int) -> torch.Tensor:
    """A positive multiple of the matrix sign of ``x`` (no eigenvalue at 0): Newton's
    ``x <- (mu x + (mu x)^-1) / 2`` with ``mu^2 = |x^-1| / |x|`` (Frobenius), without the scalar
    factors, which only rescale every later iterate."""
    for _ in range(iterations):
        inverse = torch.linalg.inv_ex(x)[0]
        x = torch.addcmul(x, torch.linalg.vector_norm(x) / torch.linalg.vector_norm(inverse), inverse)
    return x


def _inverse_sqrt(a: torch.Tensor, iterations: int) -> torch.Tensor:
    """``a^(-1/2)`` of a symmetric positive definite ``a``: Denman-Beavers
    (``Y <- (mu Y + (mu Z)^-1) / 2``, ``Z <- (mu Z + (mu Y)^-1) / 2`` from ``Y = a``, ``Z = I``,
    ``mu^4 = |Y^-1| |Z^-1| / (|Y| |Z|)``), without the scalar factors, which scale ``Y`` and ``Z``
    alike: ``Y Z = beta^2 I`` at the end fixes the one left."""
    k = a.shape[0]
    half = torch.full((2,), 0.5, dtype=a.dtype, device=a.device)
    exponents = torch.cat((half, -half))  # of |Y|, |Z|, |Y^-1|, |Z^-1|
    yz = torch.stack((a, torch.eye(k, dtype=a.dtype, device=a.device)))
    for _ in range(iterations):
        inverse = torch.linalg.inv_ex(yz)[0]
        factor = torch.linalg.matrix_norm(torch.cat((yz, inverse))).pow(exponents).prod()
        yz = torch.addcmul(yz, factor, inverse.flip(0))
    y, z = yz
    return z * (k / (y * z.T).sum()).sqrt()  # (y * z.T).sum() = tr(Y Z)


def aligned_weights(
    gram: torch.Tensor, sign_iterations: int = 10, sqrt_iterations: int = 10, squarings: int = 16
) -> torch.Tensor:
    """Aligned-MTL's weights ``sqrt(lambda_min) V diag(lambda^-1/2) V^T 1`` over the eigenpairs of
    ``gram = V diag(lambda) V^T`` with ``lambda > lambda_max K eps``, without an eigendecomposition
    (``torch.linalg.eigh`` reads its convergence flag back to the host).

    With ``g = gram / |gram|_F``: the projector ``P`` on the kept eigenvectors is ``(I + sign(g - tau I))
    / 2`` (Newton's sign iteration); ``W = (P g P + I - P)^(-1/2) P = V_kept diag(lambda^-1/2) V_kept^T``
    (Denman-Beavers); ``lambda_min^(-1/2)`` is W's largest eigenvalue, read off ``W^(2^squarings)``
    (repeated squaring). Matches ``eigh`` to about 1e-14 on well-conditioned Gram matrices; on badly
    conditioned ones the two agree to ``eigh``'s own accuracy (about ``cond * eps``).
    """
    k = gram.shape[0]
    dtype, device = gram.dtype, gram.device
    eye = torch.eye(k, dtype=dtype, device=device)
    g = gram / torch.linalg.vector_norm(gram).clamp_min(1e-300)  # lambda_max <= 1 <= sqrt(K) lambda_max
    sign = _sign_direction(g - (k * torch.finfo(dtype).eps) * eye, sign_iterations)
    sign = sign * (k / (sign * sign.T).sum()).sqrt()  # sign @ sign = I
    projector = (eye + (sign + sign.T) * 0.5) * 0.5
    inv_sqrt = _inverse_sqrt(projector @ g @ projector + (eye - projector), sqrt_iterations) @ projector
    inv_sqrt = (inv_sqrt + inv_sqrt.T) * 0.5
    power = inv_sqrt / torch.diagonal(inv_sqrt).sum().clamp_min(1e-300)
    for i in range(squarings):
        power = power @ power
        if i % 4 == 3:  # renormalise before the entries underflow
            power = power / torch.diagonal(power).sum().clamp_min(1e-300)
    top = (inv_sqrt * power).sum() / torch.diagonal(power).sum().clamp_min(1e-300)  # lambda_min^(-1/2)
    return inv_sqrt.sum(1) / top.clamp_min(1e-300)
