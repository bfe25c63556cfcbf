"""softrank.numpy's operators on the permutahedron, once per engine (``backend`` fixture).

Against independent references (tests/reference.py, scipy, numpy):

- ``permutahedron_projection``: brute force (n <= 6, any w), the polytope's
  properties (l2 rows sum to sum(w); the output lies in P(w) by Rado's
  theorem; a point of P(w) is its own projection), and the soft rank / soft
  sort it generalises (reference.py's sign conventions), to 1e-12;
- ``soft_topk_mask``: brute force, [0, 1] values, row sums k, the hard
  indicator (ties sharing) at and near eps = 0, k / n at eps = inf;
- ``spearman``: scipy.stats.spearmanr row by row in the limit (ties in both
  arguments), NaN for constant rows;
- ``soft_quantile`` / ``soft_median``: np.quantile(method="linear") /
  np.median in the limit, with np.quantile's output layout;
- ``isotonic_regression``: the weighted min-max formula (l2) and
  ``reference.isotonic_kl_ref`` (kl);
- every ``*_with_vjp`` pullback against central finite differences of the
  forward pass (float64), the projection's grad_w for a shared (n,) w and
  for a w of z's shape;
- bad arguments raise with a message naming the argument.

The agreement with google-research/fast-soft-sort (its ``Projection`` for
arbitrary w and its ``isotonic_kl``) runs when SOFTRANK_FAST_SOFT_SORT points
at a directory holding the ``fast_soft_sort`` package (as in
test_fast_soft_sort_agreement.py); ``-s`` prints the largest errors.
"""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

import reference as R
from frameworks import fast_soft_sort, needs_fast_soft_sort
from softrank import numpy as srn

REGS = ("l2", "kl")


def _rho(n):
    return np.arange(n, 0, -1, dtype=np.float64)


def _raises_naming(fn, name, types=(ValueError, TypeError)):
    with pytest.raises(types) as info:
        fn()
    msg = str(info.value)
    assert re.search(rf"\b{re.escape(name)}\b", msg), f"message does not name {name!r}: {msg!r}"
    return info.value


def _fd_grad(f, x, g, h=1e-6):
    """Central finite-difference gradient of ``sum(g * f(x))`` in x (any shape)."""
    x = np.asarray(x, dtype=np.float64)
    flat = x.ravel()
    grad = np.empty_like(flat)
    for j in range(flat.size):
        step = h * max(1.0, abs(flat[j]))
        xp = flat.copy()
        xm = flat.copy()
        xp[j] += step
        xm[j] -= step
        fp = np.sum(g * f(xp.reshape(x.shape)))
        fm = np.sum(g * f(xm.reshape(x.shape)))
        grad[j] = (fp - fm) / (xp[j] - xm[j])
    return grad.reshape(x.shape)


def _assert_grad(got, expected, tol=1e-6):
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == np.shape(expected)
    scale = max(1.0, float(np.max(np.abs(expected))))
    assert float(np.max(np.abs(got - expected))) <= tol * scale, (got, expected)


# ---------------------------------------------------------------------------
# permutahedron_projection


def _projection_brute_cases():
    rng = np.random.default_rng(20)
    cases = []
    for n in range(1, 7):
        for ties in (False, True):
            if ties:
                z = rng.integers(-2, 3, size=n).astype(np.float64)
                w = rng.integers(-2, 3, size=n).astype(np.float64)
            else:
                z = rng.normal(size=n) * 2.0
                w = rng.normal(size=n) * 2.0
            cases.append((z, w))
    cases.append((rng.normal(size=5), None))  # default w = rho = (n, ..., 1)
    return cases


@pytest.fixture(scope="module")
def projection_brute():
    """Brute-force projections of the cases, computed once for every engine."""
    cases = _projection_brute_cases()
    refs = {reg: [R.project_bruteforce(z, _rho(len(z)) if w is None else w, reg)
                  for z, w in cases] for reg in REGS}
    return cases, refs


@pytest.mark.parametrize("regularization", REGS)
def test_projection_matches_bruteforce(backend, projection_brute, regularization):
    cases, refs = projection_brute
    for (z, w), ref in zip(cases, refs[regularization]):
        got = srn.permutahedron_projection(z, w, regularization=regularization)
        assert R.rel_err(got, ref) <= 1e-9, (z, w, got, ref)


@pytest.mark.parametrize("regularization", REGS)
def test_projection_shared_w_axis_and_batch(backend, regularization):
    """A (n,) w is used for every row; axis picks the dimension; rows are independent."""
    rng = np.random.default_rng(21)
    z = rng.normal(size=(3, 5, 4))
    w = rng.normal(size=5)
    got = srn.permutahedron_projection(z, w, regularization=regularization, axis=1)
    assert got.shape == z.shape and got.dtype == z.dtype
    for a in range(3):
        for c in range(4):
            ref = R.project_minmax(z[a, :, c], w, regularization)
            np.testing.assert_allclose(got[a, :, c], ref, rtol=1e-12, atol=1e-12)
    # w of z's shape: one w per row
    wf = rng.normal(size=z.shape)
    got = srn.permutahedron_projection(z, wf, regularization=regularization, axis=0)
    for b in range(5):
        for c in range(4):
            ref = R.project_minmax(z[:, b, c], wf[:, b, c], regularization)
            np.testing.assert_allclose(got[:, b, c], ref, rtol=1e-12, atol=1e-12)
    # float32 in, float32 out
    got32 = srn.permutahedron_projection(z.astype(np.float32), w.astype(np.float32),
                                         regularization=regularization, axis=1)
    assert got32.dtype == np.float32
    np.testing.assert_allclose(got32, srn.permutahedron_projection(
        z, w, regularization=regularization, axis=1), rtol=1e-5, atol=1e-5)


