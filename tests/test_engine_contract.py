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

import reference as R
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


@pytest.mark.parametrize("bad", [0.0, -1.0, np.inf, np.nan])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_isotonic_weights_must_be_positive_and_finite(eng, bad, dtype):
    """Both engines check the weights they are given (adapters rely on it)."""
    y = np.zeros((2, 4), dtype)
    weights = np.ones((2, 4), dtype)
    weights[1, 3] = bad
    for reg in (_engine.REG_L2, _engine.REG_KL):
        with pytest.raises(ValueError, match="weights must be finite and > 0 everywhere"):
            eng.isotonic_forward(y, weights, True, reg)


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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_forward_value_equals_forward_out(eng, dtype, threads):
    """soft_forward_value is soft_forward's out bit for bit: short rows (the
    network and counting sorts), radix rows, a long row (2^18, which with 2
    threads takes the split-row path), NaN/inf rows, ties, empty shapes."""
    rng = np.random.default_rng(11)
    cases = [
        rng.normal(size=(37, 64)),
        rng.normal(size=(5, 129)),
        np.concatenate([rng.normal(size=(3, 1000)), _tied_rows(rng, 3, 1000)]),
        rng.normal(size=(1, 1 << 18)),
        np.zeros((0, 4)),
        np.zeros((3, 0)),
    ]
    bad = rng.normal(size=(4, 50))
    bad[1, 7], bad[3, 0] = np.nan, -np.inf
    cases.append(bad)
    before = eng.get_num_threads()
    try:
        eng.set_num_threads(threads)
        for x in cases:
            x = np.ascontiguousarray(x, dtype=dtype)
            for op in OPS:
                for reg in REGS:
                    for eps in (0.0, 0.5, np.inf):
                        want = eng.soft_forward(x, op, reg, op == _engine.OP_SORT, eps)[0]
                        got = eng.soft_forward_value(x, op, reg, op == _engine.OP_SORT, eps)
                        assert got.dtype == x.dtype and got.shape == x.shape
                        np.testing.assert_array_equal(got, want)
    finally:
        eng.set_num_threads(before)


def test_returned_arrays_own_their_memory(eng):
    """The native engine recycles freed output buffers of the same size: live
    results never share memory, a reused buffer carries the new values, and
    writing into a result does not reach a later call's result."""
    rng = np.random.default_rng(12)
    xs = [rng.normal(size=(300, 100)) for _ in range(3)]
    g = rng.normal(size=(300, 100))
    want = [eng.soft_forward(x, 0, 1, False, 0.5) for x in xs]
    live = []
    for _ in range(3):
        for x, w in zip(xs, want):
            state = eng.soft_forward(x, 0, 1, False, 0.5)
            for a, b in zip(state, w):
                np.testing.assert_array_equal(a, b)
            grad = eng.soft_vjp(x, *state, g, 0, 1, False, 0.5)
            np.testing.assert_array_equal(grad, eng.soft_vjp(x, *w, g, 0, 1, False, 0.5))
            live += [*state, grad]
        # everything alive at once is pairwise disjoint
        for i in range(len(live)):
            for j in range(i + 1, len(live)):
                assert not np.shares_memory(live[i], live[j])
        for a in live:
            a[...] = -7  # scribble, then free: the next round must not see it
        live.clear()


def test_forward_value_checks_its_arguments(eng):
    with pytest.raises((ValueError, TypeError), match="x"):
        eng.soft_forward_value(np.zeros((2, 3), np.int64), 0, 0, False, 1.0)
    with pytest.raises((ValueError, TypeError), match="x"):
        eng.soft_forward_value(np.zeros(3), 0, 0, False, 1.0)


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
    # Widely spread values (the benchmarks' data): the kl sort pools long
    # blocks whose far terms underflow, and decides merges whose exp factors
    # underflow from bounds on the logs.
    cases.append(np.ascontiguousarray(rng.random((2, 3000)) * 3000.0))
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


