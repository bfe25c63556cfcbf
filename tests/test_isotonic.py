"""softrank.numpy.isotonic_regression and its vjp against the min-max formula
(exact rational arithmetic) and finite differences."""
from __future__ import annotations

import math

import numpy as np
import pytest

import reference as R
from softrank import numpy as srn


def test_hand_checked(backend):
    np.testing.assert_array_equal(srn.isotonic_regression(np.array([1.0, 3.0, 2.0, 4.0])), [1.0, 2.5, 2.5, 4.0])
    np.testing.assert_array_equal(
        srn.isotonic_regression(np.array([1.0, 3.0, 2.0, 4.0]), increasing=False), [2.5, 2.5, 2.5, 2.5])
    # weights: (3*1 + 1*3) / 4 = 1.5 ... the pooled block [3, 1] with weights [1, 3]
    np.testing.assert_array_equal(
        srn.isotonic_regression(np.array([3.0, 1.0]), weights=np.array([1.0, 3.0])), [1.5, 1.5])
    np.testing.assert_array_equal(srn.isotonic_regression(np.array([5.0])), [5.0])


def test_against_minmax_formula(backend):
    rng = np.random.default_rng(0)
    worst = 0.0
    for trial in range(120):
        n = int(rng.integers(1, 25))
        y = rng.normal(size=n) * 3
        if trial % 4 == 0:
            y = rng.integers(-2, 3, size=n).astype(np.float64)  # ties
        w = None if trial % 3 == 0 else rng.uniform(0.05, 5.0, size=n)
        inc = bool(trial % 2)
        got = srn.isotonic_regression(y, weights=w, increasing=inc)
        expected = R.isotonic_exact(y, w, inc)
        err = R.rel_err(got, expected)
        worst = max(worst, err)
        assert err <= 1e-13, (y.tolist(), None if w is None else w.tolist(), inc, got, expected)
        # invariants of the exact solution: monotone, weighted sum preserved
        step = np.diff(got)
        assert np.all(step >= -1e-13 * (1 + np.abs(y).max())) if inc else np.all(step <= 1e-13 * (1 + np.abs(y).max()))
        ww = np.ones(n) if w is None else w
        assert abs(math.fsum(ww * got) - math.fsum(ww * y)) <= 1e-12 * math.fsum(ww * np.abs(y)) + 1e-300


def test_axis_and_batch(backend):
    rng = np.random.default_rng(1)
    y = rng.normal(size=(4, 7, 3))
    w = rng.uniform(0.1, 2.0, size=y.shape)
    for axis in (0, 1, 2, -1, -3):
        for inc in (True, False):
            got = srn.isotonic_regression(y, weights=w, increasing=inc, axis=axis)
            assert got.shape == y.shape and got.dtype == np.float64
            ym = np.moveaxis(y, axis, -1)
            wm = np.moveaxis(w, axis, -1)
            gm = np.moveaxis(got, axis, -1)
            for idx in np.ndindex(ym.shape[:-1]):
                np.testing.assert_allclose(gm[idx], R.isotonic_minmax(ym[idx], wm[idx], inc), rtol=1e-13, atol=1e-14)
    # strided / Fortran input
    yF = np.asfortranarray(y[:, ::2, :])
    np.testing.assert_array_equal(srn.isotonic_regression(yF, axis=1),
                                  srn.isotonic_regression(np.ascontiguousarray(yF), axis=1))


def test_dtypes(backend):
    y = np.array([3.0, 1.0, 2.0, 0.5, 4.0])
    y32 = y.astype(np.float32)
    got = srn.isotonic_regression(y32)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, R.isotonic_minmax(y32.astype(np.float64)), rtol=1e-6)
    got16 = srn.isotonic_regression(y.astype(np.float16))
    assert got16.dtype == np.float16
    np.testing.assert_array_equal(got16, srn.isotonic_regression(y.astype(np.float16).astype(np.float32)).astype(np.float16))
    got_int = srn.isotonic_regression([3, 1, 2])
    assert got_int.dtype == np.float64
    np.testing.assert_array_equal(got_int, [2.0, 2.0, 2.0])


@pytest.mark.parametrize("weighted", [False, True])
def test_vjp_vs_finite_differences(backend, weighted):
    rng = np.random.default_rng(2 + weighted)
    nontrivial = 0
    for trial in range(30):
        n = int(rng.integers(1, 20))
        y = rng.normal(size=n) * 2
        w = rng.uniform(0.2, 3.0, size=n) if weighted else None
        inc = bool(trial % 2)
        u = rng.normal(size=n)
        J = R.jacobian_fd_batched(
            lambda Y: srn.isotonic_regression(Y, weights=None if w is None else np.broadcast_to(w, Y.shape),
                                              increasing=inc), y)
        g = srn.isotonic_regression_vjp(y, u, weights=w, increasing=inc)
        assert g.shape == y.shape and g.dtype == np.float64
        assert R.rel_err(g, J.T @ u) <= 1e-6, (y.tolist(), inc)
        if np.abs(J - np.eye(n)).max() > 1e-3:
            nontrivial += 1
    assert nontrivial >= 10