def _random_point_of_permutahedron(rng, w):
    """A convex combination of a few random permutations of w."""
    k = 4
    lam = rng.dirichlet(np.ones(k))
    return sum(l * rng.permutation(w) for l in lam)


def test_projection_properties_l2(backend):
    rng = np.random.default_rng(22)
    for n in (1, 2, 7, 30):
        for _ in range(5):
            z = rng.normal(size=n) * 5.0
            w = rng.normal(size=n) * 3.0
            out = srn.permutahedron_projection(z, w)
            assert abs(out.sum() - w.sum()) <= 1e-12 * max(1.0, np.abs(w).sum())
            assert R._in_permutahedron(out, w, 1e-10 * max(1.0, np.abs(w).max()) * n)
            # a point of P(w) is its own projection
            mu = _random_point_of_permutahedron(rng, w)
            np.testing.assert_allclose(srn.permutahedron_projection(mu, w), mu,
                                       rtol=1e-12, atol=1e-12 * np.abs(w).max())


def test_projection_properties_kl(backend):
    rng = np.random.default_rng(23)
    for n in (1, 2, 7, 30):
        for _ in range(5):
            z = rng.normal(size=n) * 3.0
            w = rng.normal(size=n)
            mu = np.exp(srn.permutahedron_projection(z, w, regularization="kl"))
            ew = np.exp(w)
            assert abs(mu.sum() - ew.sum()) <= 1e-12 * ew.sum()
            assert R._in_permutahedron(mu, ew, 1e-10 * ew.max() * n)
            # e^z already in P(e^w): the projection returns z
            point = _random_point_of_permutahedron(rng, ew)
            np.testing.assert_allclose(
                srn.permutahedron_projection(np.log(point), w, regularization="kl"),
                np.log(point), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("regularization", REGS)
def test_projection_generalises_soft_rank_and_sort(backend, regularization):
    """reference.py's conventions: soft_rank = P(s x / eps, rho) (s = +1 ascending),
    kl: exp(P_E(s x / eps, log rho)); soft_sort = t P(rho / eps, t x) (t = +1 descending)."""
    rng = np.random.default_rng(24)
    x = rng.normal(size=(6, 11))
    x[0, :4] = 0.5  # ties
    rho = _rho(11)
    for eps in (0.1, 1.0, 7.0):
        for direction, s in (("ascending", 1.0), ("descending", -1.0)):
            rank = srn.soft_rank(x, eps, regularization=regularization, direction=direction)
            if regularization == "l2":
                proj = srn.permutahedron_projection(s * x / eps, rho)
            else:
                proj = np.exp(srn.permutahedron_projection(s * x / eps, np.log(rho),
                                                           regularization="kl"))
            np.testing.assert_allclose(rank, proj, rtol=1e-12, atol=1e-12)
            t = -s  # descending sort = +P(rho / eps, x)
            srt = srn.soft_sort(x, eps, regularization=regularization, direction=direction)
            proj = t * srn.permutahedron_projection(np.broadcast_to(rho / eps, x.shape), t * x,
                                                    regularization=regularization)
            np.testing.assert_allclose(srt, proj, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("regularization", REGS)
def test_projection_nonfinite_rows(backend, regularization):
    z = np.array([[1.0, 2.0, 0.5], [1.0, np.nan, 0.5], [np.inf, 0.0, 0.0]])
    out = srn.permutahedron_projection(z, np.array([1.0, 0.0, -1.0]),
                                       regularization=regularization)
    assert np.all(np.isfinite(out[0])) and np.all(np.isnan(out[1:]))


@pytest.mark.parametrize("regularization", REGS)
@pytest.mark.parametrize("w_kind", ["none", "shared", "full"])
def test_projection_vjp_matches_fd(backend, regularization, w_kind):
    rng = np.random.default_rng(25)
    z = rng.normal(size=(3, 6)) * 2.0
    w = {"none": None, "shared": rng.normal(size=6) * 2.0,
         "full": rng.normal(size=(3, 6)) * 2.0}[w_kind]
    g = rng.normal(size=z.shape)
    value, vjp = srn.permutahedron_projection_with_vjp(z, w, regularization=regularization)
    np.testing.assert_array_equal(
        value, srn.permutahedron_projection(z, w, regularization=regularization))
    grad_z, grad_w = vjp(g)
    _assert_grad(grad_z, _fd_grad(
        lambda a: srn.permutahedron_projection(a, w, regularization=regularization), z, g))
    if w is None:
        assert grad_w is None
        return
    assert grad_w.shape == w.shape  # summed over rows for a shared w
    _assert_grad(grad_w, _fd_grad(
        lambda b: srn.permutahedron_projection(z, b, regularization=regularization), w, g))


def test_projection_vjp_axis(backend):
    rng = np.random.default_rng(26)
    z = rng.normal(size=(4, 2, 3))
    w = rng.normal(size=4)
    g = rng.normal(size=z.shape)
    for regularization in REGS:
        _, vjp = srn.permutahedron_projection_with_vjp(z, w, regularization=regularization,
                                                       axis=0)
        grad_z, grad_w = vjp(g)
        f = lambda a, b: srn.permutahedron_projection(a, b, regularization=regularization,  # noqa: E731
                                                      axis=0)
        _assert_grad(grad_z, _fd_grad(lambda a: f(a, w), z, g))
        _assert_grad(grad_w, _fd_grad(lambda b: f(z, b), w, g))


def test_projection_bad_input(backend):
    z = np.zeros((2, 3))
    _raises_naming(lambda: srn.permutahedron_projection(z, np.zeros(4)), "w")
    _raises_naming(lambda: srn.permutahedron_projection(z, np.zeros((3, 3))), "w")
    _raises_naming(lambda: srn.permutahedron_projection(z, regularization="l1"), "regularization")
    _raises_naming(lambda: srn.permutahedron_projection(np.float64(1.0)), "z")
    _raises_naming(lambda: srn.permutahedron_projection(z, axis=2), "axis")
    _, vjp = srn.permutahedron_projection_with_vjp(z, np.zeros(3))
    _raises_naming(lambda: vjp(np.zeros((2, 4))), "cotangent")


# ---------------------------------------------------------------------------
# soft_topk_mask


def _hard_topk(x, k):
    """Indicator of the k largest with ties at the boundary sharing what is left."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if k == 0:
        return np.zeros(n)
    kth = np.sort(x)[::-1][k - 1]
    above = x > kth
    tied = x == kth
    out = above.astype(np.float64)
    out[tied] = (k - above.sum()) / tied.sum()
    return out


def _topk_brute_cases():
    rng = np.random.default_rng(30)
    return [(rng.normal(size=n), k, float(rng.choice([0.2, 1.0, 3.0])))
            for n in range(1, 7) for k in range(0, n + 1)]


@pytest.fixture(scope="module")
def topk_brute():
    """The masks by brute force (kl: the zeros of e^w as e^-40), computed once."""
    cases = _topk_brute_cases()
    refs = {"l2": [], "kl": []}
    for x, k, eps in cases:
        ones = (np.arange(len(x)) < k).astype(np.float64)
        refs["l2"].append(R.project_bruteforce(x / eps, ones, "l2"))
        with np.errstate(over="ignore"):  # the reference's line search tries long steps
            refs["kl"].append(None if k == 0 else np.exp(
                R.project_bruteforce(x / eps, np.where(ones > 0, 0.0, -40.0), "kl")))
    return cases, refs


@pytest.mark.parametrize("regularization", REGS)
def test_topk_matches_bruteforce(backend, topk_brute, regularization):
    cases, refs = topk_brute
    for (x, k, eps), ref in zip(cases, refs[regularization]):
        if ref is None:  # kl needs k >= 1
            continue
        got = srn.soft_topk_mask(x, k, eps, regularization=regularization)
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("regularization", REGS)
def test_topk_values_sums_and_limits(backend, regularization):
    rng = np.random.default_rng(31)
    n = 9
    x = rng.normal(size=(5, n))
    x[0, :4] = 1.25  # ties, at the boundary for several k
    x[1] = 0.0  # a constant row
    for k in range(1 if regularization == "kl" else 0, n + 1):
        for eps in (0.01, 0.5, 3.0):
            m = srn.soft_topk_mask(x, k, eps, regularization=regularization)
            assert np.all(m >= 0) and np.all(m <= 1 + 1e-12)
            np.testing.assert_allclose(m.sum(axis=1), k, rtol=1e-12, atol=1e-12)
        hard = np.array([_hard_topk(row, k) for row in x])
        np.testing.assert_allclose(srn.soft_topk_mask(x, k, 0.0, regularization=regularization),
                                   hard, rtol=1e-14, atol=1e-14)
        # the limit eps -> 0 (the values are at least 1e-3 apart except the exact ties)
        np.testing.assert_allclose(srn.soft_topk_mask(x, k, 1e-9, regularization=regularization),
                                   hard, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(
            srn.soft_topk_mask(x, k, np.inf, regularization=regularization),
            np.full(x.shape, k / n), rtol=1e-14)
    ones = srn.soft_topk_mask(x, n, 0.4, regularization=regularization)
    np.testing.assert_allclose(ones, np.ones_like(x), rtol=1e-14)
    if regularization == "l2":
        np.testing.assert_array_equal(srn.soft_topk_mask(x, 0, 0.4), np.zeros_like(x))


def test_topk_axis(backend):
    rng = np.random.default_rng(32)
    x = rng.normal(size=(4, 6, 3))
    for regularization in REGS:
        got = srn.soft_topk_mask(x, 2, 0.3, regularization=regularization, axis=1)
        ref = np.moveaxis(srn.soft_topk_mask(np.moveaxis(x, 1, -1), 2, 0.3,
                                             regularization=regularization), -1, 1)
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_allclose(got.sum(axis=1), 2.0, rtol=1e-12)


@pytest.mark.parametrize("regularization", REGS)
@pytest.mark.parametrize("k", [1, 3])
def test_topk_vjp_matches_fd(backend, regularization, k):
    rng = np.random.default_rng(33)
    x = rng.normal(size=(3, 6))
    g = rng.normal(size=x.shape)
    for eps in (0.3, 2.0):
        value, vjp = srn.soft_topk_mask_with_vjp(x, k, eps, regularization=regularization)
        np.testing.assert_array_equal(
            value, srn.soft_topk_mask(x, k, eps, regularization=regularization))
        expected = _fd_grad(
            lambda a: srn.soft_topk_mask(a, k, eps, regularization=regularization), x, g)
        _assert_grad(vjp(g), expected)


@pytest.mark.parametrize("regularization", REGS)
def test_gradients_where_ties_of_x_meet_ties_of_w(backend, regularization):
    """z tied where w is tied too (a ReLU's zeros inside the top-k mask's
    zeros, any ties at k = n): P is locally constant in those entries, so the
    gradient is that of finite differences (0 for l2), not the pooled block's
    (I - 11^T / m) / eps, which PAV pooling equal values gave."""
    g = np.array([0.0, 1.0, 0.0, 0.0, 0.0])
    cases = [  # (x, k, eps)
        (np.array([3.0, 0.0, 0.0, 0.0, -2.0]), 1, 0.5),
        (np.array([3.0, 2.0, 0.0, 0.0, 0.0]), 2, 0.5),
        (np.array([1.0, 1.0, 2.0, 2.0, 2.0]), 5, 1.0),
        (np.array([1.0, 1.0, 2.0, -1.0, -1.0]), 5, 0.3),
    ]
    if regularization == "l2":  # (kl needs k >= 1)
        cases.append((np.array([0.0, 0.0, 1.0, 0.0, 0.0]), 0, 1.0))
    for x, k, eps in cases:
        mask, vjp = srn.soft_topk_mask_with_vjp(x, k, eps, regularization=regularization)
        f = lambda a, k=k, eps=eps: srn.soft_topk_mask(a, k, eps, regularization=regularization)  # noqa: E731
        for cotangent in (g, np.arange(5.0) - 1.5):
            expected = _fd_grad(f, x, cotangent)
            if regularization == "l2":
                np.testing.assert_array_equal(expected, np.zeros(5))
            _assert_grad(vjp(cotangent), expected, tol=1e-8)
    z, w = np.array([2.0, 2.0, 0.0, 5.0]), np.array([1.0, 1.0, 0.0, 3.0])
    out, vjp = srn.permutahedron_projection_with_vjp(z, w, regularization=regularization)
    for cotangent in np.eye(4):
        grad_z, _ = vjp(cotangent)
        expected = _fd_grad(
            lambda a: srn.permutahedron_projection(a, w, regularization=regularization), z,
            cotangent)
        np.testing.assert_array_equal(expected, np.zeros(4))  # out = w at these z
        _assert_grad(grad_z, expected, tol=1e-8)


@pytest.mark.parametrize("regularization", REGS)
def test_topk_vjp_zero_in_the_limits(backend, regularization):
    """eps = 0 and eps = inf: the mask is locally constant in x, so its gradient is 0."""
    x = np.array([[0.3, -1.0, 2.0, 0.5], [1.0, 1.0, 0.0, -2.0]])
    for eps in (0.0, np.inf):
        _, vjp = srn.soft_topk_mask_with_vjp(x, 2, eps, regularization=regularization)
        np.testing.assert_array_equal(vjp(np.ones_like(x)), np.zeros_like(x))


@pytest.mark.parametrize("regularization", REGS)
def test_topk_vjp_where_x_over_eps_overflows(backend, regularization):
    """|x| / eps beyond the float range (x = 1e10, eps = 1e-300; eps subnormal)
    with finite masks: the gradient is the closed form, finite where it is.
    Distinct values: singleton blocks, gradient exactly 0. A tie at the
    boundary pools one block {0, 1} of mask 1/2 each: d mask_i / d x_j =
    m_i (delta_ij - 1/2) / eps there (l2: m_i = 1; kl: the factor exp(out) =
    1/2 of d exp(out)), 0 elsewhere."""
    distinct = np.array([[1e10, 1.0, -1e10, 0.0], [3e9, 1e9, 2e9, 5.0]])
    tied = np.array([[1e10, 1e10, -1e10, 0.0]])
    cot = np.array([[1.0, -2.0, 0.5, 3.0]])
    factor = 1.0 if regularization == "l2" else 0.5
    for eps in (1e-300, 1e-310):
        mask, vjp = srn.soft_topk_mask_with_vjp(distinct, 2, eps, regularization=regularization)
        np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 0, 1, 0]])
        np.testing.assert_array_equal(vjp(np.ones_like(distinct) + distinct * 0 + [[1, 2, 3, 4]]),
                                      np.zeros_like(distinct))
        mask, vjp = srn.soft_topk_mask_with_vjp(tied, 1, eps, regularization=regularization)
        np.testing.assert_array_equal(mask, [[0.5, 0.5, 0, 0]])
        jac = np.zeros((4, 4))
        jac[:2, :2] = factor * (np.eye(2) - 0.5)
        with np.errstate(over="ignore"):
            expected = (cot @ jac) / eps  # inf where the true gradient overflows (eps = 1e-310)
        np.testing.assert_allclose(vjp(cot), expected, rtol=1e-15)


@pytest.mark.parametrize("regularization", REGS)
def test_topk_vjp_in_float32_where_one_over_eps_overflows_it(backend, regularization):
    """float32, 1 / eps beyond its range (eps 1e-40, 1e-300): distinct values
    (singleton blocks) give exactly 0, not 0 * inf = NaN; a tie within range
    (eps 1e-30) gives the closed form m_i (delta_ij - 1/2) / eps; beyond it the
    tie's derivative saturates finite (no NaN, no sign error)."""
    distinct = np.array([[3.0, 1.0, 2.0, 5.0]], np.float32)
    tied = np.array([[3.0, 3.0, -1.0, 0.0]], np.float32)
    cot = np.array([[1.0, -2.0, 0.5, 3.0]], np.float32)
    factor = 1.0 if regularization == "l2" else 0.5
    jac = np.zeros((4, 4))
    jac[:2, :2] = factor * (np.eye(2) - 0.5)
    for eps in (1e-40, 1e-300):
        _, vjp = srn.soft_topk_mask_with_vjp(distinct, 2, eps, regularization=regularization)
        np.testing.assert_array_equal(vjp(cot), np.zeros((1, 4), np.float32))
        _, vjp = srn.soft_topk_mask_with_vjp(tied, 1, eps, regularization=regularization)
        got = vjp(cot)
        assert np.all(np.isfinite(got)) and np.all(np.sign(got) == np.sign(cot @ jac)), got
    _, vjp = srn.soft_topk_mask_with_vjp(tied, 1, 1e-30, regularization=regularization)
    np.testing.assert_allclose(vjp(cot), (cot @ jac) / 1e-30, rtol=1e-6)


@pytest.mark.parametrize("regularization", REGS)
def test_vjp_nan_rows(backend, regularization):
    """A row whose output is NaN gets NaN gradients; the other rows are unaffected."""
    z = np.array([[0.3, -1.0, 2.0], [1.0, np.nan, 0.0]])
    w = np.array([1.0, 0.0, -1.0])
    out, vjp = srn.permutahedron_projection_with_vjp(z, w, regularization=regularization)
    grad_z, grad_w = vjp(np.ones_like(z))
    assert np.all(np.isnan(out[1])) and np.all(np.isnan(grad_z[1]))
    assert np.all(np.isfinite(grad_z[0])) and np.all(np.isnan(grad_w))  # summed over rows
    _, vjp0 = srn.permutahedron_projection_with_vjp(z[:1], w, regularization=regularization)
    np.testing.assert_array_equal(grad_z[0], vjp0(np.ones((1, 3)))[0][0])
    y = np.array([[0.3, -1.0, 2.0], [1.0, np.nan, 0.0]])
    out, vjp = srn.isotonic_regression_with_vjp(y, weights=np.ones_like(y),
                                                regularization=regularization)
    grad_y, grad_weights = vjp(np.ones_like(y))
    assert np.all(np.isnan(out[1])) and np.all(np.isnan(grad_y[1]))
    assert np.all(np.isnan(grad_weights[1]))
    assert np.all(np.isfinite(grad_y[0])) and np.all(np.isfinite(grad_weights[0]))


def _with_vjp_cases(rng):
    """(name, with_vjp(inputs) -> (value, pullback), inputs): every operator
    pullback, its inputs float64 arrays that the forward may view without copy
    (C-contiguous rows along the last axis, or a view of a larger array)."""
    big = rng.normal(size=(3, 12))
    for reg in REGS:
        kw = dict(regularization=reg)
        yield (f"projection-{reg}", lambda z, w, kw=kw: srn.permutahedron_projection_with_vjp(
            z, w, **kw), [rng.normal(size=(3, 5)), rng.normal(size=5)])
        yield (f"projection-rows-{reg}", lambda z, w, kw=kw: srn.permutahedron_projection_with_vjp(
            z, w, **kw), [big[:, ::2].copy(), big[:, 1::2]])
        yield (f"topk-{reg}", lambda x, kw=kw: srn.soft_topk_mask_with_vjp(x, 2, 0.5, **kw),
               [rng.normal(size=(3, 5))])
        yield (f"quantile-{reg}", lambda x, kw=kw: srn.soft_quantile_with_vjp(x, 0.3, 0.5, **kw),
               [rng.normal(size=(3, 5))])
        for increasing in (True, False):
            yield (f"isotonic-{reg}-{increasing}",
                   lambda y, w, kw=kw, inc=increasing: srn.isotonic_regression_with_vjp(
                       y, weights=w, increasing=inc, **kw),
                   [rng.normal(size=(3, 5)), rng.uniform(0.5, 2.0, size=(3, 5))])
        yield (f"isotonic-unweighted-{reg}",
               lambda y, kw=kw: srn.isotonic_regression_with_vjp(y, **kw),
               [rng.normal(size=(3, 5))])


def test_operator_pullbacks_ignore_later_writes_to_inputs_and_value(backend):
    """What a pullback reads (the inputs, for the kl block softmaxes and the l2
    weighted means; the output, for its NaN rows) is its own: writing to the
    inputs or to the returned value after the forward leaves every gradient
    as a fresh forward on the original inputs gives, bit for bit."""
    rng = np.random.default_rng(41)
    for name, with_vjp, inputs in _with_vjp_cases(rng):
        originals = [a.copy() for a in inputs]
        value, vjp = with_vjp(*inputs)
        cot = rng.normal(size=np.shape(value))
        expected = with_vjp(*[a.copy() for a in originals])[1](cot)
        for a in inputs:
            a[...] = rng.normal(size=a.shape) * 50  # in place (for a view: its base too)
        value[...] = np.nan
        got = vjp(cot)
        for g, e in zip(got if isinstance(got, tuple) else (got,),
                        expected if isinstance(expected, tuple) else (expected,)):
            if e is None:
                assert g is None, name
            else:
                np.testing.assert_array_equal(g, e, err_msg=name)


def test_topk_bad_k(backend):
    x = np.zeros((2, 4))
    err = _raises_naming(lambda: srn.soft_topk_mask(x, 0, regularization="kl"), "k", ValueError)
    assert isinstance(err, ValueError)
    for k in (-1, 5):
        for regularization in REGS:
            err = _raises_naming(lambda: srn.soft_topk_mask(x, k, regularization=regularization),
                                 "k")
            assert isinstance(err, ValueError)
    for k in (1.5, "2", None, True):
        _raises_naming(lambda: srn.soft_topk_mask(x, k), "k")
    _raises_naming(lambda: srn.soft_topk_mask(x, 1, -1.0), "eps")
    _raises_naming(lambda: srn.soft_topk_mask(x, 1, regularization="L2"), "regularization")


# ---------------------------------------------------------------------------
# spearman


def _spearman_rows(pred, target):
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on constant input
        return np.array([spearmanr(p, t).statistic for p, t in zip(pred, target)])


@pytest.mark.parametrize("regularization", REGS)
def test_spearman_limit_matches_scipy(backend, regularization):
    rng = np.random.default_rng(40)
    n = 12
    pred = rng.normal(size=(8, n))
    target = rng.normal(size=(8, n))
    pred[:3] = rng.integers(-2, 3, size=(3, n))  # ties in pred
    target[2:5] = rng.integers(-2, 3, size=(3, n))  # ties in target
    ref = _spearman_rows(pred, target)
    for eps in (0.0, 1e-9):
        got = srn.spearman(pred, target, eps, regularization=regularization)
        assert got.shape == (8,)
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)


def test_spearman_axis_removed(backend):
    rng = np.random.default_rng(41)
    pred = rng.normal(size=(3, 7, 4))
    target = rng.integers(0, 4, size=(3, 7, 4)).astype(np.float64)
    got = srn.spearman(pred, target, 0.0, axis=1)
    assert got.shape == (3, 4)
    for a in range(3):
        np.testing.assert_allclose(got[a], _spearman_rows(pred[a].T, target[a].T), rtol=1e-12)
    soft = srn.spearman(pred, target, 0.5, axis=1)
    np.testing.assert_allclose(
        soft, srn.spearman(np.moveaxis(pred, 1, -1), np.moveaxis(target, 1, -1), 0.5),
        rtol=1e-15)


def test_spearman_constant_rows_are_nan(backend):
    pred = np.array([[1.0, 1.0, 1.0, 1.0], [0.1, 0.4, 0.2, 0.3], [0.1, 0.4, 0.2, 0.3]])
    target = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0], [1.0, 4.0, 2.0, 3.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = srn.spearman(pred, target, 0.0)
    ref = _spearman_rows(pred, target)
    assert np.isnan(ref[0]) and np.isnan(ref[1])
    assert np.isnan(got[0]) and np.isnan(got[1])
    np.testing.assert_allclose(got[2], 1.0, rtol=1e-15)


def test_spearman_with_a_non_finite_target_row_is_nan_in_that_row_only(backend):
    # The documented rule (a row of target holding NaN or +-inf gives NaN, as a
    # row of pred does); the other rows, and their gradients, stay exact.
    rng = np.random.default_rng(43)
    pred = rng.normal(size=(4, 6))
    target = rng.normal(size=(4, 6))
    target[1, 2], target[2, 0] = np.inf, np.nan
    value, vjp = srn.spearman_with_vjp(pred, target, 0.5)
    assert np.isnan(value[1:3]).all()
    clean = [0, 3]
    np.testing.assert_array_equal(value[clean], srn.spearman(pred[clean], target[clean], 0.5))
    grad = vjp(np.ones(4))
    np.testing.assert_array_equal(grad[clean],
                                  srn.spearman_with_vjp(pred[clean], target[clean], 0.5)[1](np.ones(2)))


@pytest.mark.parametrize("regularization", REGS)
def test_spearman_vjp_matches_fd(backend, regularization):
    rng = np.random.default_rng(42)
    pred = rng.normal(size=(2, 6, 3))
    target = rng.normal(size=(2, 6, 3))
    target[0, :3, 0] = 1.0  # ties in target
    c = rng.normal(size=(2, 3))
    for eps in (0.3, 1.0):
        value, vjp = srn.spearman_with_vjp(pred, target, eps, regularization=regularization,
                                           axis=1)
        np.testing.assert_array_equal(
            value, srn.spearman(pred, target, eps, regularization=regularization, axis=1))
        expected = _fd_grad(lambda p: srn.spearman(p, target, eps, regularization=regularization,
                                                   axis=1), pred, c)
        _assert_grad(vjp(c), expected)


def test_spearman_bad_input(backend):
    pred = np.zeros((2, 4))
    _raises_naming(lambda: srn.spearman(pred, np.zeros((2, 3))), "target")
    _raises_naming(lambda: srn.spearman(np.float64(1.0), 1.0), "pred")
    _raises_naming(lambda: srn.spearman(pred, pred, -2.0), "eps")
    _raises_naming(lambda: srn.spearman(pred, pred, regularization="x"), "regularization")
    _, vjp = srn.spearman_with_vjp(np.arange(8.0).reshape(2, 4), np.arange(8.0).reshape(2, 4))
    _raises_naming(lambda: vjp(np.zeros((2, 4))), "cotangent")


# ---------------------------------------------------------------------------
# soft_quantile / soft_median


@pytest.mark.parametrize("regularization", REGS)
def test_quantile_limit_matches_numpy(backend, regularization):
    rng = np.random.default_rng(50)
    x = rng.normal(size=(4, 7, 5))
    x[0, :3, 0] = 0.25  # ties
    qs = [0.0, 0.3, 0.5, 0.9, 1.0, np.array([0.1, 0.5, 1.0]), [0.0, 0.77], np.array([0.4])]
    for eps in (0.0, 1e-9):
        for axis in (0, 1, -1):
            for q in qs:
                got = srn.soft_quantile(x, q, eps, regularization=regularization, axis=axis)
                ref = np.quantile(x, q, axis=axis, method="linear")
                assert got.shape == ref.shape, (q, axis)
                np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)
            np.testing.assert_allclose(
                srn.soft_median(x, eps, regularization=regularization, axis=axis),
                np.median(x, axis=axis), rtol=1e-9, atol=1e-9)
    # n = 1: every quantile is the value itself, at any eps
    one = rng.normal(size=(3, 1))
    for eps in (0.0, 1.0):
        np.testing.assert_allclose(srn.soft_quantile(one, [0.2, 0.9], eps,
                                                     regularization=regularization),
                                   np.quantile(one, [0.2, 0.9], axis=-1), rtol=1e-15)
        np.testing.assert_allclose(srn.soft_median(one, eps, regularization=regularization),
                                   one[:, 0], rtol=1e-15)