@pytest.mark.parametrize("increasing", [True, False])
def test_isotonic_vjp_weighted(eng, increasing):
    """Both l2 gradients in one pass: grad_y is isotonic_vjp's, bit for bit;
    grad_weights is (y_j - v_B) / W_B sum_B g (closed form) and matches
    central differences in the weights; NaN rows give NaN."""
    rng = np.random.default_rng([14, int(increasing)])
    y = np.concatenate([rng.normal(size=(4, 12)), _tied_rows(rng, 2, 12)])
    y[5, 3] = np.nan
    w = rng.uniform(0.2, 3.0, size=y.shape)
    g = rng.normal(size=y.shape)
    sol, bs = eng.isotonic_forward(y, w, increasing)
    grad_y, grad_w = eng.isotonic_vjp_weighted(y, sol, w, bs, g)
    np.testing.assert_array_equal(grad_y, eng.isotonic_vjp(w, bs, g))
    assert np.all(np.isnan(grad_w[5])) and np.all(np.isfinite(grad_w[:5]))
    for r in range(5):
        for s, e in _blocks_of(bs[r]):
            want = (y[r, s:e] - sol[r, s]) / w[r, s:e].sum() * g[r, s:e].sum()
            np.testing.assert_allclose(grad_w[r, s:e], want, rtol=1e-12, atol=1e-14)
    h = 1e-6
    objective = lambda weights: np.nansum(g[:5] * eng.isotonic_forward(
        y[:5].copy(), weights, increasing)[0])
    for r, j in [(0, 0), (1, 5), (2, 11), (4, 7)]:
        up, down = w[:5].copy(), w[:5].copy()
        up[r, j] += h
        down[r, j] -= h
        fd = (objective(up) - objective(down)) / (2 * h)
        np.testing.assert_allclose(grad_w[r, j], fd, rtol=1e-5, atol=1e-7)
    y32, sol32, w32, g32 = (a.astype(np.float32) for a in (y, sol, w, g))
    got = eng.isotonic_vjp_weighted(y32, sol32, w32, bs, g32)
    assert all(a.dtype == np.float32 for a in got)
    np.testing.assert_allclose(got[1][:5], grad_w[:5], rtol=1e-4, atol=1e-5)
    with pytest.raises((TypeError, ValueError)):
        eng.isotonic_vjp_weighted(y[:, :5].copy(), sol, w, bs, g)


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
        if weighted:
            for a, b in zip(_C.isotonic_vjp_weighted(y, sa, w, ba, g),
                            _numba.isotonic_vjp_weighted(y, sb, w, bb, g)):
                _agree(a, b, 1e-12)


# ---------------------------------------------------------------------------
# Extreme magnitudes: rows near +-DBL_MAX, ranks at subnormal eps, isotonic
# regression with |y| ~ 1e308 and extreme weights. The C++ core runs such rows
# at an exact power-of-two scale (soft_forward_sorted, isotonic_forward_row,
# isotonic_vjp_row); the numba engine mirrors it step for step.
# ---------------------------------------------------------------------------

_DBL_MAX = float(np.finfo(np.float64).max)
_DENORM = 5e-324  # 2^-1074, the smallest positive double
EPS_EXTREME = (1e-3, 1.0, np.inf, 1e308)
EPS_SUBNORMAL = (5e-324, 1e-323, 1e-310)


