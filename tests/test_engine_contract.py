"""The raw engine contract (softrank._engine docstring), for every engine present.

These tests call the engines directly on C-contiguous ``(rows, n)`` arrays:
the sorting permutation, the PAV block bookkeeping, the NaN-row rule, empty
shapes, dtypes, argument checking, thread-count invariance, and -- when both
the compiled core and the numba engine are importable -- their agreement to
1e-12 in float64. The public API is tested against independent references in
the other test files.
"""
from __future__ import annotations

import numpy as np
import pytest

from softrank import _engine

BACKENDS = _engine.available_backends()
OPS = (_engine.OP_RANK, _engine.OP_SORT)
REGS = (_engine.REG_L2, _engine.REG_KL)
EPS_ALL = (0.0, 1e-3, 0.1, 1.0, 10.0, 1e6, np.inf)


@pytest.fixture(params=BACKENDS)
def eng(request):
    """The engine module under test, installed as the process's engine."""
    saved = (_engine._engine, _engine._engine_name)
    _engine.force_backend(request.param)
    try:
        yield _engine.engine()
    finally:
        _engine._engine, _engine._engine_name = saved


def _xprime(x, op, descending):
    """x' of ALGORITHM.md: x for an ascending rank or a descending sort, else -x."""
    sign = 1.0 if (op == _engine.OP_RANK) != descending else -1.0
    return sign * x.astype(np.float64) + 0.0


def _tied_rows(rng, rows, n):
    """Rows with many ties (small integers), signed zeros included."""
    x = rng.integers(-3, 4, size=(rows, n)).astype(np.float64)
    x[x == 0] = np.where(rng.random(np.count_nonzero(x == 0)) < 0.5, 0.0, -0.0)
    return np.ascontiguousarray(x)


def _check_blocks(bs):
    """block_start is a valid partition of every row into contiguous blocks."""
    rows, n = bs.shape
    for r in range(rows):
        b = bs[r]
        if n == 0:
            continue
        assert b[0] == 0
        idx = np.arange(n)
        assert np.all(b <= idx)
        assert np.all(b >= 0)
        # Contiguous: each position continues the previous block or starts one.
        assert np.all((b[1:] == b[:-1]) | (b[1:] == idx[1:]))
        assert np.all(b[b] == b)


# ---------------------------------------------------------------------------
# Forward state: perm and block_start
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.7, np.inf])
def test_perm_is_stable_decreasing_sort_of_xprime(eng, op, descending, eps):
    rng = np.random.default_rng(1)
    x = np.concatenate([_tied_rows(rng, 4, 23), rng.normal(size=(3, 23))])
    for reg in REGS:
        _, perm, bs = eng.soft_forward(x, op, reg, descending, eps)
        assert perm.dtype == np.int32 and bs.dtype == np.int32
        assert perm.shape == x.shape and bs.shape == x.shape
        xp = _xprime(x, op, descending)
        expected = np.argsort(-xp, axis=1, kind="stable")
        np.testing.assert_array_equal(perm, expected)
        _check_blocks(bs)


def test_signed_zeros_tie_in_column_order(eng):
    x = np.array([[0.0, -0.0, 0.0, -0.0, -0.0, 0.0]])
    for op in OPS:
        for descending in (False, True):
            _, perm, bs = eng.soft_forward(x, op, _engine.REG_L2, descending, 1.0)
            np.testing.assert_array_equal(perm[0], np.arange(6))
            out, _, _ = eng.soft_forward(x, _engine.OP_RANK, _engine.REG_L2, descending, 0.0)
            np.testing.assert_array_equal(out[0], np.full(6, 3.5))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("descending", [False, True])
