"""The same array every call against fresh arrays: what the grid's timings leave out.

The grid times every call on one array (``data(batch, n, dtype)``), as
pytest-benchmark suites usually do. A training loop hands softrank new values
at every step. The difference matters for the PAV loop: its merge tests are
data-dependent branches, and a branch predictor that has seen the same rows a
few thousand times predicts them. It can learn a few hundred rows of 64 (one
thread's share of (1024, 64) on two threads), not thousands of fresh ones.
``np.argsort`` (a SIMD sort without such branches) hardly changes.

Each cell here is timed four ways, softrank.numpy and np.argsort, each on
the grid's one array (``same``) and cycling through ``FRESH_ARRAYS`` arrays of
the same distribution and shape (``fresh``: about 16k distinct rows of 64
between two visits of a row). Groups: ``fresh-<cell>``; the report prints
fresh / same for each and the floor ratio softrank / np.argsort on both.
No bar: it says how far the grid's short-row figures are from a training
loop's.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from _benchutil import EPS, cotangent, data, fresh_data

SHAPES = ((1024, 64), (128, 1000), (1, 10**4))
FRESH_ARRAYS = 16

CASES = [
    pytest.param(op, reg, batch, n, pass_, impl, arrays,
                 id=f"{op}-{reg}-float32-b{batch}-n{n}-{pass_}-{impl}-{arrays}")
    for op in ("soft_rank", "soft_sort")
    for reg in ("l2", "kl")
    for batch, n in SHAPES
    for pass_ in ("fwd", "fwdbwd")
    for impl in ("softrank.numpy", "np.argsort")
    for arrays in ("same", "fresh")
]


def fresh_arrays(batch: int, n: int, dtype: str) -> list:
    """FRESH_ARRAYS arrays drawn as ``data`` draws its one (uniform on [0, n))."""
    return [fresh_data(batch, n, dtype, k) for k in range(FRESH_ARRAYS)]


@pytest.mark.fresh
@pytest.mark.parametrize("op, reg, batch, n, pass_, impl, arrays", CASES)
def test_fresh_data(benchmark, op, reg, batch, n, pass_, impl, arrays):
    import softrank.numpy as srn

    dtype = "float32"
    pool = [data(batch, n, dtype)] if arrays == "same" else fresh_arrays(batch, n, dtype)
    next_x = itertools.cycle(pool).__next__
    cot = cotangent(batch, n, dtype)
    if impl == "np.argsort":
        def run():
            return np.argsort(next_x(), axis=-1)
    elif pass_ == "fwd":
        fn = getattr(srn, op)

        def run():
            return fn(next_x(), EPS, regularization=reg)
    else:
        with_vjp = getattr(srn, op + "_with_vjp")

        def run():
            value, pullback = with_vjp(next_x(), EPS, regularization=reg)
            return value, pullback(cot)

    benchmark.group = f"fresh-{op}-{reg}-{dtype}-b{batch}-n{n}-{pass_}"
    benchmark.extra_info.update(
        impl=f"{impl}[{arrays}]", kind="fresh", base_impl=impl, arrays=arrays, op=op, reg=reg,
        dtype=dtype, batch=batch, n=n, eps=EPS, **{"pass": pass_},
    )
    for _ in range(len(pool)):
        run()  # warm-up: every array once
    benchmark(run)