def _agree_nonfinite(a, b, rtol):
    """Same non-finite entries (NaN and signed inf, in place) and finite entries
    within ``rtol`` of the row's largest finite magnitude (subnormal rows too)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape
    fa = np.isfinite(a)
    np.testing.assert_array_equal(fa, np.isfinite(b))
    np.testing.assert_array_equal(a[~fa], b[~fa])  # NaN == NaN here
    a = np.where(fa, a, 0.0)
    b = np.where(fa, b, 0.0)
    if a.size == 0:
        return
    scale = np.maximum(np.abs(a).max(axis=1, keepdims=True), np.abs(b).max(axis=1, keepdims=True))
    worst = np.max(np.abs(a - b) / np.where(scale > 0, scale, 1.0))
    assert worst <= rtol, f"relative disagreement {worst:.3e} > {rtol:.0e}"


def _huge_rows(rng):
    """Rows whose largest |x| is beyond 2^960 (the C++ core scales them)."""
    m = _DBL_MAX
    return [
        np.array([[1.7e308, -1.7e308, 0.0, 1.0]]),
        np.array([[m, -m, m, -m, 0.0, _DENORM], [m, m, m, -m, -m, 1.0]]),
        np.array([[1.7e308, 1.6e308, -1.7e308, -1e308, 1.0, -1.0, 0.0, 2.0]]),
        # Near DBL_MAX with small relative gaps (a few ulps up to 1e-10).
        np.array([1.6e308 * (1.0 + rng.integers(-40, 40, 33) * 2.0**-52),
                  -1.6e308 * (1.0 + rng.uniform(-1e-10, 1e-10, 33))]),
        rng.uniform(-1.0, 1.0, size=(3, 40)) * m,
        np.ascontiguousarray(rng.choice([-m, -1e300, 0.0, 1e300, m], size=(2, 129))),
    ]


def _subnormal_rows(rng):
    """Rows with subnormal values and subnormal gaps (and ties)."""
    return [
        np.array([[0.0, _DENORM, 2 * _DENORM, 3 * _DENORM, 4 * _DENORM]]),
        rng.integers(-20, 21, size=(4, 33)) * _DENORM,
        rng.normal(size=(3, 40)) * 1e-310,
        np.array([[1e-310, 2e-310, 0.0, -1e-310, 3e-310],
                  [1e-310, 1.000001e-310, 0.0, -_DENORM, 4e-323]]),
    ]


def _engine_pair_all(x, op, reg, descending, eps, rng):
    """Forward, vjp, jvp and hvp of both engines; asserts their agreement."""
    from softrank import _C, _numba

    nat = _C.soft_forward(x, op, reg, descending, eps)
    nb = _numba.soft_forward(x, op, reg, descending, eps)
    _agree_nonfinite(nat[0], nb[0], 1e-12)
    np.testing.assert_array_equal(nat[1], nb[1])
    np.testing.assert_array_equal(nat[2], nb[2])
    c = rng.normal(size=x.shape)
    t = rng.normal(size=x.shape)
    back = {}
    for fn in ("soft_vjp", "soft_jvp"):
        a = getattr(_C, fn)(x, *nat, c, op, reg, descending, eps)
        b = getattr(_numba, fn)(x, *nb, c, op, reg, descending, eps)
        _agree_nonfinite(a, b, 1e-12)
        back[fn] = a
    a = _C.soft_hvp(x, *nat, c, t, op, reg, descending, eps)
    b = _numba.soft_hvp(x, *nb, c, t, op, reg, descending, eps)
    _agree_nonfinite(a, b, 1e-12)
    back["soft_hvp"] = a
    return nat[0], back


@needs_both
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("eps", EPS_EXTREME)
def test_native_numba_agree_near_dbl_max(op, reg, descending, eps):
    rng = np.random.default_rng([7, op, reg, int(descending), EPS_EXTREME.index(eps)])
    for x in _huge_rows(rng):
        out, back = _engine_pair_all(x, op, reg, descending, eps, rng)
        # Finite input, finite outputs and derivatives (no overflow of the
        # differences or block sums of x).
        assert np.all(np.isfinite(out))
        for fn, g in back.items():
            assert np.all(np.isfinite(g)), fn
        if op == _engine.OP_RANK:
            n = x.shape[1]
            np.testing.assert_allclose(out.sum(axis=1), n * (n + 1) / 2, rtol=1e-12)
            assert np.all((out >= 1 - 1e-12) & (out <= n + 1e-12))


@needs_both
@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("eps", EPS_SUBNORMAL)
def test_kl_sort_near_dbl_max_at_subnormal_eps_is_the_hard_sort(descending, eps):
    """Where 1/eps overflows, a block of m values pools only across a gap beyond
    m / eps, which no two doubles have: the kl soft sort is the hard sort, bit
    for bit. Its merge test once took u - v = inf - inf (a gap beyond DBL_MAX
    against m / eps) for a merge and returned -inf (pav.h, sort_kl_merges)."""
    rng = np.random.default_rng([10, int(descending), EPS_SUBNORMAL.index(eps)])
    assert np.isinf(1.0 / eps)
    m = _DBL_MAX
    # (and rows whose sorted neighbours differ by more than DBL_MAX)
    beyond = [np.array([[m, m, -m]]), np.array([[1.5e308, -1.5e308], [-1e308, 1e308]]),
              np.array([[1.2e308, -1.2e308, 1.2e308], [m, -m, -m]])]
    for x in _huge_rows(rng) + beyond:
        out, back = _engine_pair_all(x, _engine.OP_SORT, _engine.REG_KL, descending, eps, rng)
        want = np.sort(x, axis=1)
        np.testing.assert_array_equal(out, want[:, ::-1] if descending else want)
        for fn, g in back.items():
            assert np.all(np.isfinite(g)), fn


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("eps", (2.5075569267720519e-308, 3e-308, 1e-307))
def test_kl_sort_block_wider_than_a_double_at_tiny_normal_eps(eng, descending, eps):
    """Found by the fuzzer: where 1/eps is finite but a block's k / eps (its
    outputs step down by 1/eps) passes DBL_MAX, the kl sort formed base - inf:
    an inf output for a row holding -DBL_MAX and nearly DBL_MAX, though every
    output lies in [min x, max x]. Now formed at half scale where it
    overflows (soft_row.h, sort_kl_output_wide). Against the mpmath min-max
    reference, both engines, gradients finite."""
    m = _DBL_MAX
    rows = [[0.0, 2.7373745703402606e-312, 1.7976923052802614e308, -m, 0.0, 0.0],
            [m, -m, 1.0, -1.0, 0.5 * m, -0.5 * m, 0.0, 1e300, -1e300, 3.0, m, -m]]
    for row in rows:
        x = np.array([row])
        out = eng.soft_forward(x, _engine.OP_SORT, _engine.REG_KL, descending, eps)[0]
        want = R.soft_sort_ref(x[0], eps, "kl", "descending" if descending else "ascending")
        assert np.all(np.isfinite(want))
        np.testing.assert_allclose(out[0], want, rtol=0, atol=4e-16 * m)
    if _BOTH:
        rng = np.random.default_rng([11, int(descending)])
        for row in rows:
            _, back = _engine_pair_all(np.array([row]), _engine.OP_SORT, _engine.REG_KL,
                                       descending, eps, rng)
            for fn, g in back.items():
                assert np.all(np.isfinite(g)), fn


@pytest.mark.parametrize("descending", [False, True])
def test_kl_sort_where_gaps_and_one_over_eps_are_below_rounding(eng, descending):
    """Where every gap of x and 1/eps are below 2^-53, the kl sort's merge
    test reads both sides as equal. It pooled there, moving x sorted by up to
    n / eps (all-zero x at eps = 1e17 gave [-1e-17, 0, 1e-17]); the exact
    blocks stay apart (each gap < 1/eps), so the output is x sorted. Against
    the mpmath min-max reference, to a hundredth of the row's spread."""
    cases = [(np.zeros(3), 1e17), (1e-17 * np.array([3.0, 1.0, 4.0, 2.0]), 3e16),
             (np.zeros(4), 1e300), (1e-300 * np.array([3.0, 1.0, 4.0, 2.0]), 1e30),
             (1e-20 * np.array([5.0, -1.0, 0.0, 2.0, 2.0]), 1e18)]
    for row, eps in cases:
        out = eng.soft_forward(np.array([row]), _engine.OP_SORT, _engine.REG_KL, descending,
                               eps)[0][0]
        want = R.soft_sort_ref(row, eps, "kl", "descending" if descending else "ascending")
        np.testing.assert_allclose(want, np.sort(row)[::-1] if descending else np.sort(row),
                                   rtol=1e-3, atol=0)
        scale = 1e-2 * max(np.ptp(row), 1e-320)
        np.testing.assert_allclose(out, want, rtol=0, atol=scale)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("eps", (1e-3, 1.0, 1e300))
