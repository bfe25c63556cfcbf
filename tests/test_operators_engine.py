"""The engines' projection and kl isotonic regression, for every engine present.

``projection_forward(z, w, eps, reg)`` and ``isotonic_forward(y, weights,
increasing, reg)`` are called directly on C-contiguous ``(rows, n)`` arrays
(see softrank/_engine.py and the design note of the projection) and checked
against the independent references of tests/reference.py:

- the projection onto the permutahedron of an arbitrary w (any order, ties,
  negative entries) against the brute-force solver (small n) and against the
  min-max reduction in mpmath (n = 20..60, 1e-12 relative), with eps
  scaling (``P(z / eps, w)`` formed exactly in mpmath);
- the limits eps = 0 (tie groups of z share the mean / log-mean-exp of the
  w's at their sorted positions) and eps = inf (one block);
- kl with -inf entries in w (zeros of e^w, the top-k kl mask);
- the returned structure: perm_z / perm_w are the stable decreasing
  argsorts, block_start is a partition on which the isotonic dual is
  constant per block and decreasing across blocks;
- NaN / inf rows, empty shapes, float32, and the agreement of the two
  engines to 1e-12 in float64;
- isotonic_forward under l2 (weighted min-max formula) and kl
  (``reference.isotonic_kl_ref``), increasing and decreasing.
"""
from __future__ import annotations

import numpy as np
import pytest

import reference as R
from softrank import _engine

BACKENDS = _engine.available_backends()
L2, KL = _engine.REG_L2, _engine.REG_KL
REG_NAME = {L2: "l2", KL: "kl"}


@pytest.fixture(params=BACKENDS)
def eng(request):
    """The engine module under test, installed as the process's engine."""
    saved = (_engine._engine, _engine._engine_name)
    _engine.force_backend(request.param)
    try:
        yield _engine.engine()
    finally:
        _engine._engine, _engine._engine_name = saved


def _row(a):
    return np.ascontiguousarray(np.asarray(a, dtype=np.float64).reshape(1, -1))


def _project(eng, z, w, eps, reg):
    """One row through the engine; returns the 1-D output."""
    out, _, _, _ = eng.projection_forward(_row(z), _row(w), eps, reg)
    return out[0]


def _small_cases():
    """(z, w) pairs with n = 1..6: ties in z and in w, w in any order, negative w."""
    rng = np.random.default_rng(14)
    cases = []
    for n in range(1, 7):
        for kind in range(3):
            if kind == 0:  # continuous z, unsorted w with negative entries
                z = rng.normal(size=n) * 2.0
                w = rng.normal(size=n) * 3.0
            elif kind == 1:  # ties in z and in w
                z = rng.integers(-2, 3, size=n).astype(np.float64)
                w = rng.integers(-2, 3, size=n).astype(np.float64)
            else:  # z wide relative to w (few pools), w a shuffled arithmetic run
                z = rng.normal(size=n) * 10.0
                w = rng.permutation(np.arange(n, dtype=np.float64)) - 1.5
            cases.append((z, w))
    return cases


SMALL_CASES = _small_cases()


@pytest.fixture(scope="module")
def brute_small():
    """The brute-force projection of every small case at eps = 0.7, both regularizations."""
    eps = 0.7
    return eps, {(i, reg): R.project_bruteforce(z / eps, w, REG_NAME[reg])
                 for i, (z, w) in enumerate(SMALL_CASES) for reg in (L2, KL)}


@pytest.mark.parametrize("reg", [L2, KL])
def test_projection_matches_bruteforce(eng, brute_small, reg):
    eps, expected = brute_small
    for i, (z, w) in enumerate(SMALL_CASES):
        got = _project(eng, z, w, eps, reg)
        ref = expected[(i, reg)]
        assert R.rel_err(got, ref) <= 1e-9, (i, z, w, got, ref)