def test_block_start_structure(eng, op, reg, descending):
    rng = np.random.default_rng(2)
    x = np.concatenate([_tied_rows(rng, 3, 31), rng.normal(size=(3, 31)) * 3])
    for eps in EPS_ALL:
        _, _, bs = eng.soft_forward(x, op, reg, descending, eps)
        _check_blocks(bs)
        if eps == np.inf:
            np.testing.assert_array_equal(bs, 0)
        if eps == 0.0 and op == _engine.OP_SORT:
            np.testing.assert_array_equal(bs, np.broadcast_to(np.arange(31), bs.shape))
        if eps == 0.0 and op == _engine.OP_RANK:
            # Blocks are exactly the runs of equal sorted values.
            xs = np.take_along_axis(_xprime(x, op, descending), np.argsort(
                -_xprime(x, op, descending), axis=1, kind="stable"), axis=1)
            starts = np.ones_like(xs, dtype=bool)
            starts[:, 1:] = xs[:, 1:] != xs[:, :-1]
            np.testing.assert_array_equal(bs == np.arange(31), starts)


# ---------------------------------------------------------------------------
# Special strengths
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("descending", [False, True])
def test_hard_operator_eps_zero(eng, reg, descending):
    rng = np.random.default_rng(3)
    x = _tied_rows(rng, 5, 17)
    rank, _, _ = eng.soft_forward(x, _engine.OP_RANK, reg, descending, 0.0)
    srt, _, _ = eng.soft_forward(x, _engine.OP_SORT, reg, descending, 0.0)
    for r in range(x.shape[0]):
        v = -x[r] if descending else x[r]
        # Average ranks of ties, 1 = smallest v.
        expected = np.array([np.sum(v < a) + (np.sum(v == a) + 1) / 2 for a in v])
        np.testing.assert_array_equal(rank[r], expected)
        expected_sort = np.sort(x[r])[::-1] if descending else np.sort(x[r])
        np.testing.assert_array_equal(srt[r], expected_sort)


@pytest.mark.parametrize("descending", [False, True])
def test_limit_eps_inf(eng, descending):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 9)) * 2
    n = x.shape[1]
    for reg in REGS:
        rank, _, _ = eng.soft_forward(x, _engine.OP_RANK, reg, descending, np.inf)
        np.testing.assert_array_equal(rank, (n + 1) / 2)
    mean, _, _ = eng.soft_forward(x, _engine.OP_SORT, _engine.REG_L2, descending, np.inf)
    np.testing.assert_allclose(mean, np.broadcast_to(x.mean(1, keepdims=True), x.shape), rtol=1e-14)
    lme, _, _ = eng.soft_forward(x, _engine.OP_SORT, _engine.REG_KL, descending, np.inf)
    # The sort kl limit of x' is its log-mean-exp, mapped back by the direction's sign.
    sgn = 1.0 if descending else -1.0
    expected = sgn * np.log(np.mean(np.exp(sgn * x), axis=1, keepdims=True))
    np.testing.assert_allclose(lme, np.broadcast_to(expected, x.shape), rtol=1e-13)


# ---------------------------------------------------------------------------
# Backward passes: consistency of the stored state
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("reg", REGS)
def test_vjp_jvp_are_adjoint(eng, op, reg):
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.normal(size=(3, 12)), _tied_rows(rng, 2, 12)])
    g = rng.normal(size=x.shape)
    t = rng.normal(size=x.shape)
    for descending in (False, True):
        for eps in (0.0, 0.05, 1.0, 30.0, np.inf):
            state = eng.soft_forward(x, op, reg, descending, eps)
            vjp = eng.soft_vjp(x, *state, g, op, reg, descending, eps)
            jvp = eng.soft_jvp(x, *state, t, op, reg, descending, eps)
            lhs = np.sum(vjp * t, axis=1)
            rhs = np.sum(g * jvp, axis=1)
            scale = np.maximum(1.0, np.abs(vjp).max(1) * np.abs(t).max(1) * x.shape[1])
            assert np.all(np.abs(lhs - rhs) <= 1e-12 * scale)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("descending", [False, True])