def test_huge_rows_run_at_power_of_two_scale(eng, reg, descending, eps):
    """A row whose largest |x| has binary exponent 1024 runs at scale 2^-64:
    ranks (functions of x / eps) are bit for bit those of (x, eps) * 2^-64;
    the l2 sort is homogeneous, sort(x, eps) = 2^64 sort(x 2^-64, eps 2^64)."""
    rng = np.random.default_rng([8, reg, int(descending)])
    f = 2.0**-64
    for x in _huge_rows(rng):
        if not np.all(x * f / f == x):
            continue  # (values that x * 2^-64 rounds: not the same problem)
        assert np.all(np.frexp(np.abs(x).max(axis=1))[1] == 1024)
        rank = eng.soft_forward(x, _engine.OP_RANK, reg, descending, eps)
        scaled = eng.soft_forward(x * f, _engine.OP_RANK, reg, descending, eps * f)
        for a, b in zip(rank, scaled):
            np.testing.assert_array_equal(a, b)
        if not np.isfinite(eps / f):
            continue  # (the scaled eps overflows: PAV merges all, the offsets are not 0)
        srt = eng.soft_forward(x, _engine.OP_SORT, _engine.REG_L2, descending, eps)[0]
        ref = eng.soft_forward(x * f, _engine.OP_SORT, _engine.REG_L2, descending, eps / f)[0] / f
        _agree_nonfinite(srt, ref, 1e-15)


@needs_both
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("eps", EPS_SUBNORMAL)
def test_native_numba_agree_ranks_at_subnormal_eps(reg, descending, eps):
    rng = np.random.default_rng([9, reg, int(descending), EPS_SUBNORMAL.index(eps)])
    for x in _subnormal_rows(rng):
        n = x.shape[1]
        out, _ = _engine_pair_all(x, _engine.OP_RANK, reg, descending, eps, rng)
        assert np.all(np.isfinite(out))
        # Block statistics kept in units of x at subnormal eps would lose
        # O(1) of the ranks (row sums 13 or 17 instead of 15).
        np.testing.assert_allclose(out.sum(axis=1), n * (n + 1) / 2, rtol=1e-12)
        assert np.all((out >= 1 - 1e-12) & (out <= n + 1e-12))


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("eps", EPS_SUBNORMAL)
def test_ranks_at_subnormal_eps_run_at_power_of_two_scale(eng, reg, descending, eps):
    """Subnormal rows at subnormal eps are ranked as (x, eps) * 2^64: bit for bit."""
    rng = np.random.default_rng([10, reg, int(descending)])
    f = 2.0**64
    for x in _subnormal_rows(rng):
        a = eng.soft_forward(x, _engine.OP_RANK, reg, descending, eps)
        b = eng.soft_forward(x * f, _engine.OP_RANK, reg, descending, eps * f)
        for u, v in zip(a, b):
            np.testing.assert_array_equal(u, v)


def _blocks_of(bs_row):
    """(start, end) of each block of one block_start row."""
    starts = list(np.flatnonzero(bs_row == np.arange(bs_row.shape[0])))
    return zip(starts, starts[1:] + [bs_row.shape[0]])


