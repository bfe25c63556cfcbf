"""vjp / jvp of soft_rank and soft_sort against central finite differences,
adjointness, symmetry of the rank Jacobian, and gradients at ties.

Tolerance: central differences with relative step h = 1e-6 have truncation
error O(h^2 |f'''|) (zero for the piecewise-linear l2 operators away from a
change of the block structure, ~1e-9 for kl at eps = 0.1) and rounding error
O(1e-16 |f| / h) ~ 1e-9; 1e-6 normwise is two to three orders above both and
far below any real gradient error (wrong block, wrong sign, wrong softmax).
"""
from __future__ import annotations

import numpy as np
import pytest

import reference as R
from softrank import numpy as srn

FWD = {"rank": srn.soft_rank, "sort": srn.soft_sort}
VJP = {"rank": srn.soft_rank_vjp, "sort": srn.soft_sort_vjp}
JVP = {"rank": srn.soft_rank_jvp, "sort": srn.soft_sort_jvp}
FD_RTOL = 1e-6


def _separated(rng, n, min_gap=0.05):
    """Random values with every gap >= min_gap (no near-ties), shuffled."""
    x = np.cumsum(rng.uniform(min_gap, 1.0, size=n)) - 0.5 * n * 0.5
    return x[rng.permutation(n)]


@pytest.mark.parametrize("reg", ["l2", "kl"])
@pytest.mark.parametrize("op", ["rank", "sort"])
def test_vjp_jvp_vs_finite_differences(backend, op, reg):
    rng = np.random.default_rng({"rank": 1, "sort": 2}[op] * 10 + {"l2": 0, "kl": 1}[reg])
    checked_nontrivial = 0
    for n in (2, 5, 12, 30):
        for eps in (0.1, 1.0, 5.0):
            for d in ("ascending", "descending"):
                # sort is soft when gaps exceed 1/eps, rank when they are below eps
                x = _separated(rng, n) * (10.0 if op == "sort" else 1.0)
                kw = dict(regularization=reg, direction=d)
                J = R.jacobian_fd_batched(lambda X: FWD[op](X, eps, **kw), x)
                u = rng.normal(size=n)
                v = rng.normal(size=n)
                vjp = VJP[op](x, u, eps, **kw)
                jvp = JVP[op](x, v, eps, **kw)
                ctx = (op, reg, d, eps, x.tolist())
                assert R.rel_err(vjp, J.T @ u) <= FD_RTOL, ctx
                assert R.rel_err(jvp, J @ v) <= FD_RTOL, ctx
                # a non-trivial Jacobian (not the hard operator's) was exercised
                hard = np.zeros((n, n)) if op == "rank" else None
                if op == "rank" and np.abs(J - hard).max() > 1e-3:
                    checked_nontrivial += 1
                if op == "sort":
                    P = np.zeros((n, n))
                    key = x if d == "ascending" else -x
                    P[np.arange(n), np.argsort(key)] = 1.0
                    if np.abs(J - P).max() > 1e-3:
                        checked_nontrivial += 1
    assert checked_nontrivial >= 10


def test_adjointness_batched(backend):
    """<u, J v> == <J^T u, v> row by row on a batch, every op/reg/direction."""
    rng = np.random.default_rng(3)
    X = rng.normal(size=(50, 17)) * rng.uniform(0.1, 5, size=(50, 1))
    U = rng.normal(size=X.shape)
    V = rng.normal(size=X.shape)
    nontrivial = 0
    for op in ("rank", "sort"):
        for reg in ("l2", "kl"):
            for d in ("ascending", "descending"):
                for eps in (0.05, 0.5, 3.0):
                    kw = dict(regularization=reg, direction=d)
                    Jv = JVP[op](X, V, eps, **kw)
                    JTu = VJP[op](X, U, eps, **kw)
                    lhs = np.sum(U * Jv, axis=1)
                    rhs = np.sum(JTu * V, axis=1)
                    # rounding scale: |u| |v| times a bound on the Jacobian's entries
                    # (rank: r / eps <= n / eps; sort: block weights <= 1)
                    norm = np.linalg.norm
                    bound = X.shape[1] / eps if op == "rank" else 1.0
                    scale = norm(U, axis=1) * norm(V, axis=1) * bound
                    assert np.all(np.abs(lhs - rhs) <= 1e-13 * scale + 1e-300), (op, reg, d, eps)
                    nontrivial += int(np.sum(np.abs(lhs) > 1e-2))
    # not vacuous: most products are far from zero
    assert nontrivial > 0.5 * 2 * 2 * 2 * 3 * X.shape[0]