def _minmax_cases():
    rng = np.random.default_rng(60)
    cases = []
    for n, reg in ((20, L2), (60, L2), (20, KL), (60, KL)):
        z = rng.normal(size=n) * 3.0
        z[: n // 4] = np.round(z[: n // 4])  # some ties
        w = rng.normal(size=n) * 2.0
        w[n // 2: n // 2 + 5] = w[n // 2]  # tied w
        eps = float(rng.choice([0.05, 0.8, 13.0]))
        cases.append((z, w, eps, reg))
    return cases


MINMAX_CASES = _minmax_cases()


@pytest.fixture(scope="module")
def minmax_large():
    """``P(z / eps, w)`` with z / eps formed exactly in mpmath (high precision)."""
    import mpmath

    results = []
    for z, w, eps, reg in MINMAX_CASES:
        with mpmath.workprec(200):
            z_exact = [mpmath.mpf(float(v)) / mpmath.mpf(eps) for v in z]
            w_exact = [mpmath.mpf(float(v)) for v in w]
            results.append(R.project_minmax(z_exact, w_exact, REG_NAME[reg], prec=200))
    return results


def test_projection_matches_minmax_high_precision(eng, minmax_large):
    for (z, w, eps, reg), ref in zip(MINMAX_CASES, minmax_large):
        got = _project(eng, z, w, eps, reg)
        assert R.rel_err(got, ref) <= 1e-12, (len(z), REG_NAME[reg], eps)


def test_l2_values_near_the_largest_double(eng):
    """l2 rows of values near 1e307 (the rule's cross products of counts and
    sums would overflow: such rows are scaled by a power of two) against the
    min-max reduction in mpmath; the output stays within [min w, max w] and
    keeps sum(w). Found by the fuzzer (13 values, eps = 1)."""
    rng = np.random.default_rng(18)
    for n, magnitude in ((13, 2e307), (40, 1e307), (200, 1e305), (7, 1.7e308)):
        z = np.clip(rng.normal(size=n), -4.0, 4.0) * (magnitude / 4)
        z[1:4] = z[0]  # ties
        z[5] = 3e-310
        w = np.clip(rng.normal(size=n), -4.0, 4.0) * (magnitude / 4)
        w[::6] = 0.0
        for eps in (1.0, 1e300):
            got = _project(eng, z, w, eps, L2)
            assert np.all(got >= w.min()) and np.all(got <= w.max())
            ref = R.project_minmax([float(v) for v in z / eps], [float(v) for v in w], "l2")
            np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12 * np.abs(w).max())


def _eps_scaling_cases():
    rng = np.random.default_rng(3)
    cases = []
    for reg in (L2, KL):
        for eps in (1e-300, 1e-3, 0.37, 5.0, 1e8, 1e300):
            z = rng.normal(size=9) * (eps * 2.0 if eps < 1e300 else 1e300)
            cases.append((z, rng.normal(size=9), eps, reg))
    return cases


@pytest.fixture(scope="module")
def eps_scaling_refs():
    """``P(z / eps, w)`` with z / eps formed exactly in mpmath, computed once."""
    import mpmath

    cases = _eps_scaling_cases()
    refs = []
    for z, w, eps, reg in cases:
        with mpmath.workprec(2400):
            z_exact = [mpmath.mpf(float(v)) / mpmath.mpf(eps) for v in z]
            refs.append(R.project_minmax(z_exact, [mpmath.mpf(float(v)) for v in w],
                                         REG_NAME[reg], prec=2400))
    return cases, refs


def test_eps_scaling(eng, eps_scaling_refs):
    """projection_forward(z, w, eps) == P(z / eps, w), extreme eps included."""
    for (z, w, eps, reg), ref in zip(*eps_scaling_refs):
        got = _project(eng, z, w, eps, reg)
        assert R.rel_err(got, ref) <= 1e-12, (eps, REG_NAME[reg], got, ref)


def _hard_limit(z, w, reg):
    """eps = 0: sorted position i gets w sorted decreasingly at i, tie groups of z pooled
    (their mean under l2, their log-mean-exp under kl)."""
    z = np.asarray(z, dtype=np.float64)
    order = np.argsort(-z, kind="stable")
    ws = np.sort(np.asarray(w, dtype=np.float64))[::-1]
    out = np.empty_like(z)
    i = 0
    while i < len(z):
        j = i
        while j + 1 < len(z) and z[order[j + 1]] == z[order[i]]:
            j += 1
        group = ws[i:j + 1]
        if reg == L2:
            value = np.mean(group)
        else:
            top = np.max(group)
            value = top if np.isinf(top) else top + np.log(np.mean(np.exp(group - top)))
        out[order[i:j + 1]] = value
        i = j + 1
    return out


@pytest.mark.parametrize("reg", [L2, KL])
def test_eps_zero_is_hard_limit(eng, reg):
    rng = np.random.default_rng(4)
    for n in (1, 2, 5, 17, 40):
        for _ in range(4):
            z = rng.integers(-3, 4, size=n).astype(np.float64)
            z[z == 0] = np.where(rng.random(np.count_nonzero(z == 0)) < 0.5, 0.0, -0.0)
            w = rng.normal(size=n) * 2.0
            got = _project(eng, z, w, 0.0, reg)
            np.testing.assert_allclose(got, _hard_limit(z, w, reg), rtol=1e-14, atol=1e-14)
    # and it is the limit: distinct z, eps far below the gaps
    z = rng.normal(size=12)
    w = rng.normal(size=12)
    np.testing.assert_allclose(_project(eng, z, w, 1e-9, reg), _hard_limit(z, w, reg),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reg", [L2, KL])
def test_eps_inf_is_one_block(eng, reg):
    rng = np.random.default_rng(5)
    for n in (1, 3, 30):
        z = rng.normal(size=n) * 1e3
        w = rng.normal(size=n) * 3.0
        out, _, _, bs = eng.projection_forward(_row(z), _row(w), np.inf, reg)
        if reg == L2:
            expected = np.mean(w)
        else:
            expected = np.max(w) + np.log(np.mean(np.exp(w - np.max(w))))
        np.testing.assert_allclose(out[0], np.full(n, expected), rtol=1e-14, atol=1e-14)
        np.testing.assert_array_equal(bs[0], np.zeros(n))


def _exact_projection(z, w, eps, reg):
    """P(z / eps, w) by the min-max reduction in mpmath at 2400 bits (z / eps
    up to 1e320 beside w of order 1, exactly), rounded to float64."""
    import mpmath

    with mpmath.workprec(2400):
        z_exact = [mpmath.mpf(float(v)) / mpmath.mpf(eps) for v in z]
        ref = R.project_minmax(z_exact, [mpmath.mpf(float(v)) for v in w], reg, prec=2400)
    return np.asarray(ref, dtype=np.float64)


def _kl_spread_cases():
    """kl rows whose spread of z / eps, of w, or of both is wider than a double."""
    big = np.finfo(np.float64).max
    rng = np.random.default_rng(19)

    def wide(n):  # values over [-0.97, 0.97] * DBL_MAX, spread past it
        return np.clip(rng.normal(size=n), -3.9, 3.9) * (big / 4)

    return [
        # two blocks whose reference differences both overflow: z / eps
        # apart by 2.5 DBL_MAX against w by 2 DBL_MAX (no pool), then the
        # other way round (pool); eps = 1 / (spread DBL_MAX), subnormal
        ([1.0, -1.0], [big, -big], (1.0 / 1.25) / big),
        ([1.0, -1.0], [big, -big], (1.0 / 0.75) / big),
        ([3.0, 1.0, -2.0, 0.5], [big, -big, 0.0, 5.0], 1e-320),  # the fuzzer's shape
        ([3.0, 1.0, -2.0, 0.5], [big, -big, 0.0, 5.0], 1.0),
        (wide(9), rng.normal(size=9), 1.0),
        (wide(9), wide(9), 1e-3),
        (wide(10), wide(10), 1.0),
        (rng.normal(size=12), np.r_[wide(6), rng.normal(size=6)], 1e-300),
        (rng.normal(size=12), np.r_[wide(6), rng.normal(size=6)], 1.0),
        # a block whose spread of z / eps overflows (-1e300 and -4 against a
        # subnormal eps) beside subnormal z, whose (z - ref) / eps count
        # (~1e-5): only the overflowing positions may be formed at half scale
        # (found by the fuzzer)
        ([0.0, 0.0, -1e300, 0.0, -5e-324, 0.0, 0.0], [0.0, 2.0, 0.0, -5e-324, -np.inf, 0.0, 0.0],
         3.2378592100206e-319),
        ([0.0, 5e-324, 0.0, -5e-324, 0.0, -4.0], [0.0, 0.0, -np.inf, 0.0, -np.inf, 0.0],
         3.2378592100206e-319),
        # differences of z that overflow while z / eps spreads over ~1.2
        # (eps = 1.5e308; found by the fuzzer)
        ([big, 0.0, 4.0, -4.0, 1.0, -1e300, 0.0], [1.0, -3.0, 0.0, 0.0, 2.0, 4.0, -4.0],
         1.5163098030887238e308),
        ([big, -big, 0.5 * big, 1.0], [0.3, -2.0, 1.0, 0.0], 1e308),
    ]


def test_kl_spreads_past_the_largest_double(eng):
    """kl rows whose spread of z / eps or of w is wider than a double (the
    pooling tests' differences of references overflow, and compared inf with
    inf): against the min-max reduction in mpmath, within [min w, max w].
    Found by the fuzzer (w of +-DBL_MAX at eps = 1e-320 pooled a block it
    should not)."""
    for z, w, eps in _kl_spread_cases():
        z = np.asarray(z, dtype=np.float64)
        w = np.asarray(w, dtype=np.float64)
        ref = _exact_projection(z, w, eps, "kl")
        got = _project(eng, z, w, eps, KL)
        assert np.all(got >= w.min()) and np.all(got <= w.max()), (z, w, eps, got)
        zeros = np.isneginf(ref)  # (zeros of e^out, where w holds -inf)
        np.testing.assert_array_equal(np.isneginf(got), zeros)
        assert R.rel_err(got[~zeros], ref[~zeros]) <= 1e-12, (z, w, eps, got, ref)


def _l2_subnormal_cases():
    """l2 rows of subnormal z at a subnormal eps, where z / eps is of order 1."""
    tiny = 5e-324  # 2^-1074, the subnormal grid's step
    rng = np.random.default_rng(23)
    return [
        # z / eps = (1/3, 0) against w apart by 0.3: no pool, but eps (w_a - w_b)
        # = 0.9 steps rounds to the step that z_a - z_b is, and pooled
        ([tiny, 0.0], [0.3, 0.0], 3 * tiny),
        ([0.0, tiny], [0.0, 0.3], 3 * tiny),
        # a pooled block whose mean offset (-tiny / 4) is off the grid, beside
        # 2^1014, which leaves no room to scale the row up
        ([0.0, -tiny, 0.0, 0.0, 2.0**1014], [1.0, 1.0, 1.0, 0.0, 2.0], 3 * tiny),
        # the fuzzer's row: a block of 0 and -tiny (their mean offset is not
        # on the subnormal grid) beside -1e300 and 1, at eps = 3.2e-319
        ([0.0, -1e300, 0.0, -tiny] + [0.0] * 3 + [1.0] + [0.0] * 23,
         [0.0, -2.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0] + [0.0] * 4 + [-4.0, 2.0] + [0.0] * 16,
         3.2378592100206092e-319),
        # random subnormal z and small w, with and without a large outlier
        (rng.integers(-40, 41, size=20) * tiny, rng.normal(size=20), 7.3 * tiny),
        (np.r_[rng.integers(-40, 41, size=11) * tiny, 1e10], rng.normal(size=12), 1e-320),
        (rng.integers(-3000, 3001, size=30) * tiny, rng.normal(size=30) * 1e-3, 3e-310),
    ]


def test_l2_subnormal_z_at_subnormal_eps(eng):
    """l2 rows whose z and eps are subnormal (z / eps of order 1): against the
    min-max reduction in mpmath. The engines' block means and their pooling
    test rounded on the subnormal grid, amplified by 1 / eps (found by the
    fuzzer: sum(w) off by 1e-5)."""
    for z, w, eps in _l2_subnormal_cases():
        z = np.asarray(z, dtype=np.float64)
        w = np.asarray(w, dtype=np.float64)
        ref = _exact_projection(z, w, eps, "l2")
        got = _project(eng, z, w, eps, L2)
        scale = np.abs(w).max()
        assert np.abs(got - ref).max() <= 1e-13 * scale, (z, w, eps, got, ref)
        assert abs(got.sum() - w.sum()) <= 1e-13 * scale * len(w), (got.sum(), w.sum())


def test_kl_minus_infinity_in_w(eng):
    """kl with zeros of e^w: the top-k mask. Against the brute force with those w set to
    -40 (e^-40 is below float64's resolution next to the other entries) and against
    the min-max reduction, which handles -inf itself."""
    rng = np.random.default_rng(6)
    for n, k in ((2, 1), (4, 2), (5, 1), (6, 3), (6, 5)):
        z = rng.normal(size=n) * 2.0
        z[1] = z[0]  # a tie
        w = np.full(n, -np.inf)
        w[rng.permutation(n)[:k]] = 0.0  # k ones of e^w, in any order
        for eps in (0.3, 1.0, 4.0):
            got = _project(eng, z, w, eps, KL)
            with np.errstate(over="ignore"):  # the reference's line search tries long steps
                brute = R.project_bruteforce(z / eps, np.where(np.isinf(w), -40.0, w), "kl")
            np.testing.assert_allclose(np.exp(got), np.exp(brute), rtol=0, atol=1e-10)
            np.testing.assert_allclose(got, R.project_minmax(z / eps, w, "kl"), rtol=1e-12)
            assert abs(np.exp(got).sum() - k) <= 1e-12 * k
        # the hard limit: the k largest get 1, ties at the boundary share
        got = np.exp(_project(eng, z, w, 0.0, KL))
        np.testing.assert_allclose(got, np.exp(_hard_limit(z, w, KL)), rtol=1e-14, atol=0)
    # w of -inf only: the row is NaN
    out, pz, pw, bs = eng.projection_forward(_row([1.0, 2.0]), _row([-np.inf, -np.inf]), 1.0, KL)
    assert np.all(np.isnan(out))


@pytest.mark.parametrize("reg", [L2, KL])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nonfinite_rows_give_nan(eng, reg, dtype):
    rng = np.random.default_rng(7)
    n = 6
    z = rng.normal(size=(7, n))
    w = rng.normal(size=(7, n))
    z[1, 2] = np.nan
    z[2, 0] = np.inf
    z[3, 5] = -np.inf
    w[4, 1] = np.nan
    w[5, 3] = np.inf
    w[6, 4] = -np.inf  # NaN under l2; a zero of e^w under kl
    z, w = z.astype(dtype), w.astype(dtype)
    out, pz, pw, bs = eng.projection_forward(z, w, 0.5, reg)
    assert out.dtype == dtype
    bad = [1, 2, 3, 4, 5] + ([6] if reg == L2 else [])
    ident = np.arange(n)
    for r in bad:
        assert np.all(np.isnan(out[r])), r
        np.testing.assert_array_equal(pz[r], ident)
        np.testing.assert_array_equal(pw[r], ident)
        np.testing.assert_array_equal(bs[r], ident)
    for r in sorted(set(range(7)) - set(bad)):
        one, *_ = eng.projection_forward(z[r:r + 1].copy(), w[r:r + 1].copy(), 0.5, reg)
        np.testing.assert_array_equal(out[r], one[0])
        assert np.all(np.isfinite(out[r]))


def _check_blocks(bs):
    """block_start is a partition of every row into contiguous blocks."""
    n = bs.shape[1]
    idx = np.arange(n)
    for b in bs:
        if n == 0:
            continue
        assert b[0] == 0
        assert np.all((b >= 0) & (b <= idx))
        assert np.all((b[1:] == b[:-1]) | (b[1:] == idx[1:]))
        assert np.all(b[b] == b)


@pytest.mark.parametrize("reg", [L2, KL])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_structure_perms_and_blocks(eng, reg, dtype):
    rng = np.random.default_rng(8)
    rows, n = 12, 25
    z = rng.normal(size=(rows, n))
    z[:4] = rng.integers(-2, 3, size=(4, n))
    z[0, :5] = -0.0
    z[0, 5:9] = 0.0  # signed zeros tie
    w = rng.normal(size=(rows, n)) * 2.0
    w[4:8] = rng.integers(-2, 3, size=(4, n))
    z, w = np.ascontiguousarray(z, dtype), np.ascontiguousarray(w, dtype)
    for eps in (0.0, 0.3, 2.0, np.inf):
        out, pz, pw, bs = eng.projection_forward(z, w, eps, reg)
        assert pz.dtype == np.int32 and pw.dtype == np.int32 and bs.dtype == np.int32
        assert out.shape == pz.shape == pw.shape == bs.shape == z.shape
        np.testing.assert_array_equal(pz, np.argsort(-z, axis=1, kind="stable"))
        np.testing.assert_array_equal(pw, np.argsort(-w, axis=1, kind="stable"))
        _check_blocks(bs)
        if eps in (0.0, np.inf):
            continue
        # The isotonic dual v = s / eps - (sorted out) is constant on each block and
        # non-increasing from block to block (blocks of equal value stay apart:
        # z tied where w is tied, projection.h).
        s = np.take_along_axis(z.astype(np.float64), pz.astype(np.int64), 1) / eps
        so = np.take_along_axis(out.astype(np.float64), pz.astype(np.int64), 1)
        v = s - so
        tol = (1e-4 if dtype == np.float32 else 1e-11) * (1 + np.abs(s).max())
        for r in range(rows):
            starts = np.unique(bs[r])
            for a, b in zip(starts, list(starts[1:]) + [n]):
                assert np.ptp(v[r, a:b]) <= tol, (eps, r, a, b)
            heads = v[r, starts]
            assert np.all(np.diff(heads) < tol), (eps, r)


def _logcumsumexp(a):
    top = np.max(a)
    return top + np.log(np.cumsum(np.exp(a - top)))


@pytest.mark.parametrize("reg", [L2, KL])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_large_rows_optimality_certificate(eng, reg, dtype):
    """n beyond the small-n sorting paths: the output is certified optimal by the isotonic
    dual's conditions. With s = z / eps and ws = w sorted decreasingly, and out sorted
    like z (so), v = s - so must be constant on each block, decreasing across blocks, and
    on each block so must be majorized by ws: prefix sums (l2) / prefix log-sum-exps (kl)
    of so at most those of ws, equal over the whole block (so the block's v is the
    mean / LSE difference and no block can be split)."""
    rng = np.random.default_rng(13)
    for n in (129, 300, 1000):
        z = rng.normal(size=(3, n)) * 2.0
        z[0] = rng.integers(-20, 21, size=n)  # many ties
        w = rng.normal(size=(3, n)) * 2.0
        w[1] = rng.integers(-5, 6, size=n)
        z, w = np.ascontiguousarray(z, dtype), np.ascontiguousarray(w, dtype)
        for eps in (0.01, 1.0, 100.0):
            out, pz, pw, bs = eng.projection_forward(z, w, eps, reg)
            np.testing.assert_array_equal(pz, np.argsort(-z, axis=1, kind="stable"))
            np.testing.assert_array_equal(pw, np.argsort(-w, axis=1, kind="stable"))
            _check_blocks(bs)
            for r in range(3):
                srt = z[r].astype(np.float64)[pz[r]] / eps
                so = out[r].astype(np.float64)[pz[r]]
                ws = w[r].astype(np.float64)[pw[r]]
                v = srt - so
                unit = 1e-5 if dtype == np.float32 else 1e-12
                tol = unit * (1.0 + np.abs(srt).max() + np.abs(ws).max()) * np.sqrt(n)
                starts = np.unique(bs[r])
                assert np.all(np.diff(v[starts]) < tol), (n, eps, r)
                for a, b in zip(starts, list(starts[1:]) + [n]):
                    assert np.ptp(v[a:b]) <= tol, (n, eps, r, a, b)
                    if reg == L2:
                        lhs, rhs = np.cumsum(so[a:b]), np.cumsum(ws[a:b])
                        block_tol = tol * (b - a)
                    else:
                        lhs, rhs = _logcumsumexp(so[a:b]), _logcumsumexp(ws[a:b])
                        block_tol = tol
                    assert np.all(lhs <= rhs + block_tol), (n, eps, r, a, b)
                    assert abs(lhs[-1] - rhs[-1]) <= block_tol, (n, eps, r, a, b)


@pytest.mark.parametrize("reg", [L2, KL])
def test_long_row_alone_or_in_a_batch_same_bits(eng, reg):
    """A row of 20000 alone (its two sorts then run on two threads in the
    compiled core), in a batch of three (one row per task), and on one
    thread: the same bits. Non-finite entries of z or w in the row alone
    give NaN; -inf in w (kl) is a zero of e^w, as in the batch."""
    rng = np.random.default_rng(15)
    n = 20000
    z = rng.normal(size=(3, n)) * 50.0
    w = rng.normal(size=(3, n)) * 10.0
    z[1, ::7] = z[1, 3]  # ties
    if reg == KL:
        w[2, ::5] = -np.inf
    threads = eng.get_num_threads()
    try:
        for count in (2, 1):
            eng.set_num_threads(count)
            batch = eng.projection_forward(z, w, 0.5, reg)
            for r in range(3):
                alone = eng.projection_forward(z[r:r + 1].copy(), w[r:r + 1].copy(), 0.5, reg)
                for got, want in zip(alone, batch):
                    np.testing.assert_array_equal(got[0], want[r])
        eng.set_num_threads(2)
        assert np.isfinite(batch[0]).all()
        for where, bad in (("z", np.nan), ("z", -np.inf), ("w", np.nan), ("w", np.inf)):
            zz, ww = z[:1].copy(), w[:1].copy()
            (zz if where == "z" else ww)[0, n - 3] = bad
            out, pz, pw, bs = eng.projection_forward(zz, ww, 0.5, reg)
            assert np.isnan(out).all()
            np.testing.assert_array_equal(bs[0], np.arange(n))
    finally:
        eng.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reg", [L2, KL])
def test_forward_value_equals_forward_out(eng, reg, dtype):
    """projection_forward_value is projection_forward's out bit for bit: rows
    short and long enough for the value-only sort of w (the compiled core
    sorts w's values without their order from 129 on), ties and -0.0 in w,
    a shared w, (kl) -inf in w, NaN and inf rows, eps 0 and inf, one and two
    threads, empty shapes."""
    rng = np.random.default_rng(17)
    cases = []
    for n in (5, 128, 129, 1000, 5000):
        z = rng.normal(size=(4, n)) * 3.0
        w = rng.normal(size=(4, n)) * 2.0
        w[1] = np.round(w[1])  # ties
        w[1, ::7] = -0.0
        w[2] = w[3]  # a shared w
        if reg == KL:
            w[3, ::5] = -np.inf
        else:
            w[3, 2] = np.inf  # an invalid row
        z[0, n // 2] = np.nan
        cases.append((z, w))
    cases += [(np.zeros((0, 4)), np.zeros((0, 4))), (np.zeros((3, 0)), np.zeros((3, 0)))]
    threads = eng.get_num_threads()
    try:
        for count in (1, 2):
            eng.set_num_threads(count)
            for z, w in cases:
                z, w = z.astype(dtype), w.astype(dtype)
                for eps in (0.0, 0.5, np.inf):
                    want = eng.projection_forward(z, w, eps, reg)[0]
                    got = eng.projection_forward_value(z, w, eps, reg)
                    assert got.dtype == z.dtype and got.shape == z.shape
                    np.testing.assert_array_equal(got, want)
    finally:
        eng.set_num_threads(threads)
    with pytest.raises((ValueError, TypeError), match="w"):
        eng.projection_forward_value(np.zeros((2, 3)), np.zeros((2, 4)), 1.0, reg)


@pytest.mark.parametrize("reg", [L2, KL])
def test_rows_sharing_w_same_bits_as_rows_alone(eng, reg):
    """Rows whose w equals the previous row's reuse its sorted w (the
    compiled core): every output and permutation is the same, bit for bit,
    as each row projected alone, on one thread or two, also around a NaN
    row, a changed w, a -0.0 for a +0.0, ties, and (kl) -inf in w."""
    rng = np.random.default_rng(16)
    rows, n = 12, 300
    w_shared = np.round(rng.normal(size=n) * 4.0)  # ties
    w_shared[::11] = 0.0
    if reg == KL:
        w_shared[::13] = -np.inf
    w = np.tile(w_shared, (rows, 1))
    w[5] = rng.normal(size=n)  # a row with another w, between shared ones
    w[8, w_shared == 0.0] = -0.0  # the same values, other bits
    z = rng.normal(size=(rows, n)) * 20.0
    z[3, 7] = np.nan  # an invalid row in the middle of a run of shared w
    threads = eng.get_num_threads()
    try:
        for count in (1, 2):
            eng.set_num_threads(count)
            batch = eng.projection_forward(z, w, 0.7, reg)
            for r in range(rows):
                alone = eng.projection_forward(z[r:r + 1].copy(), w[r:r + 1].copy(), 0.7, reg)
                for got, want in zip(alone, batch):
                    np.testing.assert_array_equal(got[0], want[r])
            assert np.isnan(batch[0][3]).all() and np.isfinite(batch[0][[2, 4, 11]]).all()
    finally:
        eng.set_num_threads(threads)


@pytest.mark.parametrize("reg", [L2, KL])
def test_float32_close_to_float64(eng, reg):
    rng = np.random.default_rng(9)
    z = rng.normal(size=(5, 30))
    w = rng.normal(size=(5, 30))
    for eps in (0.1, 1.0):
        o64, *_ = eng.projection_forward(z, w, eps, reg)
        o32, *_ = eng.projection_forward(z.astype(np.float32), w.astype(np.float32), eps, reg)
        assert o32.dtype == np.float32
        np.testing.assert_allclose(o32, o64, rtol=2e-5, atol=2e-5 * np.abs(o64).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0)])
def test_empty_shapes(eng, dtype, shape):
    for reg in (L2, KL):
        out, pz, pw, bs = eng.projection_forward(np.zeros(shape, dtype), np.zeros(shape, dtype),
                                                 1.0, reg)
        assert out.shape == pz.shape == pw.shape == bs.shape == shape
        assert out.dtype == dtype
        sol, bs = eng.isotonic_forward(np.zeros(shape, dtype), None, True, reg)
        assert sol.shape == bs.shape == shape and sol.dtype == dtype


def test_projection_argument_checks(eng):
    z = np.zeros((2, 3))
    with pytest.raises((ValueError, TypeError), match="w"):
        eng.projection_forward(z, np.zeros((2, 4)), 1.0, L2)
    with pytest.raises((ValueError, TypeError), match="w"):
        eng.projection_forward(z, np.zeros((2, 3), np.float32), 1.0, L2)
    with pytest.raises(ValueError, match="reg"):
        eng.projection_forward(z, z, 1.0, 2)
    for eps in (-1.0, np.nan):
        with pytest.raises(ValueError, match="eps"):
            eng.projection_forward(z, z, eps, L2)
    with pytest.raises(ValueError, match="reg"):
        eng.isotonic_forward(z, None, True, 5)


@pytest.mark.skipif(len(BACKENDS) < 2, reason="needs both the native and the numba engine")
def test_engines_agree():
    saved = (_engine._engine, _engine._engine_name)
    results = {}
    rng = np.random.default_rng(10)
    z = rng.normal(size=(40, 33)) * 3.0
    z[:10] = rng.integers(-2, 3, size=(10, 33))
    w = rng.normal(size=(40, 33))
    w[10:20] = rng.integers(-2, 3, size=(10, 33))
    wk = w.copy()
    wk[20:30, ::3] = -np.inf
    y = rng.normal(size=(40, 33))
    weights = rng.uniform(0.1, 3.0, size=(40, 33))
    try:
        for name in BACKENDS:
            _engine.force_backend(name)
            e = _engine.engine()
            res = []
            for eps in (0.0, 0.01, 1.0, 50.0, np.inf):
                res.append(e.projection_forward(z, w, eps, L2))
                res.append(e.projection_forward(z, wk, eps, KL))
            for reg in (L2, KL):
                for inc in (True, False):
                    res.append(e.isotonic_forward(y, weights, inc, reg))
                    res.append(e.isotonic_forward(y, None, inc, reg))
            results[name] = res
    finally:
        _engine._engine, _engine._engine_name = saved
    a, b = (results[name] for name in BACKENDS[:2])
    for ra, rb in zip(a, b):
        np.testing.assert_allclose(ra[0], rb[0], rtol=1e-12, atol=1e-12)
        for ia, ib in zip(ra[1:], rb[1:]):
            np.testing.assert_array_equal(ia, ib)


# ---------------------------------------------------------------------------
# isotonic_forward


@pytest.mark.parametrize("increasing", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_isotonic_l2_matches_minmax(eng, increasing, weighted):
    rng = np.random.default_rng(11)
    y = rng.normal(size=(6, 15))
    y[:2] = rng.integers(-2, 3, size=(2, 15))
    w = rng.uniform(0.1, 4.0, size=y.shape) if weighted else None
    sol, bs = eng.isotonic_forward(y, w, increasing, L2)
    _check_blocks(bs)
    for r in range(len(y)):
        ref = R.isotonic_minmax(y[r], None if w is None else w[r], increasing)
        np.testing.assert_allclose(sol[r], ref, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("increasing", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_isotonic_kl_matches_reference(eng, increasing, weighted, dtype):
    rng = np.random.default_rng(12)
    y = rng.normal(size=(6, 15)) * 2.0
    y[:2] = rng.integers(-2, 3, size=(2, 15))
    w = rng.uniform(0.1, 4.0, size=y.shape) if weighted else None
    y = y.astype(dtype)
    w = None if w is None else w.astype(dtype)
    sol, bs = eng.isotonic_forward(y, w, increasing, KL)
    assert sol.dtype == dtype
    _check_blocks(bs)
    tol = 1e-12 if dtype == np.float64 else 2e-6
    for r in range(len(y)):
        ref = R.isotonic_kl_ref(y[r], None if w is None else w[r], increasing)
        np.testing.assert_allclose(sol[r], ref, rtol=tol, atol=tol)
        # block_start is where the solution changes value
        changes = np.flatnonzero(np.diff(sol[r]) != 0) + 1
        np.testing.assert_array_equal(np.unique(bs[r]), np.concatenate([[0], changes]))


def test_isotonic_kl_nonfinite_rows(eng):
    y = np.array([[1.0, np.nan, 0.0], [1.0, np.inf, 0.0], [0.5, 0.2, 0.1]])
    sol, bs = eng.isotonic_forward(y, None, True, KL)
    assert np.all(np.isnan(sol[:2])) and np.all(bs[:2] == -1)
    assert np.all(np.isfinite(sol[2]))


def test_kl_projection_of_values_at_both_ends_of_the_doubles(eng):
    """Found by the fuzzer: a kl row holding -DBL_MAX and nearly DBL_MAX pools
    into one block wider than a double, formed at half scale; rounding took
    the doubled output of -DBL_MAX to -inf, outside [min w, max w]. With z = w
    (a vertex of P(w)) the projection is z itself."""
    big, dbl_max = float.fromhex("0x1.fffffffp+1023"), np.finfo(np.float64).max
    z = _row([big, 1.0, 0.0, -dbl_max])
    out, _, _, block_start = eng.projection_forward(z, z.copy(), 1.0, KL)
    assert out[0, 0] == big and out[0, 3] == -dbl_max, out
    assert np.all(np.isfinite(out)) and np.all(out >= -dbl_max) and np.all(out <= big), out