def test_vjp_matches_finite_differences(eng, op, reg, descending):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(1, 7))
    g = rng.normal(size=x.shape)
    eps = 0.8
    state = eng.soft_forward(x, op, reg, descending, eps)
    vjp = eng.soft_vjp(x, *state, g, op, reg, descending, eps)
    h = 1e-6
    fd = np.empty(7)
    for j in range(7):
        e = np.zeros_like(x)
        e[0, j] = h
        fp = eng.soft_forward(x + e, op, reg, descending, eps)[0]
        fm = eng.soft_forward(x - e, op, reg, descending, eps)[0]
        fd[j] = np.sum(g * (fp - fm)) / (2 * h)
    np.testing.assert_allclose(vjp[0], fd, rtol=1e-6, atol=1e-7)


def test_eps_zero_gradients(eng):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 6))
    g = rng.normal(size=x.shape)
    for reg in REGS:
        for descending in (False, True):
            st = eng.soft_forward(x, _engine.OP_RANK, reg, descending, 0.0)
            np.testing.assert_array_equal(
                eng.soft_vjp(x, *st, g, _engine.OP_RANK, reg, descending, 0.0), 0.0)
            st = eng.soft_forward(x, _engine.OP_SORT, reg, descending, 0.0)
            vjp = eng.soft_vjp(x, *st, g, _engine.OP_SORT, reg, descending, 0.0)
            expected = np.empty_like(g)
            np.put_along_axis(expected, st[1].astype(np.int64), g, axis=1)
            np.testing.assert_array_equal(vjp, expected)