def _isotonic_extreme_cases(rng):
    """(y, weights) pairs with |y| up to DBL_MAX or below 2^-960, and weights
    near DBL_MAX, 1e300, 1e-300 and subnormal."""
    m = _DBL_MAX
    ys = [
        np.array([[1.7e308, -1.7e308, 0.0, 1.0, 1.6e308, -1e308]]),
        np.array([[m, -m, m, -m, 0.0, 1.0]]),
        rng.uniform(-1.0, 1.0, size=(3, 30)) * m,
        rng.normal(size=(2, 30)),
        # Rows below 2^-960 (scaled up): subnormal values and gaps.
        rng.integers(-20, 21, size=(3, 30)) * _DENORM,
        rng.normal(size=(2, 30)) * 1e-300,
        rng.normal(size=(2, 30)) * 1e-310,
    ]
    cases = []
    for y in ys:
        shape = y.shape
        cases.append((y, None))
        cases.append((y, rng.uniform(0.5, 1.79, size=shape) * 1e308))  # sums overflow
        cases.append((y, rng.uniform(0.1, 10.0, size=shape) * 1e300))
        cases.append((y, rng.uniform(0.1, 10.0, size=shape) * 1e-300))
        cases.append((y, np.where(rng.random(shape) < 0.5, 1e300, 1e-300)))
        cases.append((y, rng.uniform(0.1, 10.0, size=shape) * 1e-310))  # subnormal
    return cases


@needs_both
@pytest.mark.parametrize("increasing", [True, False])
def test_native_numba_agree_isotonic_extreme(increasing):
    """Bit for bit: both engines do the same operations in the same order."""
    from softrank import _C, _numba

    rng = np.random.default_rng([12, int(increasing)])
    for y, w in _isotonic_extreme_cases(rng):
        g = rng.normal(size=y.shape)
        sa, ba = _C.isotonic_forward(y, w, increasing)
        sb, bb = _numba.isotonic_forward(y, w, increasing)
        np.testing.assert_array_equal(sa, sb)
        np.testing.assert_array_equal(ba, bb)
        assert np.all(np.isfinite(sa))
        lo, hi = (sa[:, :-1], sa[:, 1:]) if increasing else (sa[:, 1:], sa[:, :-1])
        assert np.all(lo <= hi)
        # A block's value is a weighted mean of its y: inside [min y, max y]
        # (tiny rows once rounded their means to the subnormal grid).
        for r in range(y.shape[0]):
            for s, e in _blocks_of(ba[r]):
                assert y[r, s:e].min() <= sa[r, s] <= y[r, s:e].max()
        ga = _C.isotonic_vjp(w, ba, g)
        np.testing.assert_array_equal(ga, _numba.isotonic_vjp(w, bb, g))
        if w is not None:
            for a, b in zip(_C.isotonic_vjp_weighted(y, sa, w, ba, g),
                            _numba.isotonic_vjp_weighted(y, sb, w, bb, g)):
                np.testing.assert_array_equal(a, b)
        assert np.all(np.isfinite(ga))
        # Each block's gradient adds up to the block's cotangent sum.
        for r in range(y.shape[0]):
            for s, e in _blocks_of(ba[r]):
                np.testing.assert_allclose(ga[r, s:e].sum(), g[r, s:e].sum(),
                                           rtol=1e-12, atol=1e-12 * np.abs(g[r, s:e]).sum())


@pytest.mark.parametrize("increasing", [True, False])
def test_isotonic_extreme_power_of_two_scale(eng, increasing):
    """Exact scaling: y with binary exponent 1024 runs at 2^-64, and weights
    scaled by a power of two (to ~1e300 or ~1e-300) give the same bits."""
    rng = np.random.default_rng([13, int(increasing)])
    y = rng.uniform(-1.0, 1.0, size=(3, 30)) * _DBL_MAX
    y[:, 0] = _DBL_MAX
    w = rng.uniform(0.5, 0.99, size=y.shape)  # binary exponent 0: not rescaled
    g = rng.normal(size=y.shape)
    f = 2.0**-64
    for weights in (None, w):
        sol, bs = eng.isotonic_forward(y, weights, increasing)
        sol_s, bs_s = eng.isotonic_forward(y * f, weights, increasing)
        np.testing.assert_array_equal(sol, sol_s / f)
        np.testing.assert_array_equal(bs, bs_s)
    sol, bs = eng.isotonic_forward(y, w, increasing)
    grad = eng.isotonic_vjp(w, bs, g)
    for k in (996, 1023, -996):
        wk = w * 2.0**k
        sol_k, bs_k = eng.isotonic_forward(y, wk, increasing)
        np.testing.assert_array_equal(sol_k, sol)
        np.testing.assert_array_equal(bs_k, bs)
        np.testing.assert_array_equal(eng.isotonic_vjp(wk, bs_k, g), grad)


