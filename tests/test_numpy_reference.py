"""softrank.numpy against independent references (tests/reference.py).

* The references are first checked against each other and against closed forms
  (no engine involved): the brute-force projection over the n! vertices and the
  min-max formula in arbitrary precision agree to ~1e-13, so a 1e-11 tolerance
  for softrank vs brute force leaves two orders of magnitude for the reference
  and for softrank's own float64 rounding.
* Then every op / regularization / direction against the brute force (n <= 6)
  and against the exact min-max reference (larger n), per engine.
* Extreme magnitudes (|x|/eps up to 1e300, eps down to 1e-300 and below) against
  the mpmath reference, where float64 textbook arithmetic loses every digit.
"""
from __future__ import annotations

import functools

import numpy as np
import pytest

import reference as R
from softrank import numpy as srn

OPS = {"rank": (srn.soft_rank, R.soft_rank_ref), "sort": (srn.soft_sort, R.soft_sort_ref)}
DIRECTIONS = ("ascending", "descending")

# Brute-force agreement tolerance: the brute-force reference agrees with the
# correctly rounded min-max reference to < 1e-13 (test_reference_* below
# measures it); softrank's float64 arithmetic with |x|/eps <= ~1e3 adds ~1e-13.
BRUTE_RTOL = 1e-11
# Exact (mpmath, correctly rounded) reference: softrank's own rounding only.
EXACT_RTOL = 1e-12


@functools.lru_cache(maxsize=None)
def _ref(op, reg, direction, eps, xs, method):
    return OPS[op][1](np.array(xs), eps, reg, direction, method=method)


def ref(op, reg, direction, eps, x, method="minmax"):
    return _ref(op, reg, direction, float(eps), tuple(float(v) for v in x), method)


def _brute_cases():
    """Rows of length 1..6: generic, with ties, on a coarse grid."""
    rng = np.random.default_rng(20200208)
    cases = []
    for n in range(1, 7):
        for k in range(3):
            cases.append(rng.normal(size=n) * (0.5, 1.0, 3.0)[k])
        if n >= 2:
            tied = rng.normal(size=n)
            tied[-1] = tied[0]
            cases.append(tied)
            cases.append(rng.integers(-2, 3, size=n).astype(np.float64))
    return cases


BRUTE_CASES = _brute_cases()
BRUTE_EPS = (0.05, 0.3, 1.0, 3.0, 20.0)


# ---------------------------------------------------------------------------
# the references themselves


@pytest.mark.parametrize("reg", ["l2", "kl"])
def test_reference_bruteforce_matches_minmax(reg):
    """Two independent references (vertex enumeration vs min-max formula in
    high precision) agree; this bounds the brute force's solver error."""
    worst = 0.0
    for x in BRUTE_CASES[::2]:
        for eps in (0.05, 1.0, 20.0):
            for op in OPS:
                for d in DIRECTIONS:
                    a = ref(op, reg, d, eps, x, "brute")
                    b = ref(op, reg, d, eps, x, "minmax")
                    worst = max(worst, R.rel_err(a, b))
    assert worst < 1e-12, worst


def test_reference_hand_checked_n2():
    """n = 2 by hand: the permutahedron of (2, 1) is a segment.

    rank l2, ascending: (1.5 + t, 1.5 - t), t = clip((a - b) / (2 eps), -1/2, 1/2).
    sort l2, ascending: (m - t, m + t), m the mean, t = min(1/(2 eps), |a - b|/2).
    """
    for a, b, eps in [(0.3, 0.1, 1.0), (0.3, 0.1, 0.05), (-1.0, 2.0, 10.0), (2.0, 2.0, 1.0)]:
        t = np.clip((a - b) / (2 * eps), -0.5, 0.5)
        for method in ("brute", "minmax"):
            np.testing.assert_allclose(
                R.soft_rank_ref([a, b], eps, "l2", "ascending", method), [1.5 + t, 1.5 - t], rtol=1e-13)
            t2 = min(1 / (2 * eps), abs(a - b) / 2)
            m = (a + b) / 2
            np.testing.assert_allclose(
                R.soft_sort_ref([a, b], eps, "l2", "ascending", method), [m - t2, m + t2], rtol=1e-13)
    # kl rank, n = 2, ascending: the projection of z onto the segment between
    # (2, 1) and (1, 2) in KL geometry; for |a - b|/eps small both coordinates are
    # exp(z_i) * 3 / (exp(z_1) + exp(z_2)) (no active bound), i.e. 3 * softmax.
    a, b, eps = 0.2, 0.0, 1.0
    sm = np.exp([a, b]) / np.exp([a, b]).sum()
    np.testing.assert_allclose(R.soft_rank_ref([a, b], eps, "kl", "ascending", "brute"), 3 * sm, rtol=1e-13)


