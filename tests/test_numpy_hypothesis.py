"""Property-based tests (hypothesis) over shapes (n = 0 and 1 included), axes,
dtypes, eps (0, inf and 1e-6..1e6) and values (with ties)."""
from __future__ import annotations

import numpy as np
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import reference as R
from softrank import numpy as srn

FWD = {"rank": srn.soft_rank, "sort": srn.soft_sort}
VJP = {"rank": srn.soft_rank_vjp, "sort": srn.soft_sort_vjp}

regs = st.sampled_from(["l2", "kl"])
dirs = st.sampled_from(["ascending", "descending"])
ops = st.sampled_from(["rank", "sort"])
epss = st.one_of(st.just(0.0), st.just(np.inf), st.floats(1e-6, 1e6))
dtypes = st.sampled_from([np.float64, np.float32, np.int64])


@st.composite
def arrays_and_axis(draw, max_side=7, dtype_strategy=dtypes):
    dtype = draw(dtype_strategy)
    ndim = draw(st.integers(1, 3))
    shape = list(draw(hnp.array_shapes(min_dims=ndim, max_dims=ndim, min_side=0, max_side=max_side)))
    axis = draw(st.integers(-ndim, ndim - 1))
    if draw(st.booleans()):  # sometimes a longer operator axis
        shape[axis] = draw(st.integers(0, 40))
    if np.dtype(dtype).kind == "f":
        # few distinct magnitudes, lots of ties, and a wide range
        pool = draw(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=6))
        elements = st.one_of(st.sampled_from(pool), st.floats(-1e4, 1e4, allow_nan=False, width=32))
    else:
        elements = st.integers(-50, 50)
    x = draw(hnp.arrays(dtype, tuple(shape), elements=elements))
    return x, axis


def _moved(a, axis):
    return np.moveaxis(a, axis, -1).reshape(-1, a.shape[axis]) if a.size else np.zeros((0, a.shape[axis]))


@given(arrays_and_axis(), epss, regs, dirs, ops)
def test_shape_dtype_finiteness_and_invariants(backend, xa, eps, reg, d, op):
    x, axis = xa
    out = FWD[op](x, eps, regularization=reg, direction=d, axis=axis)
    assert out.shape == x.shape
    assert out.dtype == (x.dtype if x.dtype.kind == "f" else np.float64)
    assert np.all(np.isfinite(out)), "finite input gave a non-finite output"
    n = x.shape[axis]
    if x.size == 0:
        return
    rows = _moved(x.astype(np.float64), axis)
    res = _moved(out.astype(np.float64), axis)
    tol = 1e-12 if out.dtype == np.float64 else 1e-5
    scale = np.abs(rows).max(axis=1, keepdims=True) + 1.0
    if op == "rank":
        np.testing.assert_allclose(res.sum(axis=1), n * (n + 1) / 2, rtol=tol * n)
        assert np.all(res >= 1 - tol * n) and np.all(res <= n + tol * n)
        # ordered like x (ascending) or like -x (descending); ties equal
        key = rows if d == "ascending" else -rows
        for r in range(rows.shape[0]):
            o = np.argsort(key[r], kind="stable")
            assert np.all(np.diff(res[r][o]) >= -tol * n)
            for v in np.unique(key[r]):
                grp = res[r][key[r] == v]
                assert np.ptp(grp) <= tol * n
    else:
        assert np.all(res >= rows.min(axis=1, keepdims=True) - tol * scale)
        assert np.all(res <= rows.max(axis=1, keepdims=True) + tol * scale)
        step = np.diff(res, axis=1)
        bound = tol * scale
        assert np.all(step >= -bound) if d == "ascending" else np.all(step <= bound)
        if reg == "l2" and eps != np.inf:
            np.testing.assert_allclose(res.sum(axis=1), rows.sum(axis=1), atol=tol * n * scale.ravel().max())


@given(arrays_and_axis(max_side=5), epss, regs, dirs, ops)
def test_gradients_finite_and_shaped(backend, xa, eps, reg, d, op):
    x, axis = xa
    g = np.linspace(-1.0, 1.0, x.size).reshape(x.shape) if x.size else np.zeros(x.shape)
    grad = VJP[op](x, g, eps, regularization=reg, direction=d, axis=axis)
    assert grad.shape == x.shape
    assert np.all(np.isfinite(grad))
    if op == "rank" and x.size and grad.dtype == np.float64:
        # rank rows sum to a constant and are shift invariant: J 1 = 0, 1^T J = 0
        n = x.shape[axis]
        ones = np.ones(x.shape)
        assert np.all(np.abs(VJP[op](x, ones, eps, regularization=reg, direction=d, axis=axis))
                      <= 1e-9 * n * max(1.0, 1.0 / max(eps, 1e-300)) * n)


