"""Closed-form limits, invariants, shapes/axes/dtypes and non-finite rows.

Every expected value here is computed independently of softrank: hard ranks by
counting (ties averaged), np.sort, means and log-mean-exp with exactly rounded
sums, symmetries of the permutahedron.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import reference as R
from softrank import numpy as srn

REGS = ("l2", "kl")
DIRS = ("ascending", "descending")
FWD = {"rank": srn.soft_rank, "sort": srn.soft_sort}
VJP = {"rank": srn.soft_rank_vjp, "sort": srn.soft_sort_vjp}
JVP = {"rank": srn.soft_rank_jvp, "sort": srn.soft_sort_jvp}


def _rows_with_ties(rng):
    rows = [
        np.array([3.0, 1.0, 2.0]),
        np.array([2.0, 2.0, 2.0, 2.0]),
        np.array([1.0, 3.0, 1.0, 0.5, 3.0, 3.0]),
        np.array([-0.0, 0.0, 1.0]),
        rng.integers(-3, 4, size=9).astype(np.float64),
        rng.normal(size=7),
        np.array([5.0]),
    ]
    return rows


def _lme(v):
    m = np.max(v)
    return m + math.log(math.fsum(np.exp(v - m)) / len(v))


def _softmax(v):
    e = np.exp(v - np.max(v))
    return e / math.fsum(e)


# ---------------------------------------------------------------------------
# eps = 0: the hard operator, exactly, ties averaged


def test_eps_zero_is_hard_operator(backend):
    rng = np.random.default_rng(0)
    for x in _rows_with_ties(rng):
        for reg in REGS:
            for d in DIRS:
                np.testing.assert_array_equal(
                    srn.soft_rank(x, 0.0, regularization=reg, direction=d), R.hard_rank(x, d),
                    err_msg=f"rank {reg} {d} {x}")
                np.testing.assert_array_equal(
                    srn.soft_sort(x, 0.0, regularization=reg, direction=d), R.hard_sort(x, d),
                    err_msg=f"sort {reg} {d} {x}")


def test_a_zero_output_is_positive_zero(backend):
    """np.sort keeps a +0.0 input +0.0; an ascending sort, computed as the
    negated descending one, returned -0.0 (printed "-0."), at eps = 0 and above,
    and a decreasing isotonic regression of zeros did too."""
    x = np.array([[0.0, 1.0, 2.0], [2.0, 0.0, 1.0]])
    outputs = [srn.soft_sort(x, 0.0), srn.soft_sort(x, 1e-3),
               srn.soft_sort(x, 1e-3, regularization="kl"),
               srn.soft_sort(-x, 0.0, direction="descending"),
               srn.isotonic_regression(np.zeros((2, 3)), increasing=False),
               srn.isotonic_regression(np.zeros((2, 3))),
               srn.permutahedron_projection(np.array([0.0, 1.0]), np.array([0.0, 1.0])),
               srn.soft_quantile(x, 0.0, 1e-3)]
    for out in outputs:
        zeros = out == 0.0
        assert zeros.any()
        assert not np.signbit(out[zeros]).any(), out
    np.testing.assert_array_equal(srn.soft_sort(x, 0.0), np.sort(x))


def test_hand_checked_hard_ranks(backend):
    x = np.array([10.0, 30.0, 20.0, 20.0])
    np.testing.assert_array_equal(srn.soft_rank(x, 0), [1.0, 4.0, 2.5, 2.5])
    np.testing.assert_array_equal(srn.soft_rank(x, 0, direction="descending"), [4.0, 1.0, 2.5, 2.5])
    np.testing.assert_array_equal(srn.soft_sort(x, 0), [10.0, 20.0, 20.0, 30.0])
    np.testing.assert_array_equal(srn.soft_sort(x, 0, direction="descending"), [30.0, 20.0, 20.0, 10.0])
    # the docstring examples
    np.testing.assert_array_equal(srn.soft_rank(np.array([3.0, 1.0, 2.0]), eps=0.1), [3.0, 1.0, 2.0])
    np.testing.assert_array_equal(srn.soft_sort(np.array([3.0, 1.0, 2.0]), eps=0.1), [1.0, 2.0, 3.0])


def test_eps_zero_gradients(backend):
    """Zero for rank; the sorting permutation for sort (vjp and jvp)."""
    rng = np.random.default_rng(1)
    for x in _rows_with_ties(rng):
        n = len(x)
        g = rng.normal(size=n)
        for reg in REGS:
            for d in DIRS:
                kw = dict(regularization=reg, direction=d)
                np.testing.assert_array_equal(srn.soft_rank_vjp(x, g, 0.0, **kw), np.zeros(n))
                np.testing.assert_array_equal(srn.soft_rank_jvp(x, g, 0.0, **kw), np.zeros(n))
                vjp = srn.soft_sort_vjp(x, g, 0.0, **kw)
                jvp = srn.soft_sort_jvp(x, g, 0.0, **kw)
                key = x if d == "ascending" else -x
                order = np.argsort(key, kind="stable")  # output position i <- x[order[i]]
                if len(np.unique(x)) == n:
                    expected_vjp = np.empty(n)
                    expected_vjp[order] = g
                    np.testing.assert_array_equal(vjp, expected_vjp)
                    np.testing.assert_array_equal(jvp, g[order])
                else:
                    # ties: any order among tied entries is a valid permutation;
                    # each tie group must receive exactly its group's cotangents
                    sorted_key = key[order]
                    for value in np.unique(key):
                        pos = np.flatnonzero(sorted_key == value)
                        cols = np.flatnonzero(key == value)
                        np.testing.assert_array_equal(np.sort(vjp[cols]), np.sort(g[pos]))
                        np.testing.assert_array_equal(np.sort(jvp[pos]), np.sort(g[cols]))


# ---------------------------------------------------------------------------
# eps = inf and eps -> inf


def test_eps_inf_limits(backend):
    rng = np.random.default_rng(2)
    for x in _rows_with_ties(rng):
        n = len(x)
        mean = math.fsum(x) / n
        for reg in REGS:
            for d in DIRS:
                kw = dict(regularization=reg, direction=d)
                np.testing.assert_array_equal(srn.soft_rank(x, np.inf, **kw), np.full(n, (n + 1) / 2))
                got = srn.soft_sort(x, np.inf, **kw)
                if reg == "l2":
                    expected = np.full(n, mean)
                else:
                    # sign * log-mean-exp(sign * x); sign = +1 descending, -1 ascending
                    t = 1.0 if d == "descending" else -1.0
                    expected = np.full(n, t * _lme(t * x))
                np.testing.assert_allclose(got, expected, rtol=1e-14, atol=1e-15 * (1 + np.abs(x).max()))


def test_eps_inf_gradients(backend):
    rng = np.random.default_rng(3)
    x = rng.normal(size=6)
    g = rng.normal(size=6)
    for d in DIRS:
        t = 1.0 if d == "descending" else -1.0
        for reg in REGS:
            kw = dict(regularization=reg, direction=d)
            np.testing.assert_array_equal(srn.soft_rank_vjp(x, g, np.inf, **kw), np.zeros(6))
            np.testing.assert_array_equal(srn.soft_rank_jvp(x, g, np.inf, **kw), np.zeros(6))
        # l2 sort = mean for every output
        np.testing.assert_allclose(srn.soft_sort_vjp(x, g, np.inf, direction=d), np.full(6, g.sum() / 6), rtol=1e-13)
        np.testing.assert_allclose(srn.soft_sort_jvp(x, g, np.inf, direction=d), np.full(6, g.sum() / 6), rtol=1e-13)
        # kl sort = t * LME(t x): d/dx_j = softmax(t x)_j
        p = _softmax(t * x)
        np.testing.assert_allclose(
            srn.soft_sort_vjp(x, g, np.inf, regularization="kl", direction=d), p * g.sum(), rtol=1e-13)
        np.testing.assert_allclose(
            srn.soft_sort_jvp(x, g, np.inf, regularization="kl", direction=d), np.full(6, p @ g), rtol=1e-13)


def test_large_eps_tends_to_limit(backend):
    rng = np.random.default_rng(4)
    x = rng.normal(size=8)
    n = 8
    for reg in REGS:
        prev = np.inf
        for eps in (1e2, 1e4, 1e6, 1e8):
            dev = np.max(np.abs(srn.soft_rank(x, eps, regularization=reg) - (n + 1) / 2))
            assert dev <= 10 * np.abs(x).max() / eps
            assert dev < prev
            prev = dev
        lim = srn.soft_sort(x, np.inf, regularization=reg)
        np.testing.assert_allclose(srn.soft_sort(x, 1e9, regularization=reg), lim, atol=1e-7)
    # l2, one block: rank = (n+1)/2 + (x - mean)/eps exactly (closed form)
    np.testing.assert_allclose(srn.soft_rank(x, 1e3), (n + 1) / 2 + (x - x.mean()) / 1e3, rtol=1e-14)


# ---------------------------------------------------------------------------
# eps -> 0


def test_small_eps_ties_averaged(backend):
    rng = np.random.default_rng(5)
    for x in _rows_with_ties(rng):
        for d in DIRS:
            np.testing.assert_array_equal(srn.soft_rank(x, 1e-9, direction=d), R.hard_rank(x, d))
            np.testing.assert_allclose(
                srn.soft_rank(x, 1e-9, regularization="kl", direction=d), R.hard_rank(x, d), rtol=1e-13)
            for reg in REGS:
                np.testing.assert_allclose(
                    srn.soft_sort(x, 1e-9, regularization=reg, direction=d), R.hard_sort(x, d), rtol=1e-13, atol=1e-300)


def test_l2_piecewise_exact(backend):
    """Gaps in [0.1, 10]: rank l2 is exactly hard for eps < min gap, sort l2 for
    eps < 1 / max gap (no pooling in the isotonic problem)."""
    rng = np.random.default_rng(6)
    for _ in range(20):
        n = int(rng.integers(2, 30))
        x = np.cumsum(rng.uniform(0.1, 10.0, size=n))
        x = x[rng.permutation(n)]
        for d in DIRS:
            for eps in (0.099, 0.05, 1e-3):
                np.testing.assert_array_equal(srn.soft_rank(x, eps, direction=d), R.hard_rank(x, d))
                np.testing.assert_array_equal(srn.soft_sort(x, eps, direction=d), R.hard_sort(x, d))
            # and just above the threshold it is soft
            gap = np.min(np.diff(np.sort(x)))
            assert not np.array_equal(srn.soft_rank(x, 2.5 * gap, direction=d), R.hard_rank(x, d))


# ---------------------------------------------------------------------------
# invariants


def test_row_sums_and_sum_preservation(backend):
    rng = np.random.default_rng(7)
    for n in (1, 2, 5, 33, 200):
        X = rng.normal(size=(4, n)) * 3
        for eps in (0.01, 0.5, 2.0, 50.0):
            for reg in REGS:
                for d in DIRS:
                    kw = dict(regularization=reg, direction=d)
                    r = srn.soft_rank(X, eps, **kw)
                    np.testing.assert_allclose(r.sum(axis=-1), n * (n + 1) / 2, rtol=1e-13)
                    assert np.all(r >= 1 - 1e-12) and np.all(r <= n + 1e-12)
                    s = srn.soft_sort(X, eps, **kw)
                    assert np.all(s >= X.min(axis=-1, keepdims=True) - 1e-12)
                    assert np.all(s <= X.max(axis=-1, keepdims=True) + 1e-12)
                    step = np.diff(s, axis=-1)
                    assert np.all(step >= -1e-12) if d == "ascending" else np.all(step <= 1e-12)
                    if reg == "l2":
                        np.testing.assert_allclose(s.sum(axis=-1), X.sum(axis=-1), atol=1e-12 * n * 3)


def test_permutation_equivariance(backend):
    rng = np.random.default_rng(8)
    for n in (3, 10, 64):
        x = rng.normal(size=n)
        p = rng.permutation(n)
        for eps in (0.1, 1.0):
            for reg in REGS:
                for d in DIRS:
                    kw = dict(regularization=reg, direction=d)
                    np.testing.assert_allclose(srn.soft_rank(x[p], eps, **kw), srn.soft_rank(x, eps, **kw)[p], rtol=1e-14)
                    np.testing.assert_allclose(srn.soft_sort(x[p], eps, **kw), srn.soft_sort(x, eps, **kw), rtol=1e-14, atol=1e-15)


def test_shift_and_scale(backend):
    rng = np.random.default_rng(9)
    # values on a 1/64 grid: x + c and 2x are exact in float64
    x = rng.integers(-200, 200, size=12) / 64.0
    for reg in REGS:
        for d in DIRS:
            kw = dict(regularization=reg, direction=d)
            for eps in (0.05, 1.0, 7.0):
                base = srn.soft_rank(x, eps, **kw)
                np.testing.assert_allclose(srn.soft_rank(x + 3.0, eps, **kw), base, rtol=1e-13)
                np.testing.assert_allclose(srn.soft_rank(2 * x, 2 * eps, **kw), base, rtol=1e-13)
                sbase = srn.soft_sort(x, eps, **kw)
                np.testing.assert_allclose(srn.soft_sort(x + 3.0, eps, **kw), sbase + 3.0, rtol=1e-13, atol=1e-13)
                if reg == "l2":
                    # P(z, a w) = a P(z / a, w)
                    np.testing.assert_allclose(srn.soft_sort(2 * x, eps / 2, **kw), 2 * sbase, rtol=1e-13, atol=1e-13)


def test_l2_direction_symmetry(backend):
    """The permutahedron is centrally symmetric: descending l2 rank = n + 1 -
    ascending rank; ascending l2 sort = reversed descending sort."""
    rng = np.random.default_rng(10)
    for n in (2, 7, 40):
        x = rng.normal(size=n)
        for eps in (0.05, 0.7, 5.0):
            np.testing.assert_allclose(
                srn.soft_rank(x, eps, direction="descending"), n + 1 - srn.soft_rank(x, eps), rtol=1e-13)
            np.testing.assert_allclose(
                srn.soft_sort(x, eps, direction="ascending"), srn.soft_sort(x, eps, direction="descending")[::-1],
                rtol=1e-13, atol=1e-14)
            # and for every regularization: descending of x = ascending of -x
            for reg in REGS:
                np.testing.assert_allclose(
                    srn.soft_rank(x, eps, regularization=reg, direction="descending"),
                    srn.soft_rank(-x, eps, regularization=reg), rtol=1e-13)
                np.testing.assert_allclose(
                    srn.soft_sort(x, eps, regularization=reg, direction="descending"),
                    -srn.soft_sort(-x, eps, regularization=reg), rtol=1e-13, atol=1e-14)


def test_ties_equal_ranks(backend):
    rng = np.random.default_rng(11)
    for _ in range(10):
        x = rng.integers(0, 4, size=12).astype(np.float64) * 0.37
        for eps in (1e-3, 0.1, 1.0, 10.0):
            for reg in REGS:
                for d in DIRS:
                    r = srn.soft_rank(x, eps, regularization=reg, direction=d)
                    for v in np.unique(x):
                        group = r[x == v]
                        np.testing.assert_allclose(group, group[0], rtol=1e-14)
                    np.testing.assert_allclose(r.sum(), 78.0, rtol=1e-14)


# ---------------------------------------------------------------------------
# shapes, axes, layouts, dtypes


def test_every_axis_of_a_3d_array(backend):
    rng = np.random.default_rng(12)
    x = rng.normal(size=(3, 4, 5))
    for op in ("rank", "sort"):
        for reg in REGS:
            for axis in (0, 1, 2, -1, -2, -3):
                got = FWD[op](x, 0.3, regularization=reg, axis=axis)
                assert got.shape == x.shape and got.dtype == np.float64
                moved = np.moveaxis(x, axis, -1)
                expected = np.empty_like(moved)
                for idx in np.ndindex(moved.shape[:-1]):
                    expected[idx] = FWD[op](np.ascontiguousarray(moved[idx]), 0.3, regularization=reg)
                np.testing.assert_allclose(np.moveaxis(got, axis, -1), expected, rtol=1e-14, atol=1e-15)
                g = rng.normal(size=x.shape)
                vjp = VJP[op](x, g, 0.3, regularization=reg, axis=axis)
                assert vjp.shape == x.shape
                gm = np.moveaxis(g, axis, -1)
                expected = np.empty_like(moved)
                for idx in np.ndindex(moved.shape[:-1]):
                    expected[idx] = VJP[op](np.ascontiguousarray(moved[idx]), np.ascontiguousarray(gm[idx]), 0.3,
                                            regularization=reg)
                np.testing.assert_allclose(np.moveaxis(vjp, axis, -1), expected, rtol=1e-13, atol=1e-14)


def test_against_reference_on_an_axis(backend):
    """Axis 0 of a 2-D array against the exact reference, column by column."""
    rng = np.random.default_rng(13)
    x = rng.normal(size=(6, 3))
    for op, refn in (("rank", R.soft_rank_ref), ("sort", R.soft_sort_ref)):
        got = FWD[op](x, 0.4, regularization="kl", direction="descending", axis=0)
        for c in range(3):
            expected = refn(x[:, c], 0.4, "kl", "descending")
            assert R.rel_err(got[:, c], expected) < 1e-12


def test_strided_and_fortran_layouts(backend):
    rng = np.random.default_rng(14)
    big = rng.normal(size=(6, 20))
    variants = [big[:, ::2], big[::2, 1::3], np.asfortranarray(big), big.T, big[:, ::-1]]
    for x in variants:
        assert not (x.flags.c_contiguous and x.base is None) or x is big
        for op in ("rank", "sort"):
            for axis in (-1, 0):
                got = FWD[op](x, 0.5, regularization="kl", axis=axis)
                expected = FWD[op](np.ascontiguousarray(x), 0.5, regularization="kl", axis=axis)
                np.testing.assert_array_equal(got, expected)
                g = np.asfortranarray(rng.normal(size=x.shape))
                np.testing.assert_array_equal(
                    VJP[op](x, g, 0.5, axis=axis), VJP[op](np.ascontiguousarray(x), np.ascontiguousarray(g), 0.5, axis=axis))
    # the input is not modified
    before = big.copy()
    srn.soft_rank(big, 0.5)
    srn.soft_sort(np.asfortranarray(big), 0.5, axis=0)
    np.testing.assert_array_equal(big, before)


def test_float32_stays_float32(backend):
    rng = np.random.default_rng(15)
    x32 = rng.normal(size=(5, 17)).astype(np.float32)
    x64 = x32.astype(np.float64)
    g32 = rng.normal(size=x32.shape).astype(np.float32)
    for op in ("rank", "sort"):
        for reg in REGS:
            got = FWD[op](x32, 0.3, regularization=reg)
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, FWD[op](x64, 0.3, regularization=reg), rtol=1e-6, atol=1e-6)
            for fn in (VJP[op], JVP[op]):
                gg = fn(x32, g32, 0.3, regularization=reg)
                assert gg.dtype == np.float32
                np.testing.assert_allclose(gg, fn(x64, g32.astype(np.float64), 0.3, regularization=reg),
                                           rtol=1e-5, atol=1e-5)


def test_float16_computed_in_float32(backend):
    rng = np.random.default_rng(16)
    x16 = rng.normal(size=(3, 9)).astype(np.float16)
    g16 = rng.normal(size=x16.shape).astype(np.float16)
    for op in ("rank", "sort"):
        for reg in REGS:
            got = FWD[op](x16, 0.3, regularization=reg)
            assert got.dtype == np.float16
            np.testing.assert_array_equal(got, FWD[op](x16.astype(np.float32), 0.3, regularization=reg).astype(np.float16))
            gg = VJP[op](x16, g16, 0.3, regularization=reg)
            assert gg.dtype == np.float16
            np.testing.assert_array_equal(
                gg, VJP[op](x16.astype(np.float32), g16.astype(np.float32), 0.3, regularization=reg).astype(np.float16))


def test_bfloat16_computed_in_float32(backend):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = np.dtype(ml_dtypes.bfloat16)
    x = np.random.default_rng(17).normal(size=(2, 7)).astype(bf16)
    for op in ("rank", "sort"):
        got = FWD[op](x, 0.3)
        assert got.dtype == bf16
        np.testing.assert_array_equal(
            got.astype(np.float32), FWD[op](x.astype(np.float32), 0.3).astype(bf16).astype(np.float32))


def test_ints_and_lists_become_float64(backend):
    for x in ([3, 1, 2], np.array([3, 1, 2], dtype=np.int32), np.array([3, 1, 2], dtype=np.uint8), (3.0, 1, 2)):
        for op in ("rank", "sort"):
            got = FWD[op](x, 0.5)
            assert isinstance(got, np.ndarray) and got.dtype == np.float64
            np.testing.assert_array_equal(got, FWD[op](np.array([3.0, 1.0, 2.0]), 0.5))
    np.testing.assert_array_equal(srn.soft_rank([[3, 1], [1, 3]], 0.0), [[2.0, 1.0], [1.0, 2.0]])
    g = srn.soft_rank_vjp([3, 1, 2], [1, 0, 0], 0.5)
    assert g.dtype == np.float64


def test_empty_and_n0(backend):
    for shape, axis in [((0,), -1), ((3, 0), -1), ((3, 0), 1), ((2, 0, 4), 1), ((0, 5), -1), ((0, 5), 0), ((4, 0, 0), 0)]:
        x = np.zeros(shape)
        for op in ("rank", "sort"):
            for reg in REGS:
                for eps in (0.0, 1.0, np.inf):
                    got = FWD[op](x, eps, regularization=reg, axis=axis)
                    assert got.shape == shape and got.dtype == np.float64
                    assert VJP[op](x, x, eps, regularization=reg, axis=axis).shape == shape
                    assert JVP[op](x, x, eps, regularization=reg, axis=axis).shape == shape
        assert srn.isotonic_regression(x, axis=axis).shape == shape
        assert srn.isotonic_regression_vjp(x, x, axis=axis).shape == shape


def test_n1(backend):
    x = np.array([[2.5], [-7.0], [0.0]])
    g = np.array([[0.3], [-1.0], [2.0]])
    for reg in REGS:
        for d in DIRS:
            for eps in (0.0, 1e-300, 0.5, 1e300, np.inf):
                kw = dict(regularization=reg, direction=d)
                np.testing.assert_array_equal(srn.soft_rank(x, eps, **kw), np.ones((3, 1)))
                np.testing.assert_array_equal(srn.soft_sort(x, eps, **kw), x)
                np.testing.assert_array_equal(srn.soft_rank_vjp(x, g, eps, **kw), np.zeros((3, 1)))
                np.testing.assert_array_equal(srn.soft_rank_jvp(x, g, eps, **kw), np.zeros((3, 1)))
                np.testing.assert_array_equal(srn.soft_sort_vjp(x, g, eps, **kw), g)
                np.testing.assert_array_equal(srn.soft_sort_jvp(x, g, eps, **kw), g)
    np.testing.assert_array_equal(srn.soft_rank(np.array([4.0]), 1.0), [1.0])


# ---------------------------------------------------------------------------
# NaN / inf rows


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_row_is_nan_others_exact(backend, bad):
    rng = np.random.default_rng(18)
    X = rng.normal(size=(4, 6))
    X[1, 2] = bad
    X[3, 0] = bad
    X[3, 5] = np.nan
    G = rng.normal(size=X.shape)
    good = [0, 2]
    for op in ("rank", "sort"):
        for reg in REGS:
            for d in DIRS:
                for eps in (0.0, 0.7, np.inf):
                    kw = dict(regularization=reg, direction=d)
                    out = FWD[op](X, eps, **kw)
                    assert np.all(np.isnan(out[[1, 3]])), (op, reg, d, eps, out)
                    for fn in (VJP[op], JVP[op]):
                        gr = fn(X, G, eps, **kw)
                        assert np.all(np.isnan(gr[[1, 3]])), (fn.__name__, reg, d, eps, gr)
                        for r in good:
                            np.testing.assert_array_equal(gr[r], fn(X[r], G[r], eps, **kw))
                    for r in good:
                        np.testing.assert_array_equal(out[r], FWD[op](X[r], eps, **kw))
                    # along axis 0 the bad rows are columns
                    outT = FWD[op](X.T, eps, axis=0, **kw)
                    np.testing.assert_array_equal(outT, out.T)