@needs_both
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("eps", EPS_ALL + (1e-160, 1e-300))
def test_native_numba_agree_hvp(op, reg, descending, eps):
    """Double backward on ordinary rows, the kl sort at eps = inf (not zero:
    the softmax depends on x) and the kl rank at eps below ~1e-154 (divides
    by eps twice: (1/eps)^2 overflows)."""
    rng = np.random.default_rng([14, op, reg, int(descending)])
    xs = [rng.normal(size=(3, 17)), _tied_rows(rng, 2, 20), rng.normal(size=(2, 9)) * eps]
    for x in xs:
        if not np.all(np.isfinite(x)):
            continue
        _engine_pair_all(np.ascontiguousarray(x), op, reg, descending, eps, rng)


@needs_both
@pytest.mark.parametrize("descending", [False, True])
def test_native_numba_agree_kl_sort_tiny_values(descending):
    """kl soft_sort at |x| << 1 keeps relative precision (log1p of a termwise
    S - Q) in both engines: elementwise, not only relative to the row."""
    from softrank import _C, _numba

    sgn = 1.0 if descending else -1.0
    for row, eps in (([1e-16, 2e-16, 3e-16], np.inf), ([1e-4, 0.0, 0.0], 1e5),
                     ([1e-16, 2e-16, 3e-16], 1e5), ([3e-300, 1e-300, -2e-300], np.inf)):
        x = np.array([row])
        a = _C.soft_forward(x, _engine.OP_SORT, _engine.REG_KL, descending, eps)[0]
        b = _numba.soft_forward(x, _engine.OP_SORT, _engine.REG_KL, descending, eps)[0]
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=0)
        if eps == np.inf:
            # The log-mean-exp of x', mapped back: log1p(mean(expm1(x'))).
            expected = sgn * np.log1p(np.mean(np.expm1(sgn * x)))
            np.testing.assert_allclose(a, np.full_like(a, expected), rtol=1e-12, atol=0)


@pytest.mark.parametrize("reg", REGS)
def test_rank_huge_row_tiny_eps_keeps_small_gaps(eng, reg):
    """A rank whose eps 2^k would leave the normal range is not scaled down for
    the large value (C++ d56c554): the small values keep their digits, and the
    large value is a singleton block (first version of the scaling: ranks
    [4, 2, 2, 2] at eps = 1e-305, errors ~5e-5 at 1e-300)."""
    expected = eng.soft_forward(np.array([[1e10, 1.3, 0.4, 0.0]]), _engine.OP_RANK, reg,
                                False, 1.0)[0]
    for eps in (1e-300, 1e-305):
        x = np.array([[1.7e308, 1.3 * eps, 0.4 * eps, 0.0]])
        out = eng.soft_forward(x, _engine.OP_RANK, reg, False, eps)[0]
        np.testing.assert_allclose(out, expected, rtol=1e-12)
    # The fuzzer's row (csrc/tests/test_regressions.cpp): ascending, the other
    # ranks are bitwise those of the row without the large value.
    x = np.array([[1e300, 1e-300, -5e-324, 0.0, 1.0, -1e10, 1e-10, 3.0, 1.0, 3.0, 2.0, 1.0,
                   2.781342323134e-309, 8.0987e-320, 0.0]])
    n = x.shape[1]
    for eps in (1.7696290530940086e-307, 1e-300, 3e-308):
        out = eng.soft_forward(x, _engine.OP_RANK, reg, False, eps)[0]
        rest = eng.soft_forward(np.ascontiguousarray(x[:, 1:]), _engine.OP_RANK, reg, False, eps)[0]
        np.testing.assert_allclose(out.sum(), n * (n + 1) / 2, rtol=1e-12)
        assert out[0, 0] == n
        np.testing.assert_array_equal(out[0, 1:], rest[0])


def test_rank_huge_row_subnormal_eps_subnormal_gaps(eng):
    """A row with |x| > 2^960 and subnormal gaps at a subnormal eps can be
    scaled neither down (eps would leave the normal range) nor up (the large
    value would overflow). Its l2 rank took a block's mean offset on the
    subnormal grid, O(1) relative to eps: [1.7e308, 4d, 5d, -3d] (d = 2^-1074)
    at eps = d ranked [4, 1.5, 2.5, 1] (row sum 9); the mean is now taken after
    the division by eps (soft_row.h). Against the exact projection (mpmath)."""
    from reference import soft_rank_ref

    d = _DENORM
    x = np.array([[1.7e308, 4 * d, 5 * d, -3 * d]])
    for eps in (d, 2 * d, 3 * d):
        out = eng.soft_forward(x, _engine.OP_RANK, _engine.REG_L2, False, eps)[0]
        rest = eng.soft_forward(np.ascontiguousarray(x[:, 1:]), _engine.OP_RANK,
                                _engine.REG_L2, False, eps)[0]
        np.testing.assert_allclose(out[0], soft_rank_ref(x[0], eps, "l2"), rtol=1e-15, atol=0)
        np.testing.assert_allclose(out.sum(), 10.0, rtol=1e-12)
        np.testing.assert_array_equal(out[0, 1:], rest[0])