def test_reference_limits():
    """The references converge to the closed-form limits."""
    rng = np.random.default_rng(1)
    for n in (3, 5, 6):
        x = rng.normal(size=n)
        gap = np.min(np.diff(np.sort(x)))
        for method in ("brute", "minmax"):
            for reg in ("l2", "kl"):
                small = gap / 50
                np.testing.assert_allclose(
                    R.soft_rank_ref(x, small, reg, "ascending", method), R.hard_rank(x), rtol=1e-12)
                np.testing.assert_allclose(
                    R.soft_rank_ref(x, small, reg, "descending", method), R.hard_rank(x, "descending"), rtol=1e-12)
                np.testing.assert_allclose(
                    R.soft_sort_ref(x, 1e-3, reg, "ascending", method), np.sort(x), rtol=1e-12, atol=1e-12)
                big = 1e7
                np.testing.assert_allclose(
                    R.soft_rank_ref(x, big, reg, "ascending", method), np.full(n, (n + 1) / 2), atol=1e-5)
            np.testing.assert_allclose(
                R.soft_sort_ref(x, 1e7, "l2", "ascending", method), np.full(n, x.mean()), atol=1e-5)
            lme = np.log(np.mean(np.exp(x)))
            np.testing.assert_allclose(
                R.soft_sort_ref(x, 1e7, "kl", "descending", method), np.full(n, lme), atol=1e-5)
            # l2, one block: rank = (n+1)/2 + (x - mean)/eps exactly
            np.testing.assert_allclose(
                R.soft_rank_ref(x, 1e3, "l2", "ascending", method),
                (n + 1) / 2 + (x - x.mean()) / 1e3, rtol=1e-13)


# ---------------------------------------------------------------------------
# softrank vs brute force


@pytest.mark.parametrize("reg", ["l2", "kl"])
@pytest.mark.parametrize("op", ["rank", "sort"])
def test_bruteforce_agreement(backend, op, reg):
    fn = OPS[op][0]
    worst = 0.0
    for eps in BRUTE_EPS:
        for d in DIRECTIONS:
            for x in BRUTE_CASES:
                got = fn(x, eps, regularization=reg, direction=d)
                expected = ref(op, reg, d, eps, x, "brute")
                err = R.rel_err(got, expected)
                worst = max(worst, err)
                assert err <= BRUTE_RTOL, (op, reg, d, eps, x.tolist(), got, expected)
    assert np.isfinite(worst)


@pytest.mark.parametrize("reg", ["l2", "kl"])
@pytest.mark.parametrize("op", ["rank", "sort"])
def test_exact_reference_agreement_larger_n(backend, op, reg):
    """n up to 30 against the correctly rounded min-max reference, batched rows."""
    fn = OPS[op][0]
    rng = np.random.default_rng(7)
    for n in (7, 13, 30):
        X = rng.normal(size=(3, n)) * np.array([[0.3], [1.0], [4.0]])
        for eps in (0.01, 0.3, 3.0):
            for d in DIRECTIONS:
                got = fn(X, eps, regularization=reg, direction=d)
                for r in range(X.shape[0]):
                    expected = ref(op, reg, d, eps, X[r])
                    assert R.rel_err(got[r], expected) <= EXACT_RTOL, (op, reg, d, eps, X[r].tolist())


# ---------------------------------------------------------------------------
# extreme magnitudes: exact value from mpmath