@given(arrays_and_axis(max_side=9, dtype_strategy=st.sampled_from([np.float64, np.int64])), regs, dirs)
def test_eps_zero_exact_hard(backend, xa, reg, d):
    x, axis = xa
    if x.size == 0:
        return
    rows = _moved(x.astype(np.float64), axis)
    r = _moved(srn.soft_rank(x, 0.0, regularization=reg, direction=d, axis=axis), axis)
    s = _moved(srn.soft_sort(x, 0.0, regularization=reg, direction=d, axis=axis), axis)
    for i in range(rows.shape[0]):
        np.testing.assert_array_equal(r[i], R.hard_rank(rows[i], d))
        np.testing.assert_array_equal(s[i], R.hard_sort(rows[i], d))


@given(
    st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=6),
    st.floats(1e-3, 1e3),
    regs, dirs, ops,
)
def test_matches_exact_reference(backend, xs, eps, reg, d, op):
    x = np.array(xs, dtype=np.float64)
    got = FWD[op](x, eps, regularization=reg, direction=d)
    ref = (R.soft_rank_ref if op == "rank" else R.soft_sort_ref)(x, eps, reg, d)
    assert R.rel_err(got, ref) <= 1e-12, (got, ref)


@given(
    st.lists(st.floats(-10, 10, allow_nan=False), min_size=2, max_size=8, unique=True),
    st.floats(0.05, 20.0),
    regs, dirs,
)
def test_rank_vjp_matches_reference_jacobian(backend, xs, eps, reg, d):
    """vjp against finite differences of the exact reference (not of softrank)."""
    x = np.array(xs)
    assume(np.min(np.diff(np.sort(x))) > 1e-3)
    n = len(x)
    f = lambda v: R.soft_rank_ref(v, eps, reg, d)  # noqa: E731
    J = R.jacobian_fd(f, x, h=1e-6)
    # skip points at (or within a step of) a kink of the piecewise-linear l2
    # map, where the derivative is not defined: the one-sided ones differ
    if reg == "l2":
        Jf = R.jacobian_fd(f, x, h=1e-6, side="forward")
        Jb = R.jacobian_fd(f, x, h=1e-6, side="backward")
        assume(np.abs(Jf - Jb).max() < 1e-4 * (1 + np.abs(J).max()))
    u = np.cos(np.arange(n) + 1.0)
    assert R.rel_err(srn.soft_rank_vjp(x, u, eps, regularization=reg, direction=d), J.T @ u) <= 1e-6


@st.composite
def extreme_rows(draw):
    """Rows whose spacing is commensurate with eps at any magnitude: values
    c * (1 + k * 2^-52) (neighbouring floats of c) or m * 10^e with mixed e."""
    n = draw(st.integers(1, 6))
    op = draw(ops)
    if draw(st.booleans()):
        e = draw(st.integers(-1000, 1000))
        c = draw(st.sampled_from([1.0, -1.0, 1.5])) * 2.0 ** e
        ks = draw(st.lists(st.integers(0, 24), min_size=n, max_size=n))
        x = np.array([c * (1.0 + k * 2.0 ** -52) for k in ks])
        spacing = abs(c) * 2.0 ** -52
        f = draw(st.floats(0.2, 20.0))
        eps = f * spacing if op == "rank" else 1.0 / (f * spacing)
    else:
        mant = draw(st.lists(st.floats(-9.0, 9.0, allow_nan=False), min_size=n, max_size=n))
        exps = draw(st.lists(st.integers(-300, 300), min_size=n, max_size=n))
        x = np.array([m * 10.0 ** e for m, e in zip(mant, exps)])
        eps = 10.0 ** draw(st.integers(-300, 300)) * draw(st.floats(1.0, 9.0))
    assume(np.all(np.isfinite(x)) and np.isfinite(eps) and eps > 0)
    return op, x, eps


@given(extreme_rows(), regs, dirs)
def test_extreme_magnitudes_exact(backend, case, reg, d):
    """Any magnitude of x and eps: finite, and equal to the mpmath reference."""
    op, x, eps = case
    got = FWD[op](x, eps, regularization=reg, direction=d)
    ref = (R.soft_rank_ref if op == "rank" else R.soft_sort_ref)(x, eps, reg, d)
    ctx = (op, reg, d, x.tolist(), eps, got.tolist(), ref.tolist())
    assert np.all(np.isfinite(got)), ctx
    if op == "sort" and reg == "kl":
        # log-sum-exp arithmetic carries an absolute error of a few ulps of
        # log(n) ~ 1 whatever the scale of x (known: see
        # test_kl_sort_small_values_relative_precision); everything else is
        # relative to the row's magnitude.
        assert np.max(np.abs(got - ref)) <= 1e-12 * np.max(np.abs(ref)) + 4e-15, ctx
    else:
        assert R.rel_err(got, ref) <= 1e-12, ctx