def test_rank_huge_row_subnormal_eps_random_rows(eng):
    """Random rows of the same regime: integer multiples of d = 2^-1074 up to
    2^40 d beside one value of 1e300 or more, at eps = e d (e up to 2^51),
    ascending and descending: the l2 ranks against the exact projection
    (mpmath). Its merge test is exact there (block sums and counts are
    integers times d), and so must the outputs be."""
    from reference import soft_rank_ref

    d = _DENORM
    rng = np.random.default_rng(41)
    for _ in range(60):
        n = int(rng.integers(2, 12))
        x = rng.integers(-2 ** int(rng.integers(2, 40)), 2 ** 40, size=n) * d
        x[rng.integers(0, n)] = rng.choice([1.7e308, -1.7e308, 1e300, 2.0 ** 1000])
        eps = int(rng.integers(1, 2 ** int(rng.integers(1, 52)))) * d
        descending = bool(rng.integers(0, 2))
        out = eng.soft_forward(x[None], _engine.OP_RANK, _engine.REG_L2, descending, eps)[0][0]
        exact = soft_rank_ref(x, eps, "l2", "descending" if descending else "ascending")
        np.testing.assert_allclose(out, exact, rtol=0, atol=1e-13 * n,
                                   err_msg=f"x={x.tolist()} eps={eps} descending={descending}")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("descending", [False, True])
def test_kl_sort_elementwise_precision_both_sides_of_the_plain_log_ratio(eng, dtype, descending):
    """The kl sort takes log(S / Q) directly where every output of a block is
    at least m (float64) or m 2^-20 (float32) in magnitude, and a termwise
    log1p elsewhere (soft_ops.h, sort_kl_log_ratios): elementwise against the
    exact projection (mpmath), on rows whose pooled blocks fall on both sides:
    values near 0 (small outputs, blocks crossing 0) and values far from it."""
    from reference import soft_sort_ref

    direction = "descending" if descending else "ascending"
    rng = np.random.default_rng([15, int(descending), np.dtype(dtype).itemsize])
    # Each row at its eps pools blocks of several elements.
    cases = [(rng.normal(size=12) * 1e-3, 1e6), (rng.normal(size=12) * 1e-6, 1e9),
             (rng.normal(size=12), 3.0), (rng.random(16) * 16, 1.0),
             (rng.random(16) * 16 - 8, 1.0), (rng.random(16) * 40 + 30, 1.0),
             (np.linspace(-2, 2, 16) + rng.normal(size=16) * 0.3, 3.0)]
    rtol = 4e-7 if dtype == np.float32 else 1e-13
    for x, eps in cases:
        x = x.astype(dtype)
        out, _, block_start = eng.soft_forward(x[None], _engine.OP_SORT, _engine.REG_KL,
                                               descending, eps)
        assert np.any(block_start[0] != np.arange(x.size)), "no block pooled: the row tests nothing"
        expected = soft_sort_ref(x.astype(np.float64), eps, "kl", direction)
        np.testing.assert_allclose(out[0], expected.astype(dtype), rtol=rtol, atol=0,
                                   err_msg=f"x={x!r} eps={eps}")


def test_one_table_of_codes():
    """The core's enums, the Python table and the names users pass agree."""
    from softrank import _codes
    from softrank._validate import check_regularization

    if "native" in BACKENDS:
        from softrank import _C

        assert _C.codes() == {"op": _codes.OPERATORS, "reg": _codes.REGULARIZATIONS}
    for name, code in _codes.REGULARIZATIONS.items():
        assert check_regularization(name) == code
    assert (_engine.OP_RANK, _engine.OP_SORT) == (0, 1) == tuple(_codes.OPERATORS.values())


def test_inverse_permutations(eng):
    """inverse[perm[i]] = i row by row; a row that is not a permutation is refused."""
    rng = np.random.default_rng(7)
    perm = np.argsort(rng.normal(size=(40, 23)), axis=1, kind="stable").astype(np.int32)
    inverse = eng.inverse_permutations(perm)
    assert inverse.dtype == np.int32 and inverse.shape == perm.shape
    expected = np.argsort(perm, axis=1)  # the inverse of a permutation is its argsort
    np.testing.assert_array_equal(inverse, expected)
    assert eng.inverse_permutations(np.zeros((3, 0), np.int32)).shape == (3, 0)
    for bad in ([[0, 0, 1]], [[0, 1, 3]], [[-1, 0, 1]]):
        with pytest.raises(ValueError, match="permutations"):
            eng.inverse_permutations(np.array(bad, np.int32))
    with pytest.raises(TypeError, match="int32"):
        eng.inverse_permutations(perm.astype(np.int64))