def _extreme_cases():
    u = 2.0 ** -52
    k = np.array([0.0, 3.0, 1.0, 7.0, 2.0, 5.0])
    return [
        # (name, x, eps)
        ("|x|/eps=1e300, hard", np.array([1e300, -1e300, 3e299, 0.5, -2.0]), 1.0),
        ("x~1, eps=1e-300", np.array([0.3, -1.2, 2.5, 0.7, 0.70000001]), 1e-300),
        ("x~1e-300, eps=1e-300", np.array([0.3, -1.2, 2.5, 0.7, 1.1]) * 1e-300, 1e-300),
        ("subnormal eps", np.array([0.3, -1.2, 2.5, 0.7]), 1e-310),
        ("x=1+k ulp, eps=ulp (|x|/eps=4.5e15)", 1.0 + k * u, 2.0 * u),
        ("x=1e200(1+k ulp)", 1e200 * (1.0 + k * u), 1e200 * 2.0 * u),
        ("x=-1e8+N(0,1), eps=5 (|x|/eps=2e7)", -1e8 + np.array([0.1, -0.4, 1.3, 0.2, -0.25, 0.9]), 5.0),
        ("x=1e15+k, eps=2", 1e15 + k, 2.0),
        ("x~1e300, eps=1e300", np.array([1.0, -0.5, 0.3, 2.0]) * 1e300, 1e300),
        ("x~1, eps=1e300", np.array([1.0, -0.5, 0.3, 2.0]), 1e300),
        ("sort: x=1e300(1+k ulp), eps=ulp/1e300", 1e300 * (1.0 + k * u), 1.0 / (1e300 * u)),
    ]


EXTREMES = _extreme_cases()


@pytest.mark.parametrize("reg", ["l2", "kl"])
def test_extreme_magnitudes_exact(backend, reg):
    failures = []
    for name, x, eps in EXTREMES:
        for op in OPS:
            for d in DIRECTIONS:
                got = OPS[op][0](x, eps, regularization=reg, direction=d)
                expected = ref(op, reg, d, eps, x)
                assert np.all(np.isfinite(expected)), (name, op, d)
                if not np.all(np.isfinite(got)) or R.rel_err(got, expected) > EXACT_RTOL:
                    failures.append((name, op, d, x.tolist(), eps, got.tolist(), expected.tolist()))
    assert not failures, "\n".join(map(repr, failures))


def test_extreme_reference_is_nontrivial():
    """The soft extreme cases really are soft (not just hard ranks), so the test
    above exercises the cancellation-prone regime."""
    u = 2.0 ** -52
    x = 1.0 + np.array([0.0, 3.0, 1.0, 7.0, 2.0, 5.0]) * u
    r = R.soft_rank_ref(x, 2.0 * u, "kl", "ascending")
    assert np.max(np.abs(r - R.hard_rank(x))) > 0.05
    r = R.soft_rank_ref(x, 2.0 * u, "l2", "ascending")
    assert np.max(np.abs(r - R.hard_rank(x))) > 0.05
    x = -1e8 + np.array([0.1, -0.4, 1.3, 0.2, -0.25, 0.9])
    s = R.soft_sort_ref(x, 5.0, "kl", "ascending")
    assert np.max(np.abs(s - np.sort(x))) > 0.05


def test_kl_sort_small_values_relative_precision(backend):
    cases = [
        (np.array([1e-4, 0.0, 0.0]), 1e5),
        (np.array([1e-16, 2e-16, 3e-16]), 1e40),
        (np.array([1e-16, 2e-16, 3e-16]), np.inf),
        (np.array([3e-9, -1e-9, 2e-9, 0.0]), 1e12),
    ]
    worst = 0.0
    for x, eps in cases:
        for d in DIRECTIONS:
            got = srn.soft_sort(x, eps, regularization="kl", direction=d)
            if np.isinf(eps):
                t = 1.0 if d == "descending" else -1.0
                import mpmath

                with mpmath.workprec(300):
                    lme = mpmath.log(mpmath.fsum(mpmath.exp(t * mpmath.mpf(float(v))) for v in x) / len(x))
                    lme = float(lme)
                expected = np.full(len(x), t * lme)
            else:
                expected = ref("sort", "kl", d, eps, x)
            worst = max(worst, R.rel_err(got, expected))
    assert worst <= 1e-12, worst