def test_vjp_closed_form_and_axis(backend):
    """grad_j = w_j / W_B * sum_{i in B} g_i over the blocks of the exact solution
    (blocks read off the min-max reference: maximal runs of equal values)."""
    rng = np.random.default_rng(4)
    Y = rng.normal(size=(6, 9))
    W = rng.uniform(0.5, 2.0, size=Y.shape)
    G = rng.normal(size=Y.shape)
    got = srn.isotonic_regression_vjp(Y.T, G.T, weights=W.T, axis=0)
    assert got.shape == Y.T.shape
    for r in range(Y.shape[0]):
        v = R.isotonic_exact(Y[r], W[r], True)
        expected = np.empty(9)
        start = 0
        for end in range(1, 10):
            if end == 9 or v[end] != v[start]:
                blk = slice(start, end)
                expected[blk] = W[r, blk] / W[r, blk].sum() * G[r, blk].sum()
                start = end
        np.testing.assert_allclose(got[:, r], expected, rtol=1e-12, atol=1e-14)


def _isotonic_kl_mpmath(y, w, increasing):
    """The kl isotonic regression by PAV in 60-digit arithmetic: each block's
    value is log(sum_B exp(y) / sum_B w), pooled while adjacent values violate
    the order (an independent reference, exact far below float64's rounding)."""
    import mpmath

    with mpmath.workdps(60):
        blocks = []  # [log-sum-exp of y, sum of w, size]
        for yi, wi in zip(y, w):
            blocks.append([mpmath.mpf(float(yi)), mpmath.mpf(float(wi)), 1])
            while len(blocks) > 1:
                (la, wa, _), (lb, wb, _) = blocks[-2], blocks[-1]
                va, vb = la - mpmath.log(wa), lb - mpmath.log(wb)
                if (va < vb) if increasing else (va > vb):
                    break  # in order: no violation
                b = blocks.pop()
                a = blocks.pop()
                blocks.append([mpmath.log(mpmath.exp(a[0]) + mpmath.exp(b[0])), a[1] + b[1],
                               a[2] + b[2]])
        return np.array([float(l - mpmath.log(s)) for l, s, m in blocks for _ in range(m)])


def test_kl_values_small_against_their_run_keep_their_digits(backend):
    # A block's value was R + log(S / W) with R the largest value of its run
    # (up to 300 above it), exact only to about eps (1 + |R|): an already
    # isotonic [1, 1e-12, 1e-200] read [1, 9.99867e-13, 0]. Now a block of one
    # is y - log(w) (y for unit weights) and a small block value is recomputed
    # about the block's own largest y.
    y = np.array([1.0, 1e-12, 1e-200])
    np.testing.assert_array_equal(
        srn.isotonic_regression(y, regularization="kl", increasing=False), y)
    np.testing.assert_array_equal(
        srn.isotonic_regression(y[::-1].copy(), regularization="kl", increasing=True), y[::-1])
    w = np.array([2.0, 0.5, 3.0])
    np.testing.assert_allclose(
        srn.isotonic_regression(np.array([299.0, 0.1, 1e-10]), weights=w, regularization="kl",
                                increasing=False),
        [299.0 - math.log(2.0), 0.1 - math.log(0.5), 1e-10 - math.log(3.0)], rtol=1e-15)
    rng = np.random.default_rng(11)
    for trial in range(60):
        n = int(rng.integers(2, 14))
        # (Spread far above eps (1 + |R|), the pooling decisions' resolution,
        # which this does not change: the blocks are the exact ones.)
        small = rng.normal(size=n) * 10.0 ** rng.integers(-10, -5)
        y = np.concatenate([[float(rng.choice([1.0, 30.0, -5.0]))], small])
        weighted = trial % 3 == 2
        w = rng.uniform(0.5, 1.5, size=y.size) if weighted else np.ones(y.size)
        increasing = bool(trial % 2)
        got = srn.isotonic_regression(y, weights=w if weighted else None, regularization="kl",
                                      increasing=increasing)
        expected = _isotonic_kl_mpmath(y, w, increasing)
        # Relative to each value, to a few ulps of the block's own terms: the
        # pooled values of near-equal tiny y are tiny themselves (unit weights).
        scale = np.abs(expected) + (0.0 if not weighted else np.abs(np.log(w)).max())
        assert np.all(np.abs(got - expected) <= 1e-13 * scale + 1e-300), (
            y.tolist(), w.tolist(), increasing, got, expected)


def test_kl_solution_stays_monotone_where_blocks_meet_within_the_pooling_resolution(backend):
    # The pooling decides blocks to about eps (1 + |R|); block values computed
    # more exactly than that (a block of one is y itself) came out an ulp out
    # of order where two neighbours lie within it: 9.2137060335e-06 then
    # 9.2137060335e-06 - 5e-17 below.
    v = srn.isotonic_regression(
        np.array([9.213706033572857e-06, 9.274025436250389e-06, 9.153386627157732e-06]),
        regularization="kl", increasing=True)
    assert np.all(np.diff(v) >= 0), v.tolist()
    rng = np.random.default_rng(17)
    for trial in range(3000):
        n = int(rng.integers(2, 12))
        increasing = bool(trial % 2)
        y = rng.normal(size=n) * 10.0 ** rng.integers(-8, 1) + (rng.normal() if trial % 3 else 0)
        w = rng.uniform(0.5, 2.0, size=n) if trial % 5 == 0 else None
        v = srn.isotonic_regression(y, weights=w, increasing=increasing, regularization="kl")
        step = np.diff(v) if increasing else -np.diff(v)
        assert np.all(step >= 0), (y.tolist(), None if w is None else w.tolist(), increasing, v)
