"""soft_rank_with_vjp / soft_sort_with_vjp: one forward pass, then any number of vjps.

The value must equal soft_rank / soft_sort and every vjp must equal
soft_rank_vjp / soft_sort_vjp bitwise (the same engine calls on the same
arrays), for every op, regularization, direction, layout and dtype; the
pullback must validate its cotangent and be unaffected by later in-place
changes to x or to the returned value.
"""
from __future__ import annotations

import numpy as np
import pytest

import reference as R
from softrank import numpy as srn

OPS = {
    "rank": (srn.soft_rank, srn.soft_rank_vjp, srn.soft_rank_with_vjp),
    "sort": (srn.soft_sort, srn.soft_sort_vjp, srn.soft_sort_with_vjp),
}
REGS = ("l2", "kl")
DIRECTIONS = ("ascending", "descending")
EPSES = (0.0, 1e-3, 1.0, np.inf)


def _layouts(rng, dtype):
    """(name, x, axis): contiguous, Fortran-ordered, strided, 3-d, 1-d, with ties."""
    base = rng.normal(size=(6, 9)) * 3
    cube = rng.normal(size=(5, 4, 3)) * 3
    ties = np.round(rng.normal(size=(4, 8)) * 2)  # many exact ties
    yield "c-last", base.astype(dtype), -1
    yield "c-axis0", base.astype(dtype), 0
    yield "fortran-last", np.asfortranarray(base.astype(dtype)), -1
    yield "fortran-axis0", np.asfortranarray(base.astype(dtype)), 0
    yield "strided", rng.normal(size=(8, 20)).astype(dtype)[::2, ::3], -1
    yield "3d-axis0", cube.astype(dtype), 0
    yield "3d-axis1", cube.astype(dtype), 1
    yield "3d-last", cube.astype(dtype), -1
    yield "1d", rng.normal(size=11).astype(dtype), 0
    yield "ties", ties.astype(dtype), -1


def _same(a, b, ctx):
    assert a.dtype == b.dtype and a.shape == b.shape, ctx
    np.testing.assert_array_equal(a, b, err_msg=str(ctx))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("op", ["rank", "sort"])
def test_bitwise_equal_to_stateless(backend, op, dtype):
    fwd, vjp_fn, with_vjp = OPS[op]
    rng = np.random.default_rng(7)
    for name, x, axis in _layouts(rng, dtype):
        cots = [rng.normal(size=x.shape).astype(dtype) for _ in range(2)]
        for reg in REGS:
            for d in DIRECTIONS:
                for eps in EPSES:
                    kw = dict(regularization=reg, direction=d, axis=axis)
                    ctx = (op, name, reg, d, eps, np.dtype(dtype).name)
                    value, vjp = with_vjp(x, eps, **kw)
                    _same(value, fwd(x, eps, **kw), ctx)
                    for cot in cots:
                        _same(vjp(cot), vjp_fn(x, cot, eps, **kw), ctx)


@pytest.mark.parametrize("op", ["rank", "sort"])
def test_dtype_rules(backend, op):
    """Ints, lists and float16 follow soft_rank's dtype rules; so does the cotangent."""
    fwd, vjp_fn, with_vjp = OPS[op]
    ints = np.array([[3, 1, 2, 2], [0, 5, -1, 4]])
    for x in (ints, ints.tolist(), ints.astype(np.float16), ints.astype(np.float32)):
        value, vjp = with_vjp(x, 0.5)
        _same(value, fwd(x, 0.5), (op, type(x)))
        grid = np.arange(8.0).reshape(ints.shape)
        for cot in (np.ones(ints.shape, dtype=np.int64), np.full(ints.shape, 0.5, np.float16),
                    grid, grid.tolist()):
            _same(vjp(cot), vjp_fn(x, cot, 0.5), (op, type(x), np.asarray(cot).dtype))


