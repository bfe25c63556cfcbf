"""Hostile input at the engine level (softrank._engine.engine(): the C++ core's
bindings softrank._C, or the numba engine), below the adapters' validation:
wrong dtypes, layouts and shapes, forged forward state (perm, block_start),
bad codes, rows too long for int32 indices, zero-size batches. Every bad
argument raises ValueError/TypeError naming it; nothing crashes or hangs.

(The numpy adapter's bad input is covered by tests/test_numpy_bad_input.py.)
"""
from __future__ import annotations

import mmap
import os
import tempfile
import time

import numpy as np
import pytest

from softrank import _engine

OPS = [(op, reg, desc) for op in (0, 1) for reg in (0, 1) for desc in (False, True)]


@pytest.fixture
def eng(backend):
    return _engine.engine()


def _state(eng, x, op=0, reg=0, desc=False, eps=1.0):
    out, perm, blocks = eng.soft_forward(x, op, reg, desc, eps)
    return out, perm, blocks


def _x(rows=3, n=7, dtype=np.float64, seed=0):
    return np.random.default_rng(seed).normal(size=(rows, n)).astype(dtype)


# ---------------------------------------------------------------- x itself

@pytest.mark.parametrize(
    "bad, exc",
    [
        (np.zeros((2, 3), np.int32), TypeError),
        (np.zeros((2, 3), np.int64), TypeError),
        (np.zeros((2, 3), np.float16), TypeError),
        (np.zeros((2, 3), np.complex128), TypeError),
        (np.zeros((2, 3), object), TypeError),
        (np.zeros((2, 3), bool), TypeError),
        (np.zeros((2, 3), np.dtype(">f8")), TypeError),  # non-native byte order
        (np.zeros(5), ValueError),  # 1-D
        (np.zeros((2, 3, 4)), ValueError),  # 3-D
        (np.array(1.0), ValueError),  # 0-D
        (np.zeros((3, 4), order="F"), ValueError),  # Fortran order
        (np.zeros((3, 8))[:, ::2], ValueError),  # strided
        (np.broadcast_to(np.zeros((1, 4)), (3, 4)), ValueError),  # zero stride
    ],
    ids=["int32", "int64", "float16", "complex", "object", "bool", "big-endian", "1d", "3d",
         "0d", "fortran", "strided", "broadcast"],
)
def test_bad_x_named(eng, bad, exc):
    for op, reg, desc in OPS[:2]:
        with pytest.raises(exc, match=r"\bx\b"):
            eng.soft_forward(bad, op, reg, desc, 1.0)
    with pytest.raises(exc, match=r"\by\b"):
        eng.isotonic_forward(bad, None, True)


@pytest.mark.parametrize("op, reg", [(2, 0), (-1, 0), (0, 2), (0, -1)])
def test_bad_codes_named(eng, op, reg):
    name = "op" if op not in (0, 1) else "reg"
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        eng.soft_forward(_x(), op, reg, False, 1.0)


@pytest.mark.parametrize("eps", [-1.0, -1e-300, float("nan"), -float("inf")])
def test_bad_eps_named(eng, eps):
    x = _x()
    with pytest.raises(ValueError, match=r"\beps\b"):
        eng.soft_forward(x, 0, 0, False, eps)
    out, perm, blocks = _state(eng, x)
    with pytest.raises(ValueError, match=r"\beps\b"):
        eng.soft_vjp(x, out, perm, blocks, x, 0, 0, False, eps)


def test_extreme_but_valid_eps_accepted(eng):
    x = _x()
    for eps in (0.0, -0.0, 5e-324, 1e-300, 1e300, np.finfo(np.float64).max, float("inf")):
        for op, reg, desc in OPS:
            out, perm, blocks = eng.soft_forward(x, op, reg, desc, eps)
            assert np.all(np.isfinite(out)), (op, reg, desc, eps)
            g = eng.soft_vjp(x, out, perm, blocks, x, op, reg, desc, eps)
            assert not np.any(np.isnan(g)), (op, reg, desc, eps)


# ---------------------------------------------------------------- forged forward state