@pytest.mark.parametrize("regularization", REGS)
def test_quantile_is_linear_rule_on_soft_sort(backend, regularization):
    """At eps > 0: np.quantile's rule applied to the ascending soft sort."""
    rng = np.random.default_rng(51)
    x = rng.normal(size=(3, 8))
    q = np.array([0.0, 0.13, 0.5, 0.99, 1.0])
    s = srn.soft_sort(x, 0.7, regularization=regularization)  # ascending
    p = q * 7
    lo = np.floor(p).astype(int)
    hi = np.minimum(lo + 1, 7)
    ref = (s[:, lo] + (p - lo) * (s[:, hi] - s[:, lo])).T
    np.testing.assert_allclose(srn.soft_quantile(x, q, 0.7, regularization=regularization), ref,
                               rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("regularization", REGS)
def test_quantile_vjp_matches_fd(backend, regularization):
    rng = np.random.default_rng(52)
    x = rng.normal(size=(2, 7, 3))
    for q in (0.35, np.array([0.0, 0.5, 0.8, 1.0])):
        value, vjp = srn.soft_quantile_with_vjp(x, q, 0.5, regularization=regularization, axis=1)
        np.testing.assert_array_equal(
            value, srn.soft_quantile(x, q, 0.5, regularization=regularization, axis=1))
        c = rng.normal(size=value.shape)
        expected = _fd_grad(lambda a: srn.soft_quantile(a, q, 0.5, regularization=regularization,
                                                        axis=1), x, c)
        _assert_grad(vjp(c), expected)
    value, vjp = srn.soft_median_with_vjp(x, 0.5, regularization=regularization, axis=1)
    c = rng.normal(size=value.shape)
    _assert_grad(vjp(c), _fd_grad(
        lambda a: srn.soft_median(a, 0.5, regularization=regularization, axis=1), x, c))


def test_quantile_bad_input(backend):
    x = np.zeros((2, 4))
    for q in (-0.1, 1.5, np.nan, [0.5, 2.0], [[0.5]], np.ones((2, 2)) / 2):
        err = _raises_naming(lambda: srn.soft_quantile(x, q), "q")
        assert isinstance(err, ValueError)
    _raises_naming(lambda: srn.soft_quantile(x, "a"), "q")
    _raises_naming(lambda: srn.soft_quantile(x, 0.5, -1.0), "eps")
    _raises_naming(lambda: srn.soft_quantile(np.zeros((2, 0)), 0.5), "n")
    _, vjp = srn.soft_quantile_with_vjp(np.arange(8.0).reshape(2, 4), [0.5, 0.7])
    _raises_naming(lambda: vjp(np.zeros(2)), "cotangent")


# ---------------------------------------------------------------------------
# isotonic_regression


@pytest.mark.parametrize("increasing", [True, False])
def test_isotonic_l2_weighted_matches_minmax(backend, increasing):
    rng = np.random.default_rng(60)
    y = rng.normal(size=(4, 9, 2))
    w = rng.uniform(0.2, 3.0, size=y.shape)
    got = srn.isotonic_regression(y, weights=w, increasing=increasing, axis=1)
    for a in range(4):
        for c in range(2):
            ref = R.isotonic_minmax(y[a, :, c], w[a, :, c], increasing)
            np.testing.assert_allclose(got[a, :, c], ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("increasing", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_isotonic_kl_matches_reference(backend, increasing, weighted):
    rng = np.random.default_rng(61)
    y = rng.normal(size=(6, 10)) * 2.0
    y[:2] = rng.integers(-2, 3, size=(2, 10))
    w = rng.uniform(0.2, 3.0, size=y.shape) if weighted else None
    got = srn.isotonic_regression(y, weights=w, increasing=increasing, regularization="kl")
    for r in range(len(y)):
        ref = R.isotonic_kl_ref(y[r], None if w is None else w[r], increasing)
        np.testing.assert_allclose(got[r], ref, rtol=1e-12, atol=1e-12)
        # the objective at the solution is no larger than at the reference (both optimal)
        ww = np.ones(10) if w is None else w[r]
        obj = lambda v: np.sum(np.exp(y[r] - v) + ww * v)  # noqa: E731
        assert obj(got[r]) <= obj(ref) + 1e-12 * abs(obj(ref))
        assert np.all(np.diff(got[r]) >= 0) if increasing else np.all(np.diff(got[r]) <= 0)


def test_isotonic_kl_is_fast_soft_sort_semantics(backend):
    """fast-soft-sort's isotonic_kl(s, w) solves min_{v decreasing} <e^(s - v), 1> + <e^w, v>;
    it is ours with increasing=False and weights = exp(w). Checked on its defining
    property: each block's value is LSE_B(s) - LSE_B(w)."""
    rng = np.random.default_rng(62)
    s = rng.normal(size=15) * 2.0
    w = rng.normal(size=15)
    v = srn.isotonic_regression(s, weights=np.exp(w), increasing=False, regularization="kl")
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(v) != 0) + 1, [15]])
    for a, b in zip(bounds[:-1], bounds[1:]):
        lse = lambda t: np.max(t) + np.log(np.sum(np.exp(t - np.max(t))))  # noqa: E731
        np.testing.assert_allclose(v[a:b], lse(s[a:b]) - lse(w[a:b]), rtol=1e-13)
    np.testing.assert_allclose(v, R.isotonic_kl_ref(s, np.exp(w), increasing=False), rtol=1e-12)