def test_empty_and_nan_rows(backend):
    for op in OPS:
        fwd, vjp_fn, with_vjp = OPS[op]
        for x in (np.zeros((3, 0)), np.zeros((0, 4)),
                  np.array([[1.0, np.nan, 2.0], [0.5, 0.2, 0.1], [np.inf, 1.0, 0.0]])):
            value, vjp = with_vjp(x, 1.0, regularization="kl")
            _same(value, fwd(x, 1.0, regularization="kl"), (op, x.shape))
            cot = np.ones(x.shape)
            _same(vjp(cot), vjp_fn(x, cot, 1.0, regularization="kl"), (op, x.shape))


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("op", ["rank", "sort"])
def test_vjp_vs_finite_differences(backend, op, reg):
    """float64, central differences (tolerance as in test_numpy_gradients)."""
    fwd, _, with_vjp = OPS[op]
    rng = np.random.default_rng(11 + 2 * (op == "sort") + (reg == "kl"))
    for n in (3, 8, 20):
        for eps in (0.3, 1.0, 4.0):
            for d in DIRECTIONS:
                # well separated values: no change of the block structure within a step
                x = np.cumsum(rng.uniform(0.05, 1.0, size=n))[rng.permutation(n)]
                x *= 10.0 if op == "sort" else 1.0
                kw = dict(regularization=reg, direction=d)
                J = R.jacobian_fd_batched(lambda X: fwd(X, eps, **kw), x)
                value, vjp = with_vjp(x, eps, **kw)
                for _ in range(2):
                    u = rng.normal(size=n)
                    assert R.rel_err(vjp(u), J.T @ u) <= 1e-6, (op, reg, d, eps, n)