# ---------------------------------------------------------------------------
# NaN rows, empty shapes, dtypes, threads
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("eps", [0.0, 0.5, np.inf])
def test_nan_row_rule(eng, op, reg, eps):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(6, 8))
    x[1, 3] = np.nan
    x[2, 0] = np.inf
    x[4, 7] = -np.inf
    bad = np.array([False, True, True, False, True, False])
    g = rng.normal(size=x.shape)
    out, perm, bs = eng.soft_forward(x, op, reg, False, eps)
    vjp = eng.soft_vjp(x, out, perm, bs, g, op, reg, False, eps)
    jvp = eng.soft_jvp(x, out, perm, bs, g, op, reg, False, eps)
    assert np.all(np.isnan(out[bad]))
    assert np.all(bs[bad] == -1)
    assert np.all(np.isnan(vjp[bad])) and np.all(np.isnan(jvp[bad]))
    good = x[~bad].copy()
    out_g, perm_g, bs_g = eng.soft_forward(good, op, reg, False, eps)
    np.testing.assert_array_equal(out[~bad], out_g)
    np.testing.assert_array_equal(perm[~bad], perm_g)
    np.testing.assert_array_equal(bs[~bad], bs_g)
    gg = g[~bad].copy()
    np.testing.assert_array_equal(
        vjp[~bad], eng.soft_vjp(good, out_g, perm_g, bs_g, gg, op, reg, False, eps))
    np.testing.assert_array_equal(
        jvp[~bad], eng.soft_jvp(good, out_g, perm_g, bs_g, gg, op, reg, False, eps))


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0, 0), (2, 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_and_single(eng, shape, dtype):
    x = np.ones(shape, dtype)
    for op in OPS:
        for reg in REGS:
            out, perm, bs = eng.soft_forward(x, op, reg, False, 1.0)
            assert out.shape == shape and perm.shape == shape and bs.shape == shape
            assert out.dtype == dtype
            vjp = eng.soft_vjp(x, out, perm, bs, x, op, reg, False, 1.0)
            jvp = eng.soft_jvp(x, out, perm, bs, x, op, reg, False, 1.0)
            assert vjp.shape == shape and vjp.dtype == dtype
            assert jvp.shape == shape and jvp.dtype == dtype
            if shape == (2, 1):
                # n = 1: rank 1, the value itself; gradient 0 (rank) or 1 (sort).
                np.testing.assert_array_equal(out, 1.0)
                np.testing.assert_array_equal(vjp, 0.0 if op == _engine.OP_RANK else 1.0)
    sol, bs = eng.isotonic_forward(x, None, True)
    assert sol.shape == shape and sol.dtype == dtype and bs.shape == shape
    grad = eng.isotonic_vjp(None, bs, x)
    assert grad.shape == shape and grad.dtype == dtype


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("reg", REGS)
def test_float32_in_float32_out(eng, op, reg):
    rng = np.random.default_rng(9)
    x64 = rng.normal(size=(4, 10))
    x32 = x64.astype(np.float32)
    g32 = rng.normal(size=x64.shape).astype(np.float32)
    for descending in (False, True):
        for eps in (0.0, 0.3, np.inf):
            out, perm, bs = eng.soft_forward(x32, op, reg, descending, eps)
            assert out.dtype == np.float32
            assert perm.dtype == np.int32 and bs.dtype == np.int32
            vjp = eng.soft_vjp(x32, out, perm, bs, g32, op, reg, descending, eps)
            jvp = eng.soft_jvp(x32, out, perm, bs, g32, op, reg, descending, eps)
            assert vjp.dtype == np.float32 and jvp.dtype == np.float32
            # float32 is widened and the double result narrowed once.
            ref, _, _ = eng.soft_forward(x32.astype(np.float64), op, reg, descending, eps)
            np.testing.assert_array_equal(out, ref.astype(np.float32))
    sol, _ = eng.isotonic_forward(x32, None, True)
    assert sol.dtype == np.float32


def _calls(eng):
    """One call per engine function, each taking the x-like array to corrupt."""
    good = np.zeros((2, 4))
    st = eng.soft_forward(good, 0, 0, False, 1.0)
    _, bs_iso = eng.isotonic_forward(good, None, True)
    return [
        ("x", lambda a: eng.soft_forward(a, 0, 0, False, 1.0)),
        ("cotangent", lambda a: eng.soft_vjp(good, *st, a, 0, 0, False, 1.0)),
        ("tangent", lambda a: eng.soft_jvp(good, *st, a, 0, 0, False, 1.0)),
        ("y", lambda a: eng.isotonic_forward(a, None, True)),
        ("weights", lambda a: eng.isotonic_forward(good, a, True)),
        ("cotangent", lambda a: eng.isotonic_vjp(None, bs_iso, a)),
    ]


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 4), np.int64),
        np.zeros((2, 4), np.float16),
        np.zeros((2, 4), np.complex128),
        np.zeros(4),
        np.zeros((1, 2, 4)),
        np.zeros((2, 8))[:, ::2],
        np.asfortranarray(np.zeros((2, 4))),
        np.zeros((3, 4)),
    ],
    ids=["int64", "float16", "complex", "1d", "3d", "strided", "fortran", "shape"],
)
def test_bad_arrays_raise(eng, bad):
    for name, call in _calls(eng):
        if name == "x" and bad.shape == (3, 4):
            continue  # a (3, 4) x is valid on its own
        if name == "y" and bad.shape == (3, 4):
            continue
        with pytest.raises((TypeError, ValueError)) as info:
            call(bad)
        if _engine.backend() == "numba":
            assert name in str(info.value)


def test_bad_state_raises(eng):
    x = np.zeros((2, 4))
    out, perm, bs = eng.soft_forward(x, 0, 0, False, 1.0)
    with pytest.raises((TypeError, ValueError)):
        eng.soft_vjp(x, out, perm.astype(np.int64), bs, x, 0, 0, False, 1.0)
    with pytest.raises((TypeError, ValueError)):
        eng.soft_vjp(x, out, perm, bs[:1], x, 0, 0, False, 1.0)
    with pytest.raises((TypeError, ValueError)):
        eng.soft_vjp(x, out[:, :2], perm, bs, x, 0, 0, False, 1.0)
    with pytest.raises((TypeError, ValueError)):
        eng.isotonic_vjp(None, bs.astype(np.float64), x)