@pytest.mark.parametrize("regularization", REGS)
@pytest.mark.parametrize("increasing", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_isotonic_vjp_matches_fd(backend, regularization, increasing, weighted):
    rng = np.random.default_rng(63)
    y = rng.normal(size=(3, 8)) * 2.0
    w = rng.uniform(0.3, 3.0, size=y.shape) if weighted else None
    g = rng.normal(size=y.shape)
    kw = dict(increasing=increasing, regularization=regularization)
    value, vjp = srn.isotonic_regression_with_vjp(y, weights=w, **kw)
    np.testing.assert_array_equal(value, srn.isotonic_regression(y, weights=w, **kw))
    grad_y, grad_w = vjp(g)
    _assert_grad(grad_y, _fd_grad(lambda a: srn.isotonic_regression(a, weights=w, **kw), y, g))
    if w is None:
        assert grad_w is None
    else:
        _assert_grad(grad_w, _fd_grad(lambda b: srn.isotonic_regression(y, weights=b, **kw),
                                      w, g))
    _assert_grad(srn.isotonic_regression_vjp(y, g, weights=w, **kw), grad_y, tol=1e-13)


def test_isotonic_bad_input(backend):
    y = np.zeros((2, 4))
    for w in (np.zeros((2, 4)), -np.ones((2, 4)), np.full((2, 4), np.nan), np.ones((2, 3))):
        _raises_naming(lambda: srn.isotonic_regression(y, weights=w), "weights")
    _raises_naming(lambda: srn.isotonic_regression(y, regularization="kl2"), "regularization")
    _raises_naming(lambda: srn.isotonic_regression(np.float64(1.0)), "y")
    _, vjp = srn.isotonic_regression_with_vjp(y, weights=np.ones((2, 4)), regularization="kl")
    _raises_naming(lambda: vjp(np.zeros((3, 4))), "cotangent")


# ---------------------------------------------------------------------------
# agreement with google-research/fast-soft-sort (opt-in)

needs_fss = needs_fast_soft_sort
FSS_RTOL = 1e-9
FSS_CASES = 300


@pytest.fixture(scope="module")
def fss():
    return fast_soft_sort()


def _fss_projection_cases():
    rng = np.random.default_rng(2002)
    cases = []
    for i in range(FSS_CASES):
        n = i + 1 if i < 8 else int(np.exp(rng.uniform(0, np.log(60))))
        z = rng.normal(size=n) * float(rng.choice([0.1, 1.0, 10.0]))
        w = rng.normal(size=n) * float(rng.choice([0.5, 2.0, 20.0]))  # any order, any sign
        cases.append((("l2", "kl")[i % 2], z, w, rng.normal(size=n)))
    return cases


@needs_fss
def test_fss_projection_arbitrary_w(backend, fss, record_property):
    """Its Projection(theta, w) needs w sorted decreasingly (it does not sort w itself);
    ours takes w in any order, so we hand it the sorted w."""
    worst = {"forward": 0.0, "vjp": 0.0}
    for reg, z, w, u in _fss_projection_cases():
        proj = fss.Projection(z, np.sort(w)[::-1].copy(), regularization=reg)
        ref = proj.compute()
        ref_vjp = proj.vjp(u)
        value, vjp = srn.permutahedron_projection_with_vjp(z, w, regularization=reg)
        grad_z, _ = vjp(u)
        for key, got, exp in (("forward", value, ref), ("vjp", grad_z, ref_vjp)):
            err = R.rel_err(got, exp)
            worst[key] = max(worst[key], err)
            assert err <= FSS_RTOL, (key, reg, z, w, err)
    for key, err in worst.items():
        record_property(f"max_rel_err_{key}", err)
    print(f"\n[{backend}] fast-soft-sort Projection, {FSS_CASES} cases: max rel err forward "
          f"{worst['forward']:.2e}, vjp {worst['vjp']:.2e}")


@needs_fss
def test_fss_isotonic_kl(backend, fss, record_property):
    rng = np.random.default_rng(2003)
    worst = 0.0
    for i in range(FSS_CASES):
        n = int(np.exp(rng.uniform(0, np.log(60))))
        s = rng.normal(size=n) * float(rng.choice([0.3, 1.0, 5.0]))
        w = rng.normal(size=n)
        if i % 3 == 0:
            w = np.sort(w)[::-1].copy()  # the soft-sort shape: fewer, longer blocks
        ref = fss.isotonic_kl(s, w)
        got = srn.isotonic_regression(s, weights=np.exp(w), increasing=False,
                                      regularization="kl")
        err = R.rel_err(got, ref)
        worst = max(worst, err)
        assert err <= FSS_RTOL, (s, w, err)
    record_property("max_rel_err_isotonic_kl", worst)
    print(f"\n[{backend}] fast-soft-sort isotonic_kl, {FSS_CASES} cases: max rel err {worst:.2e}")


@pytest.mark.parametrize("regularization", REGS)
def test_pullbacks_of_non_finite_rows_give_nan_without_warnings(backend, regularization):
    """A row holding NaN or inf: NaN in its gradient only (the documented
    result), and no RuntimeWarning (the kl pullbacks warned 'invalid value
    encountered in subtract', which -W error turns into an exception)."""
    x = np.array([[1.0, np.nan, 2.0], [3.0, 1.0, 2.5], [np.inf, 0.0, 1.0]])
    ones = np.ones_like(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grads = [
            srn.soft_topk_mask_with_vjp(x, 1, 0.7, regularization=regularization)[1](ones),
            srn.permutahedron_projection_with_vjp(x, x, regularization=regularization)[1](ones)[0],
            srn.spearman_with_vjp(x, np.arange(9.0).reshape(3, 3), 0.7,
                                  regularization=regularization)[1](np.ones(3)),
        ]
    for grad in grads:
        assert np.all(np.isnan(grad[[0, 2]])) and np.all(np.isfinite(grad[1]))


def test_float16_projection_with_the_default_w_past_65504_is_refused():
    # w = (n, ..., 1) past the largest float16: the output, cast back to
    # float16, was inf without a word (soft_rank refuses that n already).
    z = np.linspace(-6e4, 6e4, 65505).astype(np.float16)
    with pytest.raises(ValueError, match=r"float16.*n <= 65504"):
        srn.permutahedron_projection(z)
    w = np.linspace(1.0, 2.0, z.size)
    assert np.isfinite(srn.permutahedron_projection(z, w)).all()  # (an explicit w fits)
    assert np.isfinite(srn.permutahedron_projection(z[:65504])).all()