@pytest.mark.parametrize("fn", ["soft_vjp", "soft_jvp"])
def test_state_shape_dtype_layout_named(eng, fn):
    x = _x()
    out, perm, blocks = _state(eng, x)
    g = np.ones_like(x)
    vec_name = "cotangent" if fn == "soft_vjp" else "tangent"
    call = getattr(eng, fn)

    def expect(exc, name, **kw):
        args = dict(x=x, out=out, perm=perm, block_start=blocks, vec=g)
        args.update(kw)
        with pytest.raises(exc, match=rf"\b{name}\b"):
            call(args["x"], args["out"], args["perm"], args["block_start"], args["vec"], 0, 0, False, 1.0)

    expect(ValueError, "out", out=out[:, :-1])
    expect(TypeError, "out", out=out.astype(np.float32))
    expect(ValueError, "out", out=np.asfortranarray(np.ones((7, 3)).T))
    expect(ValueError, vec_name, vec=g[:-1])
    expect(TypeError, vec_name, vec=g.astype(np.float32))
    expect(ValueError, "perm", perm=perm[:, :3])
    expect(TypeError, "perm", perm=perm.astype(np.int64))
    expect(ValueError, "block_start", block_start=blocks[:2])
    expect(TypeError, "block_start", block_start=blocks.astype(np.float64))
    expect(ValueError, "perm", perm=np.full_like(perm, -1))
    expect(ValueError, "perm", perm=np.full_like(perm, x.shape[1]))
    expect(ValueError, "perm", perm=np.full_like(perm, 2**31 - 1))


def test_forged_state_in_range_never_crashes(eng):
    """Garbage that passes the checks (perm in range but not a permutation,
    block_start anything) gives unspecified values, never an out-of-bounds
    access: the blocks are re-derived as runs of equal block_start entries."""
    rng = np.random.default_rng(1)
    x = _x(4, 50)
    g = rng.normal(size=x.shape)
    for op, reg, desc in OPS:
        out, perm, blocks = _state(eng, x, op, reg, desc, 0.7)
        forgeries = [
            (perm, rng.integers(-(2**31), 2**31 - 1, size=blocks.shape, dtype=np.int32)),
            (perm, np.zeros_like(blocks)),
            (perm, np.full_like(blocks, 2**31 - 1)),
            (perm, np.arange(blocks.size, dtype=np.int32).reshape(blocks.shape)[:, ::-1].copy()),
            (np.zeros_like(perm), blocks),  # in range, not a permutation
            (rng.integers(0, x.shape[1], size=perm.shape, dtype=np.int32), blocks),
        ]
        for p, b in forgeries:
            for fn in ("soft_vjp", "soft_jvp"):
                r = getattr(eng, fn)(x, out, p, b, g, op, reg, desc, 0.7)
                assert r.shape == x.shape and r.dtype == x.dtype
            r = eng.soft_hvp(x, out, p, b, g, g, op, reg, desc, 0.7)
            assert r.shape == x.shape


def test_forged_state_of_a_long_row_stays_inside_the_row(eng):
    """Rows of 2^18 items or more take the long-row products (soft_product_team
    in soft_row.h), which read two block_start entries as positions per piece:
    forged ones must not reach outside the row either (a block_start of
    2^31 - 1 after a valid first entry read x[perm[2^31 - 1]] and crashed)."""
    n = 1 << 18
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, n))
    g = rng.normal(size=x.shape)
    for op, reg, desc in [(0, 0, False), (0, 1, True), (1, 0, True), (1, 1, False)]:
        out, perm, blocks = _state(eng, x, op, reg, desc, 0.7)
        high = np.full_like(blocks, 2**31 - 1)
        high[0, 0] = 0
        low = np.full_like(blocks, -(10**9))
        low[0, 0] = 0
        shuffled = rng.integers(-(2**31), 2**31 - 1, size=blocks.shape, dtype=np.int32)
        shuffled[0, 0] = 0
        for b in (high, low, shuffled):
            for fn in ("soft_vjp", "soft_jvp"):
                r = getattr(eng, fn)(x, out, perm, b, g, op, reg, desc, 0.7)
                assert r.shape == x.shape and r.dtype == x.dtype


def test_negative_block_start_marks_a_nan_row(eng):
    x = _x()
    out, perm, blocks = _state(eng, x)
    blocks = blocks.copy()
    blocks[1, 0] = -1
    r = eng.soft_vjp(x, out, perm, blocks, np.ones_like(x), 0, 0, False, 1.0)
    assert np.all(np.isnan(r[1])) and np.all(np.isfinite(r[[0, 2]]))


# ---------------------------------------------------------------- isotonic

@pytest.mark.parametrize(
    "weights, exc",
    [
        (np.zeros((3, 7)), ValueError),
        (-np.ones((3, 7)), ValueError),
        (np.full((3, 7), np.nan), ValueError),
        (np.full((3, 7), np.inf), ValueError),
        (np.ones((3, 6)), ValueError),
        (np.ones((3, 7), np.float32), TypeError),
        (np.ones((7, 3)).T, ValueError),
        ([[1.0] * 7] * 3, TypeError),
    ],
    ids=["zero", "negative", "nan", "inf", "shape", "dtype", "layout", "list"],
)
def test_bad_weights_named(eng, weights, exc):
    # Both engines check the weights' values too (the adapters' eager routes rely on it).
    with pytest.raises(exc, match=r"\bweights\b"):
        eng.isotonic_forward(_x(), weights, True)