def test_out_of_range_perm_raises_not_crashes(eng):
    x = np.zeros((2, 4))
    for op in OPS:
        out, perm, bs = eng.soft_forward(x, op, 0, False, 1.0)
        perm = perm.copy()
        perm[1, 2] = 10**6
        with pytest.raises(ValueError):
            eng.soft_vjp(x, out, perm, bs, x, op, 0, False, 1.0)
        perm[1, 2] = -1
        with pytest.raises(ValueError):
            eng.soft_jvp(x, out, perm, bs, x, op, 0, False, 1.0)


def test_read_only_inputs(eng):
    # e.g. numpy views of jax arrays are read-only.
    rng = np.random.default_rng(12)
    x = rng.normal(size=(3, 9))
    g = rng.normal(size=x.shape)
    expected = eng.soft_forward(x, 0, 1, False, 0.5)
    expected_vjp = eng.soft_vjp(x, *expected, g, 0, 1, False, 0.5)
    state = [a.copy() for a in expected]
    for a in [x, g] + state:
        a.setflags(write=False)
    got = eng.soft_forward(x, 0, 1, False, 0.5)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(eng.soft_vjp(x, *state, g, 0, 1, False, 0.5), expected_vjp)
    sol, bs = eng.isotonic_forward(x, None, True)
    bs.setflags(write=False)
    eng.isotonic_vjp(None, bs, g)