@pytest.mark.parametrize("op", ["rank", "sort"])
def test_called_twice_with_different_cotangents(backend, op):
    _, vjp_fn, with_vjp = OPS[op]
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 10))
    for reg in REGS:
        _, vjp = with_vjp(x, 0.7, regularization=reg)
        u, w = rng.normal(size=x.shape), rng.normal(size=x.shape)
        gu, gw = vjp(u), vjp(w)
        _same(gu, vjp_fn(x, u, 0.7, regularization=reg), (op, reg, "u"))
        _same(gw, vjp_fn(x, w, 0.7, regularization=reg), (op, reg, "w"))
        assert not np.array_equal(gu, gw)
        _same(vjp(u), gu, (op, reg, "u again"))  # nothing accumulated between calls
        # linear in the cotangent
        np.testing.assert_allclose(vjp(2.0 * u - w), 2.0 * gu - gw, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reg", REGS)
@pytest.mark.parametrize("op", ["rank", "sort"])
def test_mutating_x_or_value_does_not_change_the_gradient(backend, op, reg):
    """x viewed without copy (C-contiguous, compute dtype, any axis), copied
    (Fortran, float16, list) or a view of a larger array; the value mutated too
    (kl soft rank's vjp reads the forward output, kl soft sort's reads x)."""
    _, vjp_fn, with_vjp = OPS[op]
    rng = np.random.default_rng(5)
    big = rng.normal(size=(6, 24)) * 3
    cases = [
        (lambda: big[:, :12].copy(), -1),
        (lambda: big[:, :12].copy(), 0),
        (lambda: big[:3, :12].reshape(3, 3, 4).copy(), 1),
        (lambda: np.asfortranarray(big[:, :12]), -1),
        (lambda: big[:, ::2], -1),  # a view of big: big itself is mutated below
        (lambda: big[:, :12].astype(np.float32), -1),
        (lambda: big[:, :12].astype(np.float16), -1),
    ]
    for make, axis in cases:
        x = make()
        kw = dict(regularization=reg, axis=axis)
        cot = rng.normal(size=x.shape)
        expected = vjp_fn(x.copy(), cot, 0.8, **kw)
        value, vjp = with_vjp(x, 0.8, **kw)
        x[...] = rng.normal(size=x.shape) * 100  # in place (through big for the view)
        value[...] = -7.0
        _same(vjp(cot), expected, (op, reg, x.dtype, x.shape, axis))
        big = rng.normal(size=(6, 24)) * 3


def test_list_input_keeps_working(backend):
    x = [[3.0, 1.0, 2.0], [0.0, -1.0, 5.0]]
    value, vjp = srn.soft_rank_with_vjp(x, 0.5, regularization="kl")
    x[0][0] = 100.0
    cot = np.ones((2, 3))
    _same(vjp(cot), srn.soft_rank_vjp([[3.0, 1.0, 2.0], [0.0, -1.0, 5.0]], cot, 0.5,
                                      regularization="kl"), "list")


def _kept_arrays(vjp):
    """The numpy arrays the pullback's closure holds (directly or in tuples)."""
    found = []
    for cell in vjp.__closure__ or ():
        contents = cell.cell_contents
        for item in contents if isinstance(contents, tuple) else (contents,):
            if isinstance(item, np.ndarray):
                found.append(item)
    return found


def test_pullback_holds_no_alias_of_what_its_vjp_reads(backend):
    """The kl vjp reads the output (rank) or x (sort): what the pullback keeps
    shares no memory with the value (rank) or with x (sort), whether the
    forward viewed x (contiguous float64) or converted it. (The l2 vjp reads
    neither, so nothing is copied there; the mutation tests cover all four.)"""
    rng = np.random.default_rng(2)
    for x in (rng.normal(size=(3, 5)), rng.normal(size=(3, 5)).astype(np.float32),
              np.arange(12).reshape(3, 4)[:, ::-1], rng.normal(size=(2, 3, 4))):
        for with_vjp, read in ((srn.soft_rank_with_vjp, "value"), (srn.soft_sort_with_vjp, "x")):
            value, vjp = with_vjp(x, 1.0, regularization="kl", axis=0)
            kept = _kept_arrays(vjp)
            assert len(kept) == 4  # rows of x, out, perm, block_start
            guarded = value if read == "value" else x
            assert not any(np.may_share_memory(a, guarded) for a in kept)


@pytest.mark.parametrize("op", ["rank", "sort"])
def test_bad_cotangent(backend, op):
    _, _, with_vjp = OPS[op]
    x = np.array([[0.3, -1.0, 2.0, 0.5], [1.0, 1.0, 0.0, -2.0]])
    _, vjp = with_vjp(x, 1.0)
    for bad in (np.ones((4, 2)), np.ones(4), np.ones((2, 4, 1)), np.ones((2, 5)), 1.0):
        with pytest.raises(ValueError, match=r"\bcotangent\b"):
            vjp(bad)
    for bad in (np.ones(x.shape, np.complex128), np.full(x.shape, None, dtype=object)):
        with pytest.raises(TypeError, match=r"\bcotangent\b"):
            vjp(bad)
    # a bad call leaves the pullback usable
    _same(vjp(np.ones(x.shape)), OPS[op][1](x, np.ones(x.shape), 1.0), op)


@pytest.mark.parametrize("op", ["rank", "sort"])
def test_bad_input_raises_at_the_call(backend, op):
    """The errors of soft_rank / soft_sort (type and message), raised by
    the *_with_vjp call itself, before any pullback exists."""
    fwd, _, with_vjp = OPS[op]
    x = np.array([[0.3, -1.0, 2.0, 0.5], [1.0, 1.0, 0.0, -2.0]])
    bad_calls = [
        ((x, -1.0), {}),
        ((x, np.nan), {}),
        ((x, "1.0"), {}),
        ((x, 1 + 2j), {}),
        ((x,), {"regularization": "l1"}),
        ((x,), {"direction": "up"}),
        ((x,), {"axis": 2}),
        ((x,), {"axis": 1.0}),
        ((np.float64(1.5),), {}),
        ((x.astype(np.complex128),), {}),
        ((np.array(["b", "a"]),), {}),
    ]
    for args, kw in bad_calls:
        with pytest.raises((ValueError, TypeError)) as want:
            fwd(*args, **kw)
        with pytest.raises(type(want.value)) as got:
            with_vjp(*args, **kw)
        assert str(got.value) == str(want.value), (args, kw)


def test_exported():
    assert "soft_rank_with_vjp" in srn.__all__ and "soft_sort_with_vjp" in srn.__all__
    _, vjp = srn.soft_sort_with_vjp(np.ones(3))
    assert vjp.__name__ == "soft_sort_vjp" and "cotangent" in vjp.__doc__