def test_isotonic_vjp_bad_state_named(eng):
    y = _x()
    sol, blocks = eng.isotonic_forward(y, None, True)
    g = np.ones_like(y)
    with pytest.raises(ValueError, match=r"\bblock_start\b"):
        eng.isotonic_vjp(None, blocks[:, :2], g)
    with pytest.raises(TypeError, match=r"\bblock_start\b"):
        eng.isotonic_vjp(None, blocks.astype(np.int64), g)
    with pytest.raises(ValueError, match=r"\bweights\b"):
        eng.isotonic_vjp(np.ones((3, 2)), blocks, g)
    with pytest.raises(TypeError, match=r"\bcotangent\b"):
        eng.isotonic_vjp(None, blocks, g.astype(np.int64))
    # Garbage block_start: no crash.
    rng = np.random.default_rng(2)
    forged = rng.integers(-5, 2**31 - 1, size=blocks.shape, dtype=np.int32)
    assert eng.isotonic_vjp(None, forged, g).shape == g.shape


# ---------------------------------------------------------------- sizes

def test_zero_size_batches_return_at_once(eng):
    """A (2**40, 0) batch is a valid zero-byte array: it once looped over every
    empty row for hours (fixed in csrc/batched.cpp)."""
    for shape in [(0, 5), (5, 0), (2**40, 0), (0, 0)]:
        x = np.empty(shape)
        t0 = time.perf_counter()
        for op, reg, desc in OPS:
            out, perm, blocks = eng.soft_forward(x, op, reg, desc, 1.0)
            assert out.shape == shape and perm.shape == shape
            eng.soft_vjp(x, out, perm, blocks, x, op, reg, desc, 1.0)
            eng.soft_jvp(x, out, perm, blocks, x, op, reg, desc, 1.0)
        sol, b = eng.isotonic_forward(x, None, True)
        eng.isotonic_vjp(None, b, x)
        assert time.perf_counter() - t0 < 5.0, shape


def _sparse_array(n, dtype):
    """A (1, n) C-contiguous array over a sparse file: no memory is touched."""
    itemsize = np.dtype(dtype).itemsize
    fd, path = tempfile.mkstemp(dir=os.environ.get("TMPDIR", "/tmp"))
    os.close(fd)
    try:
        with open(path, "r+b") as f:
            f.truncate(n * itemsize)
            mm = mmap.mmap(f.fileno(), n * itemsize, access=mmap.ACCESS_READ)
    finally:
        os.unlink(path)
    return np.ndarray((1, n), dtype=dtype, buffer=mm), mm


def test_rows_longer_than_int32_are_refused(eng):
    try:
        x, mm = _sparse_array(2**31, np.float32)
    except (OSError, ValueError, OverflowError) as exc:  # no sparse file support here
        pytest.skip(f"no 8 GiB sparse mapping: {exc}")
    try:
        t0 = time.perf_counter()
        with pytest.raises(ValueError, match=r"\bx\b.*2\*\*31|2\*\*31.*\bx\b|\bx\b"):
            eng.soft_forward(x, 0, 0, False, 1.0)
        with pytest.raises(ValueError, match=r"\by\b"):
            eng.isotonic_forward(x, None, True)
        assert time.perf_counter() - t0 < 10.0  # refused before touching the data
    finally:
        del x
        mm.close()


# ---------------------------------------------------------------- layouts that are fine

def test_misaligned_and_readonly_buffers(eng):
    """A C-contiguous but misaligned array (numpy allows it) and a read-only
    one give the aligned, writable result bit for bit."""
    for dtype in (np.float64, np.float32):
        x = _x(3, 200, dtype)
        raw = bytearray(x.nbytes + 1)
        mis = np.frombuffer(raw, dtype=dtype, count=x.size, offset=1).reshape(x.shape)
        mis[...] = x
        assert not mis.flags.aligned and mis.flags.c_contiguous
        ro = x.copy()
        ro.flags.writeable = False
        for op, reg, desc in OPS:
            want = eng.soft_forward(x, op, reg, desc, 0.5)
            for arr in (mis, ro):
                got = eng.soft_forward(arr, op, reg, desc, 0.5)
                for a, b in zip(got, want):
                    np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(eng.isotonic_forward(mis, None, True)[0],
                                      eng.isotonic_forward(x, None, True)[0])


def test_set_num_threads_validation():
    import softrank

    saved = softrank.get_num_threads()
    try:
        for bad in (0, -1):
            with pytest.raises(ValueError, match="num_threads"):
                softrank.set_num_threads(bad)
        for bad in ("2", 2.0, None, True):
            with pytest.raises(TypeError, match="num_threads"):
                softrank.set_num_threads(bad)
        with pytest.raises(ValueError, match="num_threads"):
            _engine.engine().set_num_threads(0)
    finally:
        softrank.set_num_threads(saved)
