"""Property tests (hypothesis) at the engine level, both engines, with hostile
values: subnormals, 1e300 and DBL_MAX magnitudes, ties, NaN/inf, eps from 0
through subnormals to 1e300 and inf, n = 0 and 1, several rows, float32 and
float64. The oracles of fuzz/fuzz_core.cpp, in Python: the NaN-row rule,
finite outputs, ranks in [1, n] summing to n(n+1)/2 and monotone with equal
ranks for ties, sorted outputs within [min, max] and ordered, rows
independent, no NaN gradient, and native == numba.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softrank import _engine

DBL_MAX = float(np.finfo(np.float64).max)
SPECIAL = [0.0, -0.0, 1.0, -1.0, 2.0, 0.5, 5e-324, -5e-324, 1e-310, 2.2250738585072014e-308,
           1e-300, 1e300, -1e300, DBL_MAX, -DBL_MAX, 1e308, 3.0, 7.0, float("nan"), float("inf"),
           float("-inf")]
EPS = st.one_of(
    st.sampled_from([0.0, 5e-324, 1e-310, 1e-300, 1e-12, 1e-3, 0.3, 1.0, 10.0, 1e6, 1e100, 1e300,
                     DBL_MAX, float("inf")]),
    st.floats(min_value=0.0, max_value=1e300, allow_nan=False),
)
VALUES = st.one_of(
    st.sampled_from(SPECIAL),
    st.integers(-3, 3).map(float),  # ties
    st.floats(allow_nan=True, allow_infinity=True, width=64),
)


@st.composite
def batches(draw):
    rows = draw(st.integers(0, 4))
    n = draw(st.sampled_from([0, 1, 2, 3, 5, 8, 17, 160, 161, 300]))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    flat = draw(st.lists(VALUES, min_size=rows * n, max_size=rows * n))
    with np.errstate(over="ignore"):
        x = np.array(flat, dtype=np.float64).astype(dtype).reshape(rows, n)
    return x


def _check_rows(x, out, op, reg, desc, eps):
    rows, n = x.shape
    f32 = x.dtype == np.float32
    rel = 2e-5 if f32 else 1e-10
    if n == 0:
        return
    for r in range(rows):
        xr = x[r].astype(np.float64)
        o = out[r].astype(np.float64)
        if not np.all(np.isfinite(xr)):
            assert np.all(np.isnan(o))
            continue
        xmax = float(np.max(np.abs(xr))) if n else 0.0
        # Documented limits (csrc/tests/test_regressions.cpp): exactness only.
        if op == 1 and reg == 1 and eps < 1e-300 and xmax > 1e300:
            continue
        if op == 0 and 0 < eps < 2.2250738585072014e-308 and xmax > 2.0**896:
            assert np.all(np.isfinite(o))
            continue
        assert np.all(np.isfinite(o)), (r, o)
        if op == 0:
            assert np.all(o >= 1 - rel * n) and np.all(o <= n + rel * n)
            np.testing.assert_allclose(o.sum(), n * (n + 1) / 2, rtol=rel, atol=1e-9)
            order = np.argsort(xr, kind="stable")
            s = -1.0 if desc else 1.0
            for a, b in zip(order[:-1], order[1:]):
                if xr[a] == xr[b]:
                    assert o[a] == o[b]
                else:
                    assert s * (o[b] - o[a]) >= -rel * n
        else:
            lo, hi = xr.min(), xr.max()
            slack = rel * xmax + (4.0 * n / eps if reg == 1 and 0 < eps < np.inf else 0.0)
            assert np.all(o >= lo - slack) and np.all(o <= hi + slack)
            d = np.diff(o) * (-1.0 if desc else 1.0)
            assert np.all(d >= -(rel * xmax + slack))


@pytest.mark.parametrize("op, reg, desc", [(op, reg, d) for op in (0, 1) for reg in (0, 1) for d in (False, True)])
@settings()  # examples: the profile (tests/conftest.py: ci 40, dev 300)
@given(x=batches(), eps=EPS)
def test_engine_properties(backend, op, reg, desc, x, eps):
    eng = _engine.engine()
    out, perm, blocks = eng.soft_forward(x, op, reg, desc, eps)
    assert out.shape == x.shape and out.dtype == x.dtype
    _check_rows(x, out, op, reg, desc, eps)
    g = np.ones_like(x)
    g[..., ::2] = -0.5
    for fn in (eng.soft_vjp, eng.soft_jvp):
        r = fn(x, out, perm, blocks, g, op, reg, desc, eps)
        finite_rows = np.all(np.isfinite(x), axis=1)
        assert not np.any(np.isnan(r[finite_rows]))
    # Rows are independent: each row alone gives the same bits.
    for i in range(x.shape[0]):
        alone = eng.soft_forward(np.ascontiguousarray(x[i:i + 1]), op, reg, desc, eps)[0]
        assert alone.tobytes() == out[i:i + 1].tobytes()


@pytest.mark.skipif("numba" not in _engine.available_backends()
                    or "native" not in _engine.available_backends(), reason="needs both engines")
@settings()
@given(x=batches(), eps=EPS, code=st.integers(0, 7))
def test_native_and_numba_agree_on_hostile_input(x, eps, code):
    from softrank import _C, _numba

    op, reg, desc = code & 1, (code >> 1) & 1, bool(code & 4)
    a = _C.soft_forward(x, op, reg, desc, eps)
    b = _numba.soft_forward(x, op, reg, desc, eps)
    np.testing.assert_array_equal(a[1], b[1])  # the same order
    np.testing.assert_array_equal(a[2], b[2])  # the same blocks
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6 if x.dtype == np.float32 else 1e-12,
                               atol=0, equal_nan=True)