def _pearson_reference(a, b):
    """Row-by-row Pearson correlation by np.corrcoef, in float64."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):  # (constant rows: NaN)
        return np.array([np.corrcoef(ra, rb)[0, 1] for ra, rb in zip(a64, b64)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pearson_and_its_vjp(eng, dtype):
    """pearson matches np.corrcoef row by row (scale-free: rows of 1e200 and
    1e-200 too); pearson_vjp matches central differences of pearson; constant
    and non-finite rows give NaN; empty shapes and bad arguments."""
    rng = np.random.default_rng(11)
    a = rng.normal(size=(6, 17))
    b = rng.normal(size=(6, 17))
    b[1] = a[1] * 3.0 + 1.0  # corr = 1
    b[2] = -a[2]  # corr = -1
    a[3] = 0.1  # constant (its mean rounds off 0.1): NaN
    a[4, 5] = np.nan
    b[5] = 7.0  # constant target: NaN
    a, b = a.astype(dtype), b.astype(dtype)
    corr = eng.pearson(a, b)
    assert corr.dtype == dtype and corr.shape == (6,)
    want = _pearson_reference(a, b)
    with np.errstate(invalid="ignore", divide="ignore"):
        np.testing.assert_allclose(corr, want, rtol=1e-6 if dtype == np.float32 else 1e-13,
                                   atol=1e-6 if dtype == np.float32 else 1e-14)
    assert np.isnan(corr[[3, 4, 5]]).all() and np.isfinite(corr[:3]).all()
    np.testing.assert_allclose(corr[1:3], [1.0, -1.0], rtol=1e-6)

    if dtype == np.float64:
        big = eng.pearson(a[:3] * 1e200, b[:3] * 1e-200)
        np.testing.assert_allclose(big, corr[:3], rtol=1e-12)
        small = eng.pearson(a[:3] * 1e-200, b[:3])
        np.testing.assert_allclose(small, corr[:3], rtol=1e-12)

    cotangent = rng.normal(size=6).astype(dtype)
    grad = eng.pearson_vjp(a, b, cotangent)
    assert grad.dtype == dtype and grad.shape == a.shape
    assert np.isnan(grad[[3, 4, 5]]).all()
    a64, b64 = a[:3].astype(np.float64), b[:3].astype(np.float64)
    step = 1e-6
    numeric = np.zeros_like(a64)
    for j in range(a64.shape[1]):
        up, down = a64.copy(), a64.copy()
        up[:, j] += step
        down[:, j] -= step
        numeric[:, j] = cotangent[:3] * (_pearson_reference(up, b64)
                                         - _pearson_reference(down, b64)) / (2 * step)
    np.testing.assert_allclose(grad[:3], numeric, rtol=1e-4 if dtype == np.float32 else 1e-6,
                               atol=1e-5 if dtype == np.float32 else 1e-8)
    assert np.abs(grad[0]).max() > 1e-3

    assert eng.pearson(np.zeros((0, 5), dtype), np.zeros((0, 5), dtype)).shape == (0,)
    empty_rows = eng.pearson(np.zeros((3, 0), dtype), np.zeros((3, 0), dtype))
    assert empty_rows.shape == (3,) and np.isnan(empty_rows).all()
    assert eng.pearson_vjp(np.zeros((2, 0), dtype), np.zeros((2, 0), dtype),
                           np.ones(2, dtype)).shape == (2, 0)
    with pytest.raises(ValueError, match="b must have"):
        eng.pearson(a, b[:, :3].copy())
    with pytest.raises(TypeError, match="b must have"):
        eng.pearson(a, b.astype(np.float64 if dtype == np.float32 else np.float32))
    with pytest.raises(ValueError, match="cotangent"):
        eng.pearson_vjp(a, b, np.ones(5, dtype))
    with pytest.raises(TypeError, match="cotangent"):
        eng.pearson_vjp(a, b, np.ones(6, np.float64 if dtype == np.float32 else np.float32))


@pytest.mark.parametrize("n", [3, 2**18 + 3])
def test_kl_rank_products_of_singleton_blocks_are_zero(eng, n):
    """Distinct values at a small eps: every block a singleton, whose Jacobian
    is exactly 0. The kl rank's jvp/vjp formed v - v r / (n - s), and r (an
    exp) is n - s only up to rounding: -6.7e284 at eps = 1e-300, so that
    <g, J t> != <J^T g, t>. n = 2^18 + 3 takes the core's long-row path."""
    rng = np.random.default_rng(11)
    if n == 3:  # (the audit's row)
        x = np.array([-2.0401783097541677, -1.3952489643767971, -0.2962228264851077])
    else:
        x = np.sort(rng.normal(size=n)) * n  # gaps far above eps
    rows = np.ascontiguousarray(x[None, :])
    vec = np.ascontiguousarray(rng.normal(size=(1, n)))
    for eps in (1e-8, 1e-300, 5e-324):
        for descending in (False, True):
            out, perm, bs = eng.soft_forward(rows, 0, 1, descending, eps)
            assert (bs[0] == np.arange(n)).all()  # (singletons: the premise)
            for product in (eng.soft_vjp, eng.soft_jvp):
                got = product(rows, out, perm, bs, vec, 0, 1, descending, eps)
                assert not np.any(got), (product.__name__, eps, descending, got[got != 0][:3])