def test_rank_jacobian_is_symmetric(backend):
    rng = np.random.default_rng(4)
    X = rng.normal(size=(20, 9))
    G = rng.normal(size=X.shape)
    for reg in ("l2", "kl"):
        for d in ("ascending", "descending"):
            for eps in (0.1, 1.0):
                kw = dict(regularization=reg, direction=d)
                np.testing.assert_allclose(srn.soft_rank_vjp(X, G, eps, **kw), srn.soft_rank_jvp(X, G, eps, **kw),
                                           rtol=1e-12, atol=1e-12)


def test_rank_gradient_at_ties(backend):
    """Tied entries share a block; the rank is differentiable there and the
    gradient is finite and matches finite differences."""
    rng = np.random.default_rng(5)
    for x in (np.array([0.3, 0.3, 1.0, -0.5, 0.3]), np.array([2.0, 2.0]), np.array([1.0, 0.0, 1.0, 0.0, 0.5, 1.0])):
        n = len(x)
        for reg in ("l2", "kl"):
            for d in ("ascending", "descending"):
                for eps in (0.2, 1.0):
                    kw = dict(regularization=reg, direction=d)
                    J = R.jacobian_fd_batched(lambda X: srn.soft_rank(X, eps, **kw), x, h=1e-7)
                    u = rng.normal(size=n)
                    g = srn.soft_rank_vjp(x, u, eps, **kw)
                    assert np.all(np.isfinite(g))
                    assert R.rel_err(g, J.T @ u) <= FD_RTOL, (reg, d, eps, x)
                    np.testing.assert_allclose(srn.soft_rank_jvp(x, u, eps, **kw), J @ u, rtol=FD_RTOL, atol=FD_RTOL)
    # sort at ties: a well-defined (finite) gradient that sums like the cotangent
    x = np.array([1.0, 1.0, 1.0, 2.0])
    u = rng.normal(size=4)
    for reg in ("l2", "kl"):
        for eps in (0.0, 0.3, 10.0):
            g = srn.soft_sort_vjp(x, u, eps, regularization=reg)
            assert np.all(np.isfinite(g))
            # sum_i d out_j / d x_i = 1 for every output (sort(x + c) = sort(x) + c)
            np.testing.assert_allclose(g.sum(), u.sum(), rtol=1e-13)


def test_gradient_identities(backend):
    """Consequences of the invariants, on random batches:
    rank(x + c 1) = rank(x)  =>  J 1 = 0 and sum(vjp) = 0 ... (J^T u) . 1 = u . J 1 = 0;
    rows of rank sum to n(n+1)/2  =>  1^T J = 0, so vjp(1) = 0;
    sort(x + c 1) = sort(x) + c  =>  J 1 = 1."""
    rng = np.random.default_rng(6)
    X = rng.normal(size=(30, 11))
    U = rng.normal(size=X.shape)
    ones = np.ones_like(X)
    for reg in ("l2", "kl"):
        for d in ("ascending", "descending"):
            for eps in (0.05, 0.5, 5.0):
                kw = dict(regularization=reg, direction=d)
                np.testing.assert_allclose(srn.soft_rank_jvp(X, ones, eps, **kw), 0, atol=1e-12 / eps)
                np.testing.assert_allclose(srn.soft_rank_vjp(X, U, eps, **kw).sum(axis=1), 0, atol=1e-11 / eps)
                np.testing.assert_allclose(srn.soft_rank_vjp(X, ones, eps, **kw), 0, atol=1e-12 / eps)
                np.testing.assert_allclose(srn.soft_sort_jvp(X, ones, eps, **kw), 1, rtol=1e-13)
                np.testing.assert_allclose(srn.soft_sort_vjp(X, U, eps, **kw).sum(axis=1), U.sum(axis=1),
                                           rtol=1e-12, atol=1e-12)