def test_results_independent_of_thread_count(eng):
    rng = np.random.default_rng(10)
    x = np.concatenate([rng.normal(size=(40, 33)), _tied_rows(rng, 40, 33)])
    g = rng.normal(size=x.shape)
    before = eng.get_num_threads()

    def run():
        res = []
        for op in OPS:
            for reg in REGS:
                st = eng.soft_forward(x, op, reg, True, 0.3)
                res += list(st) + [eng.soft_vjp(x, *st, g, op, reg, True, 0.3)]
        res += list(eng.isotonic_forward(x, None, False))
        return res

    try:
        eng.set_num_threads(1)
        assert eng.get_num_threads() == 1
        one = run()
        eng.set_num_threads(1024)  # clipped to the pool size, not an error
        assert eng.get_num_threads() >= 1
        many = run()
    finally:
        eng.set_num_threads(before)
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# Isotonic regression
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("increasing", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_isotonic_contract(eng, increasing, weighted):
    rng = np.random.default_rng(11)
    y = np.concatenate([rng.normal(size=(4, 25)), _tied_rows(rng, 3, 25)])
    y[5, 4] = np.nan
    w = rng.uniform(0.1, 3.0, size=y.shape) if weighted else None
    g = rng.normal(size=y.shape)
    sol, bs = eng.isotonic_forward(y, w, increasing)
    grad = eng.isotonic_vjp(w, bs, g)
    assert np.all(np.isnan(sol[5])) and np.all(bs[5] == -1) and np.all(np.isnan(grad[5]))
    keep = np.arange(y.shape[0]) != 5
    sol, bs, grad, yk, gk = sol[keep], bs[keep], grad[keep], y[keep], g[keep]
    wk = np.ones_like(yk) if w is None else w[keep]
    _check_blocks(bs)
    diff = np.diff(sol, axis=1)
    assert np.all(diff >= 0) if increasing else np.all(diff <= 0)
    for r in range(yk.shape[0]):
        starts = np.flatnonzero(bs[r] == np.arange(25))
        for s, e in zip(starts, list(starts[1:]) + [25]):
            block_mean = np.sum(wk[r, s:e] * yk[r, s:e]) / np.sum(wk[r, s:e])
            np.testing.assert_allclose(sol[r, s:e], block_mean, rtol=1e-13, atol=1e-13)
            np.testing.assert_allclose(
                grad[r, s:e], wk[r, s:e] / wk[r, s:e].sum() * gk[r, s:e].sum(),
                rtol=1e-13, atol=1e-13)
        # Adjacent blocks hold strictly ordered values (equal ones are pooled).
        vals = sol[r, starts]
        assert np.all(np.diff(vals) > 0) if increasing else np.all(np.diff(vals) < 0)


# ---------------------------------------------------------------------------
# Native vs numba agreement
# ---------------------------------------------------------------------------

_BOTH = "native" in BACKENDS and "numba" in BACKENDS
_MISSING = [b for b in ("native", "numba") if b not in BACKENDS]
needs_both = pytest.mark.skipif(
    not _BOTH,
    reason="engine agreement needs both engines; not importable here: "
    + ", ".join(_MISSING)
    + " (native = the compiled softrank._C, built by the C++ toolchain)",
)


def _agree(a, b, rtol):
    """Equal NaN pattern and |a - b| <= rtol * (largest magnitude in the row)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    a = np.where(np.isnan(a), 0.0, a)
    b = np.where(np.isnan(b), 0.0, b)
    if a.size == 0:
        return
    scale = np.maximum(np.abs(a).max(axis=1, keepdims=True), np.abs(b).max(axis=1, keepdims=True))
    err = np.abs(a - b)
    worst = np.max(err / np.where(scale > 0, scale, 1.0))
    assert worst <= rtol, f"relative disagreement {worst:.3e} > {rtol:.0e}"


def _agreement_inputs(rng):
    """Random shapes with gaussian, tied, large-magnitude and NaN rows."""
    cases = []
    for _ in range(6):
        rows = int(rng.integers(1, 6))
        n = int(rng.choice([0, 1, 2, 3, 5, 8, 17, 40, 129]))
        kind = rng.integers(0, 4)
        if kind == 0:
            x = rng.normal(size=(rows, n))
        elif kind == 1:
            x = _tied_rows(rng, rows, n)
        elif kind == 2:
            x = rng.normal(size=(rows, n)) * 10.0 ** rng.integers(3, 9)
        else:
            x = rng.normal(size=(rows, n)) + 1e6  # |x|/eps large, small gaps
        if rows > 1 and n > 0:
            x[-1, int(rng.integers(n))] = np.nan
        cases.append(np.ascontiguousarray(x))
    cases.append(np.ascontiguousarray(rng.normal(size=(2, 1000))))
    return cases


@needs_both
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("eps", EPS_ALL)
def test_native_numba_agree_soft(op, reg, descending, eps):
    from softrank import _C, _numba

    rng = np.random.default_rng([op, reg, int(descending), EPS_ALL.index(eps)])
    for x in _agreement_inputs(rng):
        g = rng.normal(size=x.shape)
        nat = _C.soft_forward(x, op, reg, descending, eps)
        nb = _numba.soft_forward(x, op, reg, descending, eps)
        _agree(nat[0], nb[0], 1e-12)
        np.testing.assert_array_equal(nat[1][~np.isnan(nb[0])], nb[1][~np.isnan(nb[0])])
        np.testing.assert_array_equal(nat[2], nb[2])
        for fn in ("soft_vjp", "soft_jvp"):
            a = getattr(_C, fn)(x, *nat, g, op, reg, descending, eps)
            b = getattr(_numba, fn)(x, *nb, g, op, reg, descending, eps)
            _agree(a, b, 1e-12)
        # float32: both widen, compute in double and narrow once.
        x32 = x.astype(np.float32)
        _agree(_C.soft_forward(x32, op, reg, descending, eps)[0],
               _numba.soft_forward(x32, op, reg, descending, eps)[0], 1e-6)


@needs_both
@pytest.mark.parametrize("increasing", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_native_numba_agree_isotonic(increasing, weighted):
    from softrank import _C, _numba

    rng = np.random.default_rng([int(increasing), int(weighted)])
    for y in _agreement_inputs(rng):
        w = rng.uniform(0.01, 10.0, size=y.shape) if weighted else None
        g = rng.normal(size=y.shape)
        sa, ba = _C.isotonic_forward(y, w, increasing)
        sb, bb = _numba.isotonic_forward(y, w, increasing)
        _agree(sa, sb, 1e-12)
        np.testing.assert_array_equal(ba, bb)
        _agree(_C.isotonic_vjp(w, ba, g), _numba.isotonic_vjp(w, bb, g), 1e-12)
